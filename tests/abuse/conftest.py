"""Abuse suite fixtures: a sandbox (own RLFLEET_HOME, config dir, cwd and targets file) per module,
a guard that no case can start the local Ray head, and the per-surface case count."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from .harness import COUNTS, SURFACES, snapshot

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "infra_cloud" / "shared") not in sys.path:
    sys.path.insert(0, str(ROOT / "infra_cloud" / "shared"))

# hypothesis keeps caches in ./.hypothesis; keep them out of the checkout (and gone after the run)
_HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="rlfleet-abuse-hypothesis-"))
set_hypothesis_home_dir(str(_HYPOTHESIS_HOME))


def pytest_unconfigure() -> None:
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


def closed_port() -> int:
    """A loopback port nothing listens on: 9 (discard) is privileged and never served here; checked."""
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", 9)) != 0, "something listens on 127.0.0.1:9"
    return 9


@dataclass
class Sandbox:
    base: Path
    home: Path  # RLFLEET_HOME
    config: Path  # XDG_CONFIG_HOME
    cwd: Path  # the working directory; ./rlfleet.yaml is the targets file
    token: Path  # a 0600 token file the 'sink' target uses
    art: Path  # the sink target's artifact root (file://)

    @property
    def targets_file(self) -> Path:
        return self.cwd / "rlfleet.yaml"

    @property
    def roots(self) -> tuple[Path, ...]:
        """Everything a bad input must leave untouched."""
        return (self.base,)

    def write_targets(self, text: str) -> Path:
        self.targets_file.write_text(text)
        return self.targets_file

    def sink_yaml(self) -> str:
        """A 'sink' ray target at a closed loopback port: anything accidentally accepted fails fast
        at connect time instead of reaching a cluster."""
        return (
            "targets:\n"
            "  sink:\n"
            "    kind: ray\n"
            f"    ray_address: http://127.0.0.1:{closed_port()}\n"
            f"    token_source: file:{self.token}\n"
            f"    artifact_root: file://{self.art}\n"
        )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    base = tmp_path_factory.mktemp("abuse")
    sb = Sandbox(base=base, home=base / "home", config=base / "config", cwd=base / "cwd", token=base / "token",
                 art=base / "art")
    for d in (sb.home, sb.config, sb.cwd, sb.art / "runs"):
        d.mkdir(parents=True)
    sb.token.write_text("abuse-token\n")
    sb.token.chmod(0o600)
    sb.write_targets(sb.sink_yaml())
    mp = pytest.MonkeyPatch()
    old_cwd = os.getcwd()
    try:
        mp.setenv("RLFLEET_HOME", str(sb.home))
        mp.setenv("XDG_CONFIG_HOME", str(sb.config))
        mp.setenv("RLFLEET_TARGET", "sink")
        mp.delenv("RLFLEET_CONFIG", raising=False)
        mp.delenv("RLFLEET_DEBUG", raising=False)
        mp.setenv("RLFLEET_STORE_RETRIES", "1")
        import rlfleet.local

        def _no_local(*a: object, **k: object) -> None:
            raise AssertionError("an abuse case reached the local target (would start a Ray head)")

        mp.setattr(rlfleet.local, "ensure_local_up", _no_local)
        os.chdir(sb.cwd)
        yield sb
    finally:
        os.chdir(old_cwd)
        mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _user_state_untouched() -> Iterator[None]:
    """The user's own ~/.rlfleet and ~/.config/rlfleet are never touched by an abuse module."""
    roots = (Path("~/.rlfleet").expanduser(), Path("~/.config/rlfleet").expanduser())
    before = snapshot(*roots)
    yield
    assert snapshot(*roots) == before, "the abuse suite changed the user's own rlfleet state"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS:
        return
    total = sum(COUNTS.values())
    parts = ", ".join(f"{s}={COUNTS[s]}" for s in SURFACES if COUNTS[s])
    terminalreporter.write_line(f"abuse cases: {total} ({parts})")
    out = os.environ.get("RLFLEET_ABUSE_COUNTS")
    if out:
        Path(out).write_text(json.dumps({"total": total, **{s: COUNTS[s] for s in SURFACES}}, indent=2) + "\n")
