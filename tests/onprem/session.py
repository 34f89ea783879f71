"""The session's one throwaway on-prem host, shared by tests/onprem and tests/conformance.

Registered in tests/conftest.py (so every test directory gets the SAME session fixture: one
host per test run). One throwaway Debian host per test session (systemd-nspawn, private veth
/30, HTTP proxy on the host's veth address), converged once with site.yml; cleaned up even when
tests fail. Tokens that ``target_from`` saves go to the test run's own RLFLEET_HOME (set in
tests/conftest.py's pytest_configure), so the local target's state is not moved aside.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import said

from .harness import PlayResult, Site, decoy_wheel, plant_existing_setup, playbook, switch_to_ssh, write_site
from .throwaway import ThrowawayHost

REQUIRED_TOOLS = ("systemd-nspawn", "debootstrap", "nsenter", "ip", "zstd", "tar", "ssh", "ssh-keygen")


@dataclass
class Onprem:
    host: ThrowawayHost
    site: Site
    workdir: Path
    first: PlayResult
    figures: dict[str, float]


def _preconditions() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        pytest.fail(
            "the on-prem tests boot a systemd-nspawn container and need root plus "
            f"{', '.join(REQUIRED_TOOLS)} (missing: {', '.join(missing) or 'none'}; root: {os.geteuid() == 0}). "
            "Install with: apt-get install debootstrap systemd-container zstd iproute2 openssh-client; "
            "or deselect them with -m 'not onprem'",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def onprem() -> Iterator[Onprem]:
    _preconditions()
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-onprem-"))
    host = ThrowawayHost(workdir)
    try:
        host.start()
        t0 = time.monotonic()
        plant_existing_setup(host)  # what a lived-in server has before rlfleet (test_hardening.py)
        host.timings["plant_s"] = time.monotonic() - t0
        # a higher-version rlfleet wheel in --find-links: the kit must not resolve to it (test_kit_delivery.py)
        site = write_site(host, workdir, wheels=[decoy_wheel(workdir / "wheels")])
        first = playbook(site, workdir, "site.yml")
        figures = dict(host.timings, first_converge_s=first.seconds, first_changed=first.changed)
        line = (f"[onprem] host {host.name} at {host.ip}; first converge {first.seconds:.0f} s, "
                f"changed={first.changed}, rc={first.rc}")
        said.say(line)
        if first.rc != 0:
            pytest.fail(f"first converge of site.yml failed (rc={first.rc}); log tail:\n{first.output[-4000:]}",
                        pytrace=False)
        switch_to_ssh(site, host, workdir)
        yield Onprem(host=host, site=site, workdir=workdir, first=first, figures=figures)
    finally:
        t0 = time.monotonic()
        host.stop()
        if os.environ.get("RLFLEET_KEEP_ONPREM_LOGS"):
            print(f"[onprem] logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"[onprem] cleanup {time.monotonic() - t0:.1f} s")
