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
