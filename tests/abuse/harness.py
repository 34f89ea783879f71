"""Shared checks for the abuse suite: one clear line naming the thing, no traceback, nothing on
disk changed, and a per-surface case counter (printed at the end of the run by conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import stat
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, settings

SURFACES = ("runspec", "cli", "targets", "http", "inventory", "stack", "artifacts")
COUNTS: Counter[str] = Counter()
RLFLEET = str(Path(sys.executable).parent / "rlfleet")


def count(surface: str) -> None:
    assert surface in SURFACES, surface
    COUNTS[surface] += 1


def fuzz(n: int) -> settings:
    """Bounded, reproducible hypothesis settings (same examples on every machine and in CI)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


def assert_one_line(msg: str, *needles: str) -> None:
    """A user-facing message: one line, no traceback, names every needle (the field or thing)."""
    assert msg.strip(), "empty message"
    assert "\n" not in msg.strip(), f"message spans several lines: {msg!r}"
    assert "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not named in {msg!r}"


# -- disk snapshots ---------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, tuple[str, int, str]]:
    """path -> (kind, mode, content hash) for every file/dir/link under roots (missing roots too)."""
    out: dict[str, tuple[str, int, str]] = {}
    for root in roots:
        if not root.exists() and not root.is_symlink():
            out[str(root)] = ("absent", 0, "")
            continue
        paths = [root] if not root.is_dir() else [root, *root.rglob("*")]
        for p in paths:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[str(p)] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[str(p)] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@contextlib.contextmanager
def unchanged(*roots: Path) -> Iterator[None]:
    before = snapshot(*roots)
    yield
    after = snapshot(*roots)
    if after != before:
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
        raise AssertionError(f"disk changed: added {added}, removed {removed}, changed {changed}")


# -- the CLI in-process -----------------------------------------------------------------------

def run_cli(argv: list[str] | str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """``rlfleet ARGV`` in this process (rlfleet.cli.main, as the console script runs it).

    Any exception escaping main() is what the console script would print as a traceback: it is
    returned as exit code 1 with a 'Traceback' stderr so the checks below fail on it."""
    from click.testing import CliRunner

    from rlfleet.cli import main

    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    runner = CliRunner()
    with runner.isolation(env=env) as streams:
        out, err = streams[0], streams[1]
        try:
            rc = main(args)
        except SystemExit as e:  # main() never raises it; keep the code if it did
            rc = int(e.code or 0)
        except BaseException as e:  # the traceback case under test
            return 1, out.getvalue().decode(), f"Traceback (escaped main): {type(e).__name__}: {e}"
    return rc, out.getvalue().decode(), err.getvalue().decode()


def error_line(stderr: str) -> str:
    """The one error line of a failed command: 'rlfleet: error: ...' or click's 'Error: ...'."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("rlfleet: error:")]
    clicks = [ln for ln in lines if ln.startswith("Error:")]
    if ours:
        assert lines == ours and len(ours) == 1, f"expected exactly one line on stderr, got {lines}"
        return ours[0]
    assert len(clicks) == 1, f"no single error line in {lines}"
    # click's own layout: a usage header, and for a bad choice the choices on tab-indented lines
    rest = [ln for ln in lines if ln not in clicks and not ln.startswith(("Usage:", "Try '", "\t"))]
    assert not rest, f"stray stderr lines besides click's usage error: {rest}"
    return clicks[0]


def assert_cli_error(rc: int, out: str, err: str, *needles: str) -> str:
    assert rc != 0, f"accepted (exit 0); stdout={out!r} stderr={err!r}"
    line = error_line(err)
    assert_one_line(line, *needles)
    return line
