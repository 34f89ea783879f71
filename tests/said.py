"""Lines that session fixtures say (cluster timings): tests/conftest.py reports them as figures of the
next test that runs, so they reach the run's figures section from an xdist worker too (a worker's own
terminal output is not shown)."""

PENDING: list[str] = []


def say(line: str) -> None:
    """Print a fixture's line (shown with -s or on failure) and keep it for the next test's figures."""
    print("\n" + line, flush=True)
    PENDING.append(line)
