"""StoredRun: the one reader of a stored run (spec, manifest, state, times, size), on a real
file:// store and on S3 (moto server); and the readers built on it (runs --stored, cleanup)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from rlfleet.artifacts import MANIFEST, ArtifactStore
from rlfleet.errors import ArtifactError
from rlfleet.spec import RunSpec
from rlfleet.stored_run import COMPLETE, DAMAGED, INCOMPLETE, read_stored_run, stored_runs
from rlfleet.teardown import cleanup

from .test_artifacts import _s3_store

SPEC = {"kind": "eval", "env": "CartPole-v1", "agent": "ppo", "source": "s3://b/p/runs/rl-src", "seed": 3}


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path}/root", backoff_s=0.01)
    return _s3_store(request.getfixturevalue("moto_reset"))


def test_a_complete_run_reads_whole(store: ArtifactStore) -> None:
    arts = store.run("rl-done")
    arts.write_json("spec.json", SPEC)
    arts.write_bytes("policy.onnx", b"p" * 1000)
    manifest = arts.commit(extra={"wall_time_s": 12.5, "gpu_hours": 0.25})

    run = read_stored_run(store, "rl-done")
    assert (run.state, run.complete, run.problem) == (COMPLETE, True, None)
    assert run.manifest == manifest and run.extra == {"wall_time_s": 12.5, "gpu_hours": 0.25}
    assert (run.kind, run.name, run.label) == ("eval", None, "ppo-cartpole-v1")
    assert run.reads_from == ("rl-src",)
    assert run.files == ("manifest.json", "policy.onnx", "spec.json")
    assert run.created == datetime.fromisoformat(manifest.created_at)
    # every byte in the store: the two files plus the manifest itself
    assert run.size_bytes() == manifest.total_bytes + len(manifest.to_json())
    spec = run.run_spec()
    assert isinstance(spec, RunSpec) and spec.seed == 3 and spec.label == run.label


def test_a_partial_run_is_reported_as_such_and_never_counted_complete(store: ArtifactStore) -> None:
    arts = store.run("rl-partial")
    arts.write_json("spec.json", {**SPEC, "name": "half"})
    arts.write_bytes("checkpoints/step_100.pt", b"c" * 50)  # the writer died before commit()

    run = read_stored_run(store, "rl-partial")
    assert (run.state, run.complete, run.manifest, run.extra) == (INCOMPLETE, False, None, {})
    assert run.name == "half" and run.label == "half"  # its spec is still read, unchecked
    assert run.exists and MANIFEST not in run.files
    # no commit time: its age is the newest file's time
    assert run.created is not None and abs((datetime.now(timezone.utc) - run.created).total_seconds()) < 120
    # not complete for any reader built on StoredRun
    assert cleanup.read_run(store, "rl-partial").complete is False
    assert [r.complete for r in stored_runs(store)] == [False]


def test_partial_run_age_is_its_newest_file(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/root")
    arts = store.run("rl-old")
    arts.write_json("spec.json", SPEC)
    arts.write_bytes("metrics.jsonl", b"{}\n")
    old, newer = 1_600_000_000, 1_700_000_000
    os.utime(arts.path("spec.json"), (old, old))
    os.utime(arts.path("metrics.jsonl"), (newer, newer))
    assert read_stored_run(store, "rl-old").created == datetime.fromtimestamp(newer, tz=timezone.utc)


def test_an_empty_run_directory_is_incomplete_and_absent(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/root")
    (tmp_path / "root" / "runs" / "rl-empty").mkdir(parents=True)
    run = read_stored_run(store, "rl-empty")
    assert (run.state, run.exists, run.spec, run.created) == (INCOMPLETE, False, None, None)


def test_a_garbled_manifest_is_damaged_with_a_clear_problem(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/root")
    arts = store.run("rl-rot")
    arts.write_json("spec.json", SPEC)
    arts.commit()
    manifest = tmp_path / "root" / "runs" / "rl-rot" / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:30])  # bit rot, an in-place write cut short

    run = read_stored_run(store, "rl-rot")
    assert (run.state, run.complete, run.manifest) == (DAMAGED, False, None)
    assert run.problem is not None and "rl-rot/manifest.json is not a valid manifest" in run.problem
    assert run.kind == "eval"  # the spec of a damaged run is still readable (cleanup keeps its sources)
    assert cleanup.read_run(store, "rl-rot").complete is False


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", ["spec.json is not JSON", "another tool"]),  # a foreign binary
        (b"[1, 2, 3]", ["spec.json holds a list", "not a run spec"]),
        (b'{"model": "resnet50", "epochs": 3}', ["spec.json is not a valid run spec", "kind"]),  # foreign JSON
    ],
    ids=["binary", "list", "foreign-json"],
)
def test_a_foreign_or_garbled_spec_gives_one_clear_error(tmp_path: Path, content: bytes, words: list[str]) -> None:
    store = ArtifactStore(f"file://{tmp_path}/root")
    arts = store.run("rl-foreign")
    arts.write_bytes("spec.json", content)
    arts.commit()

    run = read_stored_run(store, "rl-foreign")
    assert run.complete  # the manifest commits the files as they are
    with pytest.raises(ArtifactError) as err:
        run.run_spec()
    msg = str(err.value)
    assert "\n" not in msg and "rl-foreign" in msg, msg
    for w in words:
        assert w in msg, msg


def test_a_spec_changed_after_the_commit_is_not_read(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/root")
    arts = store.run("rl-t")
    arts.write_json("spec.json", SPEC)
    arts.commit()
    Path(arts.path("spec.json")).write_text('{"kind": "deploy"}')
    run = read_stored_run(store, "rl-t")
    assert run.spec is None and run.kind is None
    assert run.spec_problem is not None and "does not match its manifest" in run.spec_problem
