"""The kit a cluster runs: the wheel of this checkout plus the constraints its dependencies install with.

Every target installs exactly this wheel, pinned by its sha256, and never resolves the name
``rlfleet`` on a package index (ARCHITECTURE.md, "Kit delivery"):

- the Pulumi programs (``infra_cloud/{aws,gcp}``) build it at program run time and ship it as
  objects in the stack's bucket; the node bootstrap fetches them with the node identity, checks the
  sha256 and pip-installs the file by path;
- the Ansible role ``ray_runtime`` runs this file on the controller (``python sdk/rlfleet/kit.py
  --json``), copies the wheel and constraints to the hosts, checks the sha256 there and installs
  the file by path.

The build (``pip wheel --no-deps`` on a copy of the source files, reproducible timestamps) is
cached by a hash of those files, so a repeated ``pulumi up`` or converge does not rebuild.

Standard library only, and runnable as a script without importing the ``rlfleet`` package (the
Ansible controller's Python may not have the SDK's dependencies).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

DIST = "rlfleet"
# Files at the top of the checkout that go into (or shape) the wheel and the node constraints.
TOP_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py", "constraints.txt")
# Folders holding the packages (pyproject: [tool.setuptools.packages.find] where = ["sdk", "agents"]).
PACKAGE_DIRS = ("sdk", "agents")
SKIP_PARTS = ("__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache")
SKIP_SUFFIXES = (".pyc", ".pyo")
# Reproducible zip timestamps: the same source gives the same wheel, hence the same sha256, on any
# machine (a changed sha256 is what makes the stacks ship a new kit).
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest date a zip file can hold
KEEP_BUILDS = 5
KIT_FORMAT = "rlfleet-kit-2"  # bump when the build or the node constraints change shape
# Where the clouds keep shipped kits in the stack's bucket (read-only for the nodes).
KIT_OBJECT_PREFIX = "rlfleet/kit"
_LOCAL_LABEL = re.compile(r"^([A-Za-z0-9_.\-\[\]]+\s*==\s*[^+;\s]+)\+[A-Za-z0-9.]+")


class KitError(RuntimeError):
    """The kit cannot be built; the message says what and what to do."""


@dataclass(frozen=True)
class Kit:
    wheel: Path
    sha256: str
    version: str
    constraints: Path
    constraints_sha256: str
    source_digest: str

    @property
    def wheel_name(self) -> str:
        return self.wheel.name

    def object_prefix(self) -> str:
        """Bucket prefix of this build: old nodes keep finding their own wheel while a new one ships."""
        return f"{KIT_OBJECT_PREFIX}/{self.sha256[:16]}"

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()} | {"wheel_name": self.wheel_name}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_root(start: Path) -> Path:
    """The checkout whose pyproject.toml names the rlfleet project (start or one of its parents)."""
    start = Path(start).resolve()
    for cand in (start, *start.parents):
        pp = cand / "pyproject.toml"
        if pp.is_file() and re.search(rf'^name\s*=\s*"{DIST}"\s*$', pp.read_text(), re.M):
            return cand
    raise KitError(
        f"{start} is not inside an rlfleet checkout (no pyproject.toml naming {DIST!r}); run from a clone of "
        "the repository, or give a prebuilt wheel (ray_runtime_kit_wheel for on-prem)"
    )


def source_files(root: Path) -> list[Path]:
    """The files the wheel is built from, relative to root, sorted."""
    out = [Path(name) for name in TOP_FILES if (root / name).is_file()]
    for top in PACKAGE_DIRS:
        base = root / top
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_PARTS and not d.endswith(".egg-info"))
            for name in sorted(filenames):
                if not name.endswith(SKIP_SUFFIXES):
                    out.append((Path(dirpath) / name).relative_to(root))
    return sorted(out)


def source_digest(root: Path, files: list[Path] | None = None) -> str:
    """sha256 over the relative paths and contents of the source files and what shapes the node
    constraints (the cache key)."""
    h = hashlib.sha256()
    h.update(f"{KIT_FORMAT}\0{frozen_python()}\0".encode())
    for rel in files if files is not None else source_files(root):
        h.update(str(rel).encode() + b"\0")
        h.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()


def frozen_python() -> str:
    """The Python (major.minor) the pins of constraints.txt hold for: the one building the kit,
    which in this repository's workflow is the venv the constraints were frozen from."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def node_constraints(text: str, python: str | None = None) -> str:
    """constraints.txt for the nodes: the same pins without local version labels, each one only for
    the Python it was frozen with.

    ``torch==2.13.0+cpu`` (the CPU build this checkout's venv uses) becomes ``torch==2.13.0``, which
    a GPU node satisfies with the CUDA build and a CPU host with the +cpu wheel (PEP 440: a pin
    without a local label matches any local label). A pin frozen on Python 3.11 may not exist for
    another Python (numpy 2.4 has no Python 3.10 build, and Ubuntu 22.04 images run 3.10), so every
    pin carries ``; python_version == "<that version>"``: elsewhere the dependencies resolve as
    their own requirements allow, and the kit itself stays pinned by its sha256."""
    marker = f'python_version == "{python or frozen_python()}"'
    lines = []
    for line in text.splitlines():
        bare = line.strip()
        if not bare or bare.startswith(("#", "-")):
            lines.append(line)
            continue
        m = _LOCAL_LABEL.match(bare)
        req, _, old_marker = (m.group(1) + bare[m.end():] if m else bare).partition(";")
        both = f"({old_marker.strip()}) and {marker}" if old_marker.strip() else marker
        lines.append(f"{req.strip()} ; {both}")
    return "\n".join(lines) + "\n"


def default_cache_dir() -> Path:
    env = os.environ.get("RLFLEET_KIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rlfleet" / "kit"


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(entry: Path) -> Kit | None:
    meta = entry / "kit.json"
    if not meta.is_file():
        return None
    try:
        d = json.loads(meta.read_text())
        kit = Kit(wheel=entry / d["wheel_name"], sha256=d["sha256"], version=d["version"],
                  constraints=entry / "constraints.txt", constraints_sha256=d["constraints_sha256"],
                  source_digest=d["source_digest"])
    except (ValueError, KeyError):
        return None
    # a cache entry is trusted only while its files still hash to what was recorded
    if (kit.wheel.is_file() and kit.constraints.is_file() and sha256_file(kit.wheel) == kit.sha256
            and sha256_file(kit.constraints) == kit.constraints_sha256):
        return kit
    return None


def _can_build_in_place(python: str) -> bool:
    """--no-build-isolation needs setuptools>=77 (pyproject's build backend) in that Python."""
    probe = ("import importlib.metadata as m, sys; v = m.version('setuptools').split('.'); "
             "sys.exit(0 if int(v[0]) >= 77 else 1)")
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0


def _pip_wheel(src: Path, out: Path, python: str) -> Path:
    cmd = [python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out)]
    if _can_build_in_place(python):
        cmd.append("--no-build-isolation")  # no index needed for the build backend
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        r = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600, env=env)
    except FileNotFoundError:
        raise KitError(f"cannot build the kit wheel: {python} does not exist") from None
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        raise KitError(f"building the kit wheel with '{python} -m pip wheel' failed: {last}")
    wheels = sorted(out.glob(f"{DIST}-*.whl"))
    if len(wheels) != 1:
        raise KitError(f"pip wheel produced {len(wheels)} {DIST} wheels in {out}, expected one")
    return wheels[0]


def _prune(cache: Path, keep: str) -> None:
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and p.name != keep),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def build_kit(source: Path, *, cache_dir: Path | None = None, python: str | None = None) -> Kit:
    """Build (or reuse) the wheel of the checkout at/above ``source`` and its node constraints."""
    root = source_root(source)
    files = source_files(root)
    if not (root / "constraints.txt").is_file():
        raise KitError(f"{root}/constraints.txt is missing: the nodes install the kit's dependencies pinned by it")
    digest = source_digest(root, files)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache / digest[:32]
    with _locked(cache):
        hit = _cached(entry)
        if hit is not None:
            os.utime(entry)
            return hit
        with tempfile.TemporaryDirectory(prefix="rlfleet-kit-", dir=cache) as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "out"
            for rel in files:  # build from a copy: no build/ or egg-info left in (or taken from) the checkout
                dest = src / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, dest)
                dest.chmod(0o644)
            out.mkdir()
            wheel = _pip_wheel(src, out, python or sys.executable)
            staged = Path(tmp) / "entry"
            staged.mkdir()
            shutil.move(str(wheel), staged / wheel.name)
            (staged / "constraints.txt").write_text(node_constraints((root / "constraints.txt").read_text()))
            version = wheel.name.split("-")[1]
            kit = Kit(wheel=entry / wheel.name, sha256=sha256_file(staged / wheel.name), version=version,
                      constraints=entry / "constraints.txt",
                      constraints_sha256=sha256_file(staged / "constraints.txt"), source_digest=digest)
            (staged / "kit.json").write_text(json.dumps(kit.as_dict(), indent=1) + "\n")
            shutil.rmtree(entry, ignore_errors=True)
            staged.rename(entry)
        _prune(cache, entry.name)
        return kit


def prebuilt_kit(wheel: Path, source: Path) -> Kit:
    """A wheel built elsewhere (e.g. by CI) with the constraints of this checkout."""
    wheel = Path(wheel).expanduser().resolve()
    if not (wheel.is_file() and wheel.name.startswith(f"{DIST}-") and wheel.suffix == ".whl"):
        raise KitError(f"{wheel} is not an {DIST} wheel file ({DIST}-<version>-py3-none-any.whl)")
    root = source_root(source)
    cache = default_cache_dir()
    entry = cache / f"prebuilt-{sha256_file(wheel)[:32]}"
    with _locked(cache):
        entry.mkdir(exist_ok=True)
        cons = entry / "constraints.txt"
        cons.write_text(node_constraints((root / "constraints.txt").read_text()))
    return Kit(wheel=wheel, sha256=sha256_file(wheel), version=wheel.name.split("-")[1], constraints=cons,
               constraints_sha256=sha256_file(cons), source_digest="prebuilt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kit.py", description="Build (or reuse) the rlfleet kit wheel of a checkout.")
    ap.add_argument("--source", default=str(Path(__file__).resolve().parent),
                    help="a path inside the checkout (default: the checkout holding this file)")
    ap.add_argument("--wheel", default="", help="use this prebuilt wheel instead of building one")
    ap.add_argument("--json", action="store_true", help="print the kit as JSON")
    args = ap.parse_args(argv)
    try:
        kit = prebuilt_kit(Path(args.wheel), Path(args.source)) if args.wheel else build_kit(Path(args.source))
    except (KitError, OSError) as err:
        print(f"rlfleet kit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(kit.as_dict()) if args.json else f"{kit.wheel} sha256={kit.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
