"""Checks about the submitting machine, run by ``submit_run()`` before anything is sent.

``RunSpec`` validates its schema only, so a spec reads the same on every machine. What depends
on this machine (the code directory exists, a requirements file inside it, a built-in env id
known to this machine's Gymnasium) is checked here, once, and never again on the cluster.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from rlfleet.errors import SpecError
from rlfleet.spec import RunSpec

# The run's unpacked working_dir on the node, as Ray names it while it builds a runtime env.
WORKING_DIR_VAR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
# runtime_env key of the plugin that installs a run's requirements (rlfleet_agents.requirements_env)
REQUIREMENTS_PLUGIN = "rlfleet_requirements"
# every node's Ray is started with RAY_RUNTIME_ENV_PLUGINS=<this> so it can install them
RAY_PLUGINS_VALUE = '[{"class": "rlfleet_agents.requirements_env.RequirementsPlugin"}]'


def check_spec(spec: RunSpec) -> list[str] | None:
    """Raise SpecError (naming the field) for a spec this machine cannot submit; returns the run's
    requirements as the cluster installs them (see :func:`requirements`)."""
    if spec.code is not None and not Path(spec.code).expanduser().is_dir():
        raise SpecError(f"code: {spec.code!r} is not a directory on this machine")
    if spec.code is None and ":" not in spec.env and "/" not in spec.env:
        _check_env_registered(spec.env)
    return requirements(spec)


def requirements(spec: RunSpec) -> list[str] | None:
    """The run's pip requirements as the cluster installs them ('./x' -> a file in the working dir)."""
    if spec.requirements is None:
        return None
    code = Path(spec.code).expanduser() if spec.code else None
    if isinstance(spec.requirements, str):
        assert code is not None  # RunSpec guarantees it
        path = code / spec.requirements
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise SpecError(f"requirements: cannot read {str(path)!r}: {err.strerror}") from None
        entries = [ln.split(" #")[0].strip() for ln in lines]
        entries = [e for e in entries if e and not e.startswith("#")]
        # the file's entries obey the same rules as a list in the spec
        try:
            RunSpec.from_dict({**spec.to_dict(), "requirements": entries})
        except SpecError as err:
            raise SpecError(f"{err} (in {str(path)!r})") from None
    else:
        entries = list(spec.requirements)
    out = []
    for req in entries:
        if req.startswith("./"):
            assert code is not None
            if not (code / req[2:]).is_file():
                raise SpecError(f"requirements: {req!r} is not a file inside the code directory {str(code)!r}")
            req = f"{WORKING_DIR_VAR}/{req[2:]}"
        out.append(req)
    return out


def _check_env_registered(env_id: str) -> None:
    """Catch typos in built-in env ids before submitting (needs gymnasium; skipped without it)."""
    try:
        from gymnasium.envs.registration import registry
    except ImportError:
        return
    if env_id in registry:
        return
    hint = difflib.get_close_matches(env_id, list(registry), n=1)
    raise SpecError(
        f"env: {env_id!r} is not a registered Gymnasium env"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + " (custom envs: 'my_module:MyEnv-v0' with code=<project dir>)"
    )
