"""Per-run Python requirements, as a Ray runtime_env plugin (``rlfleet_requirements``).

Ray's own ``pip``/``uv`` plugins clone the whole virtualenv Ray runs from (torch and Ray: ~3 GB)
for every requirement set, three times over when an install fails. This plugin installs a run's
requirements into a thin *overlay* environment instead:

- a venv without pip whose ``site-packages`` sees the cluster's packages through a ``.pth`` file,
  so pip installs only what is missing (or a version the run pins differently, which then shadows
  the cluster's copy for that run alone — the cluster's environment is never modified);
- cached per node by a hash of the requirement set, the Python and the kit version; builders of
  one env take turns and a marker is written last (a failed build never leaves a half env in use);
- a requirement that cannot be installed fails the run's runtime env at once with pip's own first
  ``ERROR:`` line (the SDK's ``failure_reason()`` shows it).

Every node registers it when Ray starts:
``RAY_RUNTIME_ENV_PLUGINS='[{"class": "rlfleet_agents.requirements_env.RequirementsPlugin"}]'``
(``rlfleet.preflight.RAY_PLUGINS_VALUE``; the local target, the on-prem role and the cloud bootstrap set it).
The SDK sends ``{"rlfleet_requirements": {"packages": [...]}}`` in the job's runtime_env;
``${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}`` in a requirement names the run's unpacked code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Any

from ray._private.runtime_env.context import RuntimeEnvContext
from ray._private.runtime_env.plugin import RuntimeEnvPlugin

from rlfleet.envelope import kit_version
from rlfleet.preflight import REQUIREMENTS_PLUGIN, WORKING_DIR_VAR

PIP_TIMEOUT_S = 1800


def cache_root() -> Path:
    return Path(os.environ.get("RLFLEET_REQUIREMENTS_CACHE", "~/.cache/rlfleet/requirements")).expanduser()


def _packages(runtime_env: Any) -> list[str]:
    conf = runtime_env.get(REQUIREMENTS_PLUGIN) or {}
    return [str(p) for p in conf.get("packages", [])]


def env_key(packages: list[str]) -> str:
    ident = json.dumps({"packages": packages, "python": sys.version, "kit": kit_version()}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def first_pip_error(output: str) -> str:
    for line in output.splitlines():
        if line.strip().startswith("ERROR:"):
            return line.strip()
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return "ERROR: " + (lines[-1] if lines else "pip failed without a message")


def build_overlay(packages: list[str], dest: Path, *, working_dir: str | None = None) -> Path:
    """Create the overlay env for ``packages`` at ``dest`` once per node; returns its python.

    A lock serializes builders of the same env; the ``.complete`` marker is written last, so an
    env whose build failed or was interrupted is never used: the next build starts over.
    """
    import fcntl

    python = dest / "bin" / "python"
    done = dest / ".complete"
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(dest, ignore_errors=True)
        try:
            venv.EnvBuilder(with_pip=False, symlinks=True).create(dest)
            site = Path(sysconfig.get_path("purelib", vars={"base": str(dest), "platbase": str(dest)}))
            base_sites = [p for p in sys.path if p.endswith("-packages") and Path(p).is_dir()]
            # addsitedir (not a bare path) so the cluster's own .pth files (editable installs) apply too
            lines = [f"import site; site.addsitedir({p!r})" for p in base_sites]
            (site / "_rlfleet_cluster_packages.pth").write_text("\n".join(lines) + "\n")
            reqs = [p.replace(WORKING_DIR_VAR, working_dir) if working_dir else p for p in packages]
            cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                   "--no-warn-script-location", *reqs]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(first_pip_error(proc.stderr + "\n" + proc.stdout))
            done.write_text(json.dumps({"packages": packages}))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return python


class RequirementsPlugin(RuntimeEnvPlugin):
    name = REQUIREMENTS_PLUGIN
    priority = 20  # after working_dir (5), so './x.whl' in the run's code is there

    @staticmethod
    def validate(runtime_env_dict: dict) -> None:
        conf = runtime_env_dict.get(REQUIREMENTS_PLUGIN)
        if not isinstance(conf, dict) or not isinstance(conf.get("packages"), list):
            raise ValueError(f"{REQUIREMENTS_PLUGIN} must be {{'packages': [requirement, ...]}}")

    def get_uris(self, runtime_env: Any) -> list[str]:
        packages = _packages(runtime_env)
        return [f"rlfleet-req://{env_key(packages)}"] if packages else []

    async def create(self, uri: str | None, runtime_env: Any, context: RuntimeEnvContext,
                     logger: logging.Logger) -> float:
        packages = _packages(runtime_env)
        if not packages:
            return 0
        import asyncio

        dest = cache_root() / env_key(packages)
        working_dir = os.environ.get("RAY_RUNTIME_ENV_CREATE_WORKING_DIR")
        logger.info("rlfleet: installing %d requirement(s) into %s", len(packages), dest)
        await asyncio.get_running_loop().run_in_executor(None, lambda: build_overlay(packages, dest,
                                                                                     working_dir=working_dir))
        return 0

    def modify_context(self, uris: list[str], runtime_env: Any, context: RuntimeEnvContext,
                       logger: logging.Logger) -> None:
        packages = _packages(runtime_env)
        if not packages:
            return
        dest = cache_root() / env_key(packages)
        context.py_executable = str(dest / "bin" / "python")
        context.command_prefix += ["source", str(dest / "bin" / "activate"), "1>&2", "&&"]
