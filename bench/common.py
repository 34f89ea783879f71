"""Shared bits of the agents / inference / serving benchmarks: machine description, result output."""

from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024**2:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "load_avg_1m_at_start": round(load, 2)}


def machine_line(info: dict[str, Any]) -> str:
    """'<date>, N cores (<cpu>), load L at start' from :func:`machine`, the head of a bench section."""
    return f"{info['date']}, {info['cores']} cores ({info['cpu']}), load {info['load_avg_1m_at_start']} at start"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def emit(result: dict[str, Any], json_out: str | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")


def write_section(name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in
    docs/benchmarks.md with ``body`` (nothing happens when the markers are missing)."""
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin in text and end in text:
        path.write_text(text[: text.index(begin)] + f"{begin}\n{body}\n" + text[text.index(end):])
