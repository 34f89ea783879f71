"""Lines that session fixtures say (cluster timings): tests/conftest.py reports them as figures of the
next test that runs, so they reach the run's figures section from an xdist worker too (a worker's own
terminal output is not shown)."""

PENDING: list[str] = []
