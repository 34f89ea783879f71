"""What a run ran with, recorded so it can be re-run: ``environment.txt`` (the Python packages of
the run's environment, ``name==version`` sorted), ``code.zip`` (the run's ``code:`` directory as
the cluster unpacked it, zipped deterministically; only for runs with ``code:``) and the
manifest's ``provenance`` section: kit version, Python, platform, seed, device, torch threads and
determinism, the sha256 of both files, and ``reproduces`` (the run this one re-runs).

The manifest's integrity rules cover it (:func:`rlfleet.artifacts.check_provenance`): both files
are listed with their sha256 like every artifact, and the provenance names those same hashes.

The package list is cached per Python environment (``$XDG_CACHE_HOME/rlfleet/packages/``, else
``~/.cache/rlfleet/packages/``; a private 0700 directory), keyed by a fingerprint of what
``importlib.metadata`` would read: every ``sys.path`` entry, each one's ``*.dist-info`` /
``*.egg-info`` names with their metadata file's mtime and size, and the meta path finders. Any
install, uninstall, upgrade or metadata rewrite changes the key, so a stale list is never used; a
cache that cannot be read or written only costs the full read.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
from importlib.metadata import Distribution, distributions
from typing import Any

from rlfleet.artifacts import PROVENANCE_FILES, RunArtifacts
from rlfleet.envelope import RunEnvelope
from rlfleet.spec import RunSpec

PACKAGES_FILE = PROVENANCE_FILES["packages_sha256"]
CODE_FILE = PROVENANCE_FILES["code_sha256"]


CACHE_KEEP = 64  # cached package lists kept (one per environment state); the oldest go first


def packages_text() -> str:
    """``name==version`` of every distribution importable here, one a line, sorted by name (cached
    per environment state: see the module's doc)."""
    key = _environment_key()
    cache = _cache_dir()
    path = os.path.join(cache, key + ".txt") if cache else None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            pass
    text = _read_packages()
    if path is not None and cache is not None:
        _store(cache, path, text)
    return text


def _read_packages() -> str:
    seen: dict[str, str] = {}
    for dist in distributions():
        name, version = _name_version(dist)
        if name:
            seen.setdefault(name.lower().replace("_", "-"), f"{name}=={version}")
    return "".join(line + "\n" for _, line in sorted(seen.items()))


def _name_version(dist: Distribution) -> tuple[str, str]:
    """Name and Version from the metadata's header lines. ``dist.metadata`` parses the whole file
    as an email message (long descriptions included): 4x slower over a few hundred packages,
    seconds per run on a loaded node."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    name = version = ""
    for line in text.splitlines():
        if not line:  # the headers end at the first empty line
            break
        if line.startswith("Name:"):
            name = line[5:].strip()
        elif line.startswith("Version:"):
            version = line[8:].strip()
        if name and version:
            break
    return name, version


def _environment_key() -> str:
    """A fingerprint of what ``distributions()`` would find, without reading any metadata file."""
    h = hashlib.sha256(repr((sys.version, sys.prefix, [f"{type(f).__module__}.{type(f).__qualname__}"
                                                       for f in sys.meta_path])).encode())
    for entry in sys.path:
        root = os.path.abspath(entry or ".")
        h.update(b"\0path " + root.encode())
        try:
            with os.scandir(root) as it:
                found = sorted((e.name, e.is_dir()) for e in it if _is_dist_dir(root, e.name))
        except OSError:  # a zip or a missing entry: its own stamp
            h.update(_stamp(root))
            continue
        for name, is_dir in found:
            p = os.path.join(root, name)
            meta = "METADATA" if name.lower().endswith(".dist-info") else "PKG-INFO"
            # a bare egg-info file (old distutils installs) is its own metadata
            h.update(b"\0" + name.encode() + _stamp(os.path.join(p, meta) if is_dir else p))
    return h.hexdigest()[:32]


def _is_dist_dir(root: str, name: str) -> bool:
    low = name.lower()
    return low.endswith((".dist-info", ".egg-info")) or (low == "egg-info" and root.endswith(".egg"))


def _stamp(path: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError:
        return b" -"
    return f" {st.st_mtime_ns} {st.st_size}".encode()


def _cache_dir() -> str | None:
    """This user's private cache directory for package lists, None if there is none to use."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "rlfleet", "packages")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None  # someone else's, or writable by others: its lists could not be trusted
    return path


def _store(cache: str, path: str, text: str) -> None:
    """Write one list atomically (never a torn file); keep the CACHE_KEEP newest. Best effort."""
    try:
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        lists = sorted((e.stat().st_mtime, e.path) for e in os.scandir(cache) if e.name.endswith(".txt"))
        for _, old in lists[:-CACHE_KEEP]:
            os.unlink(old)
    except OSError:
        pass


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
