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
    # cluster unreachable: runs without a manifest, deploy runs and every run named as a source are kept
    plan = cleanup.plan_cleanup(store, older_than=cleanup.parse_age("1s"), active_run_ids=None)
    kept = {r.run_id: why for r, why in plan.keep}
    assert "r1" in kept and "t3" in kept and "t4" in kept and "e0" in kept["t1"]
    assert sorted(r.run_id for r in plan.remove) == ["e0", "p1", "t2"]
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


def _commit_aged(store: ArtifactStore, rid: str, spec: dict, days: float, monkeypatch: pytest.MonkeyPatch) -> None:
    arts = store.run(rid)
    arts.write_text("spec.json", json.dumps(spec))
    arts.write_bytes("checkpoints/step_100.pt", b"x" * 1000)
    ts = (NOW - timedelta(days=days)).isoformat(timespec="seconds")
    monkeypatch.setattr(artifacts_mod, "_now", lambda: ts)
    arts.commit()


def test_apply_rechecks_each_run_right_before_deleting_it(tmp_path, monkeypatch):
    import os

    store = ArtifactStore(f"file://{tmp_path}/root")
    for i, rid in enumerate(("a1", "a2", "a3", "a4", "a5")):
        _commit_aged(store, rid, {"kind": "train", "name": "cp"}, 50 - i, monkeypatch)
    _commit_aged(store, "new", {"kind": "train", "name": "cp"}, 1, monkeypatch)
    _commit_aged(store, "dep", {"kind": "deploy", "name": "srv", "source": "new"}, 40, monkeypatch)
    _commit_aged(store, "dep2", {"kind": "deploy", "name": "srv", "source": "new"}, 2, monkeypatch)
    killed = store.run("k1")  # a killed run, silent for 40 days
    killed.write_text("spec.json", json.dumps({"kind": "train", "name": "cp"}))
    old = (NOW - timedelta(days=40)).timestamp()
    os.utime(tmp_path / "root" / "runs" / "k1" / "spec.json", (old, old))

    plan = cleanup.plan_cleanup(store, older_than=cleanup.parse_age("30d"), active_run_ids=set())
    assert sorted(r.run_id for r in plan.remove) == ["a1", "a2", "a3", "a4", "a5", "dep", "k1"]

    # between the plan and the deletion: a deploy of a1 is submitted (its spec lands in the store),
    # k1 writes again, and the cluster now runs something that reads a2
    store.run("dep3").write_text("spec.json", json.dumps({"kind": "deploy", "name": "srv2", "source": "a1"}))
    killed.write_bytes("checkpoints/step_200.pt", b"y" * 10)
    answers = iter([{"x9", "a2"}, {"x9", "a2"}, {"x9", "a2"}, None, None, None, None])
    lines: list[str] = []
    calls: list[int] = []

    def ask_cluster() -> set[str] | None:
        calls.append(1)
        return next(answers)

    cleanup.apply_cleanup(store, plan, echo=lines.append, active_run_ids=ask_cluster)
    kept = {r.run_id: why for r, why in plan.keep}
    assert "dep3" in kept["a1"] and "a2" in kept and "changed since" in kept["k1"]
    # from the 4th run on the cluster stops answering: deploy runs are kept, plain old runs still go
    assert "cluster" in kept["dep"]
    assert sorted(r.run_id for r in plan.remove) == ["a3", "a4", "a5"]
    assert sorted(store.list_run_ids()) == ["a1", "a2", "dep", "dep2", "dep3", "k1", "new"]
    assert sum(line.startswith("removed run") for line in lines) == 3
    assert len(calls) == 4  # a2, a3, a4, a5; after the first silence the cluster is not asked again


def test_a_damaged_manifest_counts_as_none_and_keeps_its_spec(tmp_path, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}/root")
    _commit_aged(store, "src", {"kind": "train", "name": "cp"}, 60, monkeypatch)
    _commit_aged(store, "dep", {"kind": "deploy", "name": "srv", "source": "src"}, 50, monkeypatch)
    manifest = tmp_path / "root" / "runs" / "dep" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # e.g. bit rot, or an in-place write by an old version
    rec = cleanup.read_run(store, "dep")
    assert (rec.complete, rec.kind, rec.name, rec.reads_from) == (False, "deploy", "srv", ("src",))
    plan = cleanup.plan_cleanup(store, older_than=cleanup.parse_age("30d"), active_run_ids=None)
    kept = {r.run_id: why for r, why in plan.keep}
    assert "dep" in kept and "src" in kept and plan.remove == []
