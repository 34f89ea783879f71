"""environment.txt lists what importlib.metadata's full parser sees, read from the header lines only,
and cached per environment state: a package installed, upgraded or removed after the cache was
written shows up at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest

from rlfleet_agents import provenance
from rlfleet_agents.provenance import packages_text


def test_packages_text_equals_the_full_metadata_parse() -> None:
    seen: dict[str, str] = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name:
            seen.setdefault(name.lower().replace("_", "-"), f"{name}=={dist.version}")
    expected = "".join(line + "\n" for _, line in sorted(seen.items()))
    text = packages_text()
    assert text == expected
    assert len(text.splitlines()) > 100 and "numpy==" in text and "rlfleet==" in text


def _wheel(tmp: Path, version: str) -> Path:
    """A minimal pure-Python wheel of the distribution 'rlfleet-probe-pkg'."""
    dist = f"rlfleet_probe_pkg-{version}.dist-info"
    path = tmp / f"rlfleet_probe_pkg-{version}-py3-none-any.whl"
    files = {
        "rlfleet_probe_pkg/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: rlfleet-probe-pkg\nVersion: {version}\n\nA probe.\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in {**files, f"{dist}/RECORD": record}.items():
            zf.writestr(name, text)
    return path


def _pip_install(wheel: Path, site: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                          "--disable-pip-version-check", "--upgrade", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_the_package_list_is_cached_and_follows_installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    first = packages_text()
    assert "rlfleet-probe-pkg" not in first
    cache = tmp_path / "cache" / "rlfleet" / "packages"
    assert len(list(cache.glob("*.txt"))) == 1, "the list was not cached"
    assert cache.stat().st_mode & 0o777 == 0o700

    def no_reads() -> str:
        raise AssertionError("the metadata was read again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(provenance, "_read_packages", no_reads)
        assert packages_text() == first  # from the cache

    # installed after the cache was written (real pip, into a directory on sys.path): it shows up
    _pip_install(_wheel(tmp_path, "1.0"), site)
    after = packages_text()
    assert "rlfleet-probe-pkg==1.0" in after.splitlines()
    assert after == provenance._read_packages()
    # metadata rewritten in place (an upgrade that keeps the directory name): the new version
    meta = site / "rlfleet_probe_pkg-1.0.dist-info" / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 1.0", "Version: 1.0.post1"))
    lines = packages_text().splitlines()
    assert "rlfleet-probe-pkg==1.0.post1" in lines and "rlfleet-probe-pkg==1.0" not in lines
    # removed: gone
    for p in site.iterdir():
        shutil.rmtree(p)
    assert packages_text() == first


def test_a_cache_directory_others_can_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "rlfleet" / "packages"
    cache.mkdir(parents=True)
    os.chmod(cache, 0o770)  # noqa: S103 - group-writable on purpose: such a cache must not be used
    key = provenance._environment_key()
    (cache / f"{key}.txt").write_text("evil==6.6.6\n")  # planted by someone else
    text = packages_text()
    assert "evil==6.6.6" not in text and "numpy==" in text
