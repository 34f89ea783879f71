"""A sampled request/response audit log of a policy server, as JSONL segments in the artifact store.

A sampled request becomes one line: ``ts`` (UTC, ISO 8601), ``deployment``, ``version``,
``replica``, ``latency_ms``, ``batch``, ``observations`` and ``actions`` (the first ``max_rows``
rows of the batch; ``truncated`` when there were more). The caller hands over only these
values: the server never passes headers, so no token or other header can reach the log.

Memory is bounded: at most ``max_entries`` sampled requests wait for the next flush (the oldest
are dropped and counted in ``dropped`` beyond that) and each keeps at most ``max_rows`` rows.
``flush()`` (called by the server's publisher thread every few seconds, and at shutdown) writes
the waiting lines as one new object ``<prefix>/<replica>-<seq>.jsonl``; objects are never
rewritten and each is written whole (a temp file renamed on file://, one PUT on object stores),
so a reader never sees half a segment. A store error keeps the lines for the next flush (still
within ``max_entries``) and never fails a request.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from rlfleet.artifacts import AUDIT_DIR

DEFAULT_RATE = 0.01
_SEGMENT = re.compile(r"(?P<replica>.+)-(?P<seq>\d{8})\.jsonl")


class AuditLog:
    def __init__(self, write: Callable[[str, str], None], *, deployment: str, version: str, replica: str,
                 rate: float = DEFAULT_RATE, prefix: str = AUDIT_DIR, max_entries: int = 10_000,
                 max_rows: int = 64, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"audit sampling rate {rate} must be within [0, 1]")
        self._write = write
        self.labels = {"deployment": deployment, "version": version, "replica": replica}
        self.rate = rate
        self.prefix = prefix.strip("/")
        self.max_rows = max_rows
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_entries)
        self._rng = random.Random(seed)  # noqa: S311 - sampling, not security
        self.max_entries = max_entries
        self._lock = threading.Lock()  # record() vs flush() swapping the pending lines
        self._flush_lock = threading.Lock()  # one writer at a time
        self.seq = 0
        self.sampled = 0
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None

    def record(self, obs: np.ndarray, actions: np.ndarray, latency_s: float) -> None:
        """Keep this request with probability ``rate`` (cheap when not sampled)."""
        if self.rate <= 0.0 or (self.rate < 1.0 and self._rng.random() >= self.rate):
            return
        n = len(obs)
        entry = {"ts": datetime.now(UTC).isoformat(timespec="microseconds"), **self.labels,
                 "latency_ms": round(latency_s * 1000.0, 4), "batch": n,
                 "observations": obs[: self.max_rows].tolist(), "actions": actions[: self.max_rows].tolist()}
        if n > self.max_rows:
            entry["truncated"] = True
        with self._lock:
            if len(self._pending) == self.max_entries:
                self.dropped += 1
            self._pending.append(entry)
            self.sampled += 1

    def flush(self) -> int:
        """Write the waiting lines as one segment; the number of lines written (0 on a store error)."""
        with self._flush_lock:
            with self._lock:
                lines, self._pending = self._pending, deque(maxlen=self.max_entries)
            if not lines:
                return 0
            rel = f"{self.prefix}/{self.labels['replica']}-{self.seq:08d}.jsonl"
            try:
                self._write(rel, "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in lines))
            except Exception as err:  # the audit log never fails the server; the lines wait for the next flush
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"
                with self._lock:  # back in front of the newer ones, still within max_entries
                    kept = deque(lines, maxlen=self.max_entries)
                    kept.extend(self._pending)
                    self.dropped += len(lines) + len(self._pending) - len(kept)
                    self._pending = kept
                return 0
            self.seq += 1
            self.written += len(lines)
            return len(lines)

    def stats(self) -> dict[str, Any]:
        return {"rate": self.rate, "sampled": self.sampled, "written": self.written, "segments": self.seq,
                "dropped": self.dropped, "pending": len(self._pending), "errors": self.errors,
                "last_error": self.last_error}


def read_audit(list_files: Callable[[], list[str]], read: Callable[[str], bytes],
               prefix: str = AUDIT_DIR) -> list[dict[str, Any]]:
    """Every line of every segment under ``prefix``, in (replica, sequence) order."""
    segs = []
    for rel in list_files():
        head, _, name = rel.rpartition("/")
        m = _SEGMENT.fullmatch(name)
        if head == prefix and m:
            segs.append((m["replica"], int(m["seq"]), rel))
    return [json.loads(line) for *_, rel in sorted(segs) for line in read(rel).decode().splitlines() if line]
