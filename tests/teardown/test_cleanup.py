"""Retention rules on real artifact stores: file:// and s3:// on the moto server."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import boto3
import pytest

import rlfleet.artifacts as artifacts_mod
from rlfleet.artifacts import ArtifactStore
from rlfleet.teardown import cleanup

NOW = datetime.now(timezone.utc)

# run id -> (age in days, spec, committed)
RUNS = {
    "t1": (60, {"kind": "train", "name": "cartpole"}, True),
    "t2": (45, {"kind": "train", "name": "cartpole"}, True),
    "t3": (40, {"kind": "train", "name": "cartpole"}, True),  # served by d1
    "t4": (35, {"kind": "train", "name": "cartpole"}, True),  # resumed by r1
    "t5": (1, {"kind": "train", "name": "cartpole"}, True),  # latest cartpole
    "d1": (10, {"kind": "deploy", "name": "cartpole-serve", "source": "t3"}, True),  # deployed
    "r1": (0, {"kind": "train", "name": "long", "resume_from": "t4"}, False),  # running
    "e1": (90, {"kind": "eval", "name": "old-eval", "source": "t1"}, True),  # latest of its name
    "e0": (95, {"kind": "eval", "name": "old-eval", "source": "t1"}, True),
    "p1": (70, {"agent": "dqn", "env": "CartPole-v1", "kind": "train"}, True),  # name from agent+env
    "p2": (65, {"agent": "dqn", "env": "CartPole-v1", "kind": "train"}, True),
}
ACTIVE = {"d1", "r1"}


def populate(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    for rid, (age, spec, committed) in RUNS.items():
        arts = store.run(rid)
        arts.write_text("spec.json", json.dumps(spec))
        arts.write_bytes("checkpoints/step_100.pt", b"x" * (1000 + len(rid)))
        arts.write_text("metrics.jsonl", '{"step": 1}\n')
        if committed:
            ts = (NOW - timedelta(days=age)).isoformat(timespec="seconds")
            monkeypatch.setattr(artifacts_mod, "_now", lambda ts=ts: ts)
            arts.commit()


def check_rules(store: ArtifactStore, fresh: ArtifactStore) -> None:
    plan = cleanup.plan_cleanup(store, older_than=cleanup.parse_age("30d"), active_run_ids=ACTIVE)
    removed = sorted(r.run_id for r in plan.remove)
    assert removed == ["e0", "p1", "t1", "t2"]
    reasons = {r.run_id: why for r, why in plan.keep}
    assert reasons["d1"] == "running or deployed" and reasons["r1"] == "running or deployed"
    assert reasons["t3"] == "used by active run d1" and reasons["t4"] == "used by active run r1"
    assert reasons["t5"] == "latest run named 'cartpole'"
    assert reasons["e1"] == "latest run named 'old-eval'"
    assert reasons["p2"] == "latest run named 'dqn-cartpole-v1'"
    expected = sum(store.run(r).size_bytes() for r in removed)
    assert plan.bytes_to_free == expected > 4 * 1000

    lines: list[str] = []
    freed = cleanup.apply_cleanup(store, plan, echo=lines.append)
    assert freed == expected and len(lines) == 4 and all(line.startswith("removed run") for line in lines)
    remaining = fresh.list_run_ids()
    assert remaining == sorted(set(RUNS) - set(removed))
    fresh.run("t3").verify()  # the deployed model's run is intact
    assert fresh.run("r1").exists("checkpoints/step_100.pt")

    # second pass with the same rule removes nothing
    again = cleanup.plan_cleanup(fresh, older_than=cleanup.parse_age("30d"), active_run_ids=ACTIVE)
    assert again.remove == []


def test_cleanup_rules_on_file_store(tmp_path, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}/root")
    populate(store, monkeypatch)
    # keep-last alone: 1 newest per name, actives and their sources still protected
    plan = cleanup.plan_cleanup(store, keep_last=1, active_run_ids=ACTIVE)
    assert sorted(r.run_id for r in plan.remove) == ["e0", "p1", "t1", "t2"]
    plan = cleanup.plan_cleanup(store, keep_last=3, active_run_ids=ACTIVE)
    assert sorted(r.run_id for r in plan.remove) == ["t1", "t2"]
    # both rules: older than 50 days AND beyond the newest 1
    plan = cleanup.plan_cleanup(store, older_than=cleanup.parse_age("50d"), keep_last=1, active_run_ids=ACTIVE)
    assert sorted(r.run_id for r in plan.remove) == ["e0", "p1", "t1"]
    # cluster unreachable: runs without a manifest and every deploy/in-flight source are kept
    plan = cleanup.plan_cleanup(store, older_than=cleanup.parse_age("1s"), active_run_ids=None)
    kept = {r.run_id: why for r, why in plan.keep}
    assert "r1" in kept and "t3" in kept and "t4" in kept
    assert sorted(r.run_id for r in plan.remove) == ["e0", "p1", "t1", "t2"]
    check_rules(store, ArtifactStore(f"file://{tmp_path}/root"))


@pytest.mark.integration
def test_cleanup_rules_on_moto_s3(moto_reset, monkeypatch):
    boto3.client("s3").create_bucket(Bucket="rlf-artifacts")
    opts = {"client_kwargs": {"endpoint_url": moto_reset}}
    store = ArtifactStore("s3://rlf-artifacts/rlfleet", storage_options=opts)
    populate(store, monkeypatch)
    fresh = ArtifactStore("s3://rlf-artifacts/rlfleet", storage_options={**opts, "skip_instance_cache": True})
    check_rules(store, fresh)
    # objects of removed runs are really gone from the bucket
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="rlf-artifacts").get("Contents", [])]
    assert not [k for k in keys if k.startswith(("rlfleet/runs/t1/", "rlfleet/runs/t2/"))]
    assert any(k.startswith("rlfleet/runs/t3/") for k in keys)


def test_rules_are_required_and_ages_parse():
    with pytest.raises(ValueError, match="retention rule"):
        cleanup.plan_cleanup(ArtifactStore("file:///nonexistent"), active_run_ids=set())
    assert cleanup.parse_age("30d") == timedelta(days=30)
    assert cleanup.parse_age("12h") == timedelta(hours=12)
    with pytest.raises(ValueError, match="30d"):
        cleanup.parse_age("thirty days")
