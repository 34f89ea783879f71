"""MetricsWriter on a real file:// store: rows stream as segments, merges keep the segment count
small, close() leaves one metrics.jsonl; readers see every row in order at every moment."""

from __future__ import annotations

import time

from rlfleet.artifacts import ArtifactStore
from rlfleet_agents.metrics import MetricsWriter


def test_segments_merge_and_consolidate(tmp_path) -> None:
    arts = ArtifactStore(f"file://{tmp_path}/root").run("rl-m")
    writer = MetricsWriter(arts, {"run_id": "rl-m"}, flush_every_s=0.005, fanout=4)
    most_segments = 0
    for i in range(600):
        writer.write({"step": i})
        if i % 5 == 0:
            time.sleep(0.002)
        if i % 50 == 49:
            seen = [r["step"] for r in arts.iter_metrics()]
            assert seen == list(range(len(seen)))  # in order, no gap, no duplicate, while it runs
            most_segments = max(most_segments, len(list((tmp_path / "root/runs/rl-m/metrics").glob("*.jsonl"))))
    deadline = time.monotonic() + 10
    while writer.flushed < 600 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r["step"] for r in arts.iter_metrics()] == list(range(600))
    writer.close()
    assert not (tmp_path / "root/runs/rl-m/metrics").exists()
    assert (tmp_path / "root/runs/rl-m/metrics.jsonl").read_text().count("\n") == 600
    assert [r["step"] for r in arts.iter_metrics()] == list(range(600))
    assert writer.failures == 0
    assert max(level for _, _, level in writer._segments) >= 1  # merges happened
    # fanout 4: at most 3 segments per level plus the ones whose deletion is pending (one group)
    print(f"most segments on disk at once: {most_segments}")
    assert 0 < most_segments <= 3 * 6 + 4


def test_a_short_random_run_does_not_connect_to_ray_for_metrics(tmp_path, monkeypatch, runner_cls) -> None:
    """Connecting a run's process to Ray for Prometheus metrics (import ray, ray.init) costs a short
    run a good part of its CPU, and a run that ends within Ray's 10 s export interval exports nothing
    anyway: the random baseline connects only once it has run METRICS_CONNECT_AFTER_S, or at once
    when RLFLEET_METRICS_LINGER_S asks for the final values to be scraped."""
    import signal
    import sys

    from rlfleet_agents import metrics, run

    calls: list[float] = []
    monkeypatch.setattr(metrics.RayMetrics, "_connect", lambda self: calls.append(time.monotonic()))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main() sets a SIGTERM handler
    monkeypatch.setattr(sys, "path", list(sys.path))  # and puts its working directory on sys.path
    env = runner_cls(tmp_path).env("rl-short", {"kind": "train", "agent": "random", "budget": {"steps": 5}})
    for k, v in {**env, "RAY_ADDRESS": "127.0.0.1:1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RLFLEET_METRICS_LINGER_S", raising=False)
    assert run.main([]) == 0
    time.sleep(0.2)
    assert calls == [], "a 5-step random run connected to Ray for its metrics"
    time.sleep(metrics.METRICS_CONNECT_AFTER_S)
    assert calls == [], "the run had ended: its metrics connection was due later, and is never made"
    # a writer that lives past the delay connects; with a linger it connects at once
    arts = ArtifactStore(f"file://{tmp_path}/root").run("rl-long")
    t0 = time.monotonic()
    w = MetricsWriter(arts, {"run_id": "rl-long"}, ray_connect_after_s=0.3)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert calls and calls[0] - t0 >= 0.3
    w.close()
    calls.clear()
    monkeypatch.setenv("RLFLEET_METRICS_LINGER_S", "0.1")
    t0 = time.monotonic()
    w = MetricsWriter(arts, {"run_id": "rl-long"}, ray_connect_after_s=30)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert calls and calls[0] - t0 < 5
    w.ray.ready.set()
    w.close()


def _wait_flushed(writer: MetricsWriter, n: int) -> None:
    deadline = time.monotonic() + 10
    while writer.flushed < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.flushed == n


def test_a_restarted_attempt_keeps_the_rows_up_to_its_checkpoint(tmp_path) -> None:
    """A run restarted by its supervisor resumes from its own checkpoint in the same run directory:
    the killed attempt's rows up to the checkpoint stay, the rows it trained after it are replaced by
    the new attempt's. Before, the new attempt's segments overwrote the old ones of the same index
    and its metrics.jsonl held only its own rows (seen on the aws-node host: rows 4080-11168 of a
    run that started at 0)."""
    arts = ArtifactStore(f"file://{tmp_path}/root").run("rl-r")
    first = MetricsWriter(arts, {"run_id": "rl-r"}, flush_every_s=0.005, fanout=4)
    for step in range(0, 3000, 100):  # attempt 1: steps 0..2900, SIGKILLed (never closed)
        first.write({"step": step, "attempt": 1})
    _wait_flushed(first, 30)
    first._stop.set()

    second = MetricsWriter(arts, {"run_id": "rl-r"}, flush_every_s=0.005, fanout=4)
    assert second.carry_over(2048) == 21  # steps 0..2000
    # readers see the kept rows at once, then the new attempt's, in order, never the dropped ones
    assert [r["step"] for r in arts.iter_metrics()] == list(range(0, 2100, 100))
    for step in range(2148, 4000, 100):
        second.write({"step": step, "attempt": 2})
    _wait_flushed(second, 40)
    expect = [(s, 1) for s in range(0, 2100, 100)] + [(s, 2) for s in range(2148, 4000, 100)]
    assert [(r["step"], r["attempt"]) for r in arts.iter_metrics()] == expect
    second.close()
    assert [(r["step"], r["attempt"]) for r in arts.iter_metrics()] == expect
    assert not (tmp_path / "root/runs/rl-r/metrics").exists() and second.failures == 0

    # an attempt killed after its close() wrote metrics.jsonl (during export): the next one's
    # rows are not hidden behind that stale file
    third = MetricsWriter(arts, {"run_id": "rl-r"}, flush_every_s=0.005, fanout=4)
    assert third.carry_over(3000) == 30  # 0..2000 and 2148..2948
    third.write({"step": 3100, "attempt": 3})
    _wait_flushed(third, 31)
    assert not (tmp_path / "root/runs/rl-r/metrics.jsonl").exists()
    assert [r["attempt"] for r in arts.iter_metrics()][-2:] == [2, 3]
    third.close()
    assert [(r["step"], r["attempt"]) for r in arts.iter_metrics()] == [*expect[:30], (3100, 3)]
