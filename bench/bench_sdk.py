"""SDK and CLI overhead, side by side with Ray's own tools, in one run.

Measures (median of N):
- start-up: `rlfleet --help` vs `ray --help`; `rlfleet runs --json` vs `ray job list` (same cluster);
- submission: rlfleet submit_run() of a trivial run vs Ray's JobSubmissionClient.submit_job() of
  `python -c pass`, both on the local target: submit→RUNNING and submit→SUCCEEDED.
Writes the table into docs/benchmarks.md between the "sdk" markers.

Usage: .venv/bin/python bench/bench_sdk.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="rlfleet-bench-")
    os.environ["RLFLEET_HOME"] = home
    os.environ["XDG_CONFIG_HOME"] = home + "/cfg"
    env = dict(os.environ)

    from rlfleet import RunSpec, RunStatus, submit_run
    from rlfleet.local import ensure_local_up, local_down

    target = ensure_local_up()
    token = target.token()
    rows: list[tuple[str, float, float]] = []
    try:
        rows.append(
            (
                "CLI `--help`",
                timed([str(BIN / "rlfleet"), "--help"], env, args.repeat),
                timed([str(BIN / "ray"), "--help"], env, args.repeat),
            )
        )
        ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": target.token_source.split(":", 1)[1]}
        rows.append(
            (
                "list jobs/runs",
                timed([str(BIN / "rlfleet"), "runs", "--json"], env, args.repeat),
                timed([str(BIN / "ray"), "job", "list", "--address", target.ray_address], ray_env, args.repeat),
            )
        )

        # Ray reads its auth settings when it is imported
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = target.token_source.split(":", 1)[1]
        from ray.job_submission import JobStatus, JobSubmissionClient

        ray_client = JobSubmissionClient(target.ray_address)

        from rlfleet.provisioners.external import target_from

        # the same head as an unsupervised 'ray' target: submit_run goes straight to Ray's Jobs API,
        # as every submission did before the run queue (docs/scale-out.md)
        # (its own artifact root: the local supervisor's heartbeat in the local root would make a 'ray'
        # target there supervised, and its runs would go through the queue too)
        direct = target_from("bench-direct", address=target.ray_address,
                             token_file=target.token_source.split(":", 1)[1],
                             artifact_root=target.artifact_root.rstrip("/") + "/bench-direct")

        def ours(tgt: object = None) -> tuple[float, float]:
            t0 = time.perf_counter()
            run = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 100}, resources={"cpus": 0.5}),
                             target=tgt)  # type: ignore[arg-type]
            t_run = None
            while True:
                st = run.status()
                if st is RunStatus.RUNNING and t_run is None:
                    t_run = time.perf_counter() - t0
                if st.is_terminal():
                    assert st is RunStatus.SUCCEEDED, run.failure_reason()
                    t_end = time.perf_counter() - t0
                    return (t_run if t_run is not None else t_end), t_end
                time.sleep(0.05)

        def theirs() -> tuple[float, float]:
            t0 = time.perf_counter()
            jid = ray_client.submit_job(entrypoint="python -c pass", entrypoint_num_cpus=0.5)
            t_run = None
            while True:
                st = ray_client.get_job_status(jid)
                if st == JobStatus.RUNNING and t_run is None:
                    t_run = time.perf_counter() - t0
                if st.is_terminal():
                    t_end = time.perf_counter() - t0
                    return (t_run if t_run is not None else t_end), t_end
                time.sleep(0.05)

        ours()  # warm-up both (first job pays for the runtime env agent)
        theirs()
        o = [ours() for _ in range(args.repeat)]
        d = [ours(direct) for _ in range(args.repeat)]
        t = [theirs() for _ in range(args.repeat)]
        rows.append(("submit → RUNNING", statistics.median(x[0] for x in o), statistics.median(x[0] for x in t)))
        rows.append(("submit → RUNNING, no queue (same head as a `ray` target)",
                     statistics.median(x[0] for x in d), statistics.median(x[0] for x in t)))
        rows.append(("submit → SUCCEEDED", statistics.median(x[1] for x in o), statistics.median(x[1] for x in t)))
        del token
    finally:
        local_down()

    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; median of {args.repeat}; local target (Ray head in a private netns).",
        "The rlfleet run is a real `random`-agent train run (100 env steps, writes spec, metrics and manifest);",
        "on the local target it goes through the run queue and its supervisor, as a `ray` target straight to Ray;",
        "Ray's is `python -c pass` through JobSubmissionClient.",
        "",
        "| what | rlfleet | Ray's own tool | ratio (rlfleet / Ray) |",
        "|---|---:|---:|---:|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {a / b:.2f} |")
    section = "\n".join(lines)
    print(section)
    write_section("sdk", section)
    return 0


def write_section(name: str, body: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## SDK and CLI overhead (bench/bench_sdk.py)\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
