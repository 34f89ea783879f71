"""What a run ran with, recorded so it can be re-run: ``environment.txt`` (the Python packages of
the run's environment, ``name==version`` sorted), ``code.zip`` (the run's ``code:`` directory as
the cluster unpacked it, zipped deterministically; only for runs with ``code:``) and the
manifest's ``provenance`` section: kit version, Python, platform, seed, device, torch threads and
determinism, the sha256 of both files, and ``reproduces`` (the run this one re-runs).

The manifest's integrity rules cover it (:func:`rlfleet.artifacts.check_provenance`): both files
are listed with their sha256 like every artifact, and the provenance names those same hashes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib.metadata import distributions
from typing import Any

from rlfleet.artifacts import PROVENANCE_FILES, RunArtifacts
from rlfleet.envelope import RunEnvelope
from rlfleet.spec import RunSpec

PACKAGES_FILE = PROVENANCE_FILES["packages_sha256"]
CODE_FILE = PROVENANCE_FILES["code_sha256"]


def packages_text() -> str:
    """``name==version`` of every distribution importable here, one a line, sorted by name."""
    seen: dict[str, str] = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name:
            seen.setdefault(name.lower().replace("_", "-"), f"{name}=={dist.version}")
    return "".join(line + "\n" for _, line in sorted(seen.items()))


def write_sources(arts: RunArtifacts, spec: RunSpec) -> dict[str, str | None]:
    """Write environment.txt and (for a run with ``code:``) code.zip of the working directory;
    return their sha256 (code None without ``code:``). Called at the start of a run, before the
    run's own code can add files to its working directory."""
    from rlfleet.jobs import zip_dir

    env = packages_text().encode()
    arts.write_bytes(PACKAGES_FILE, env)
    code_sha = None
    if spec.code is not None:
        from pathlib import Path

        archive = zip_dir(Path(os.getcwd()))
        arts.write_bytes(CODE_FILE, archive)
        code_sha = hashlib.sha256(archive).hexdigest()
    return {"packages_sha256": hashlib.sha256(env).hexdigest(), "code_sha256": code_sha}


def provenance(envelope: RunEnvelope, spec: RunSpec, sources: dict[str, str | None], device: str) -> dict[str, Any]:
    threads = deterministic = None
    if "torch" in sys.modules:
        import torch

        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    return {
        "kit_version": envelope.kit_version,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "seed": spec.seed,
        "device": device,
        "torch_threads": threads,
        "deterministic": bool(deterministic),
        **sources,
        "reproduces": envelope.reproduces,
    }
