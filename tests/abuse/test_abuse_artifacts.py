"""Run-side abuse: partial and damaged run directories in a real file:// artifact store are never
taken for complete runs -- not by 'rlfleet runs --stored', not by 'rlfleet artifacts', not by an
eval run's --from -- every refusal is one line naming the run, and reading changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlfleet.artifacts import ArtifactStore
from rlfleet.errors import ArtifactError, IncompleteRunError

from .conftest import Sandbox
from .harness import assert_cli_error, assert_one_line, count, run_cli, unchanged

SPEC = {"kind": "train", "env": "CartPole-v1", "agent": "ppo", "name": "cp"}


def _committed(store: ArtifactStore, run_id: str) -> Path:
    arts = store.run(run_id)
    arts.write_json("spec.json", SPEC)
    arts.write_bytes("policy.onnx", b"onnx-bytes")
    arts.write_text("metrics.jsonl", '{"step": 1}\n')
    arts.commit({"wall_time_s": 1.0})
    return Path(store.root_uri.removeprefix("file://")) / "runs" / run_id


def _partial(root: Path, run_id: str, files: dict[str, bytes]) -> Path:
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def store(sandbox: Sandbox) -> Iterator[dict[str, Any]]:
    """The sink target's store with one good run and every kind of partial/damaged one."""
    root = sandbox.art
    st = ArtifactStore(f"file://{root}")
    good = _committed(st, "rl-good")
    spec = json.dumps(SPEC).encode()
    _partial(root, "rl-nomanifest", {"spec.json": spec, "policy.onnx": b"x", "metrics.jsonl": b""})
    _partial(root, "rl-empty", {})
    _partial(root, "rl-zero-manifest", {"spec.json": spec, "manifest.json": b""})
    _partial(root, "rl-garbage-manifest", {"spec.json": spec, "manifest.json": b"\x00\xffnot json"})
    _partial(root, "rl-list-manifest", {"spec.json": spec, "manifest.json": b"[]"})
    _partial(root, "rl-files-list", {"spec.json": spec, "manifest.json": json.dumps(
        {"run_id": "rl-files-list", "created_at": "x", "files": []}).encode()})  # was AttributeError
    _partial(root, "rl-extra-list", {"spec.json": spec, "manifest.json": json.dumps(
        {"run_id": "rl-extra-list", "created_at": "x", "files": {}, "extra": [1]}).encode()})  # was AttributeError
    _partial(root, "rl-spec-list", {"spec.json": b"[1, 2]"})  # spec.json a list: was AttributeError
    _partial(root, "rl-manifest-dir", {"spec.json": spec, "manifest.json/x": b""})
    tampered = _committed(st, "rl-tampered")
    (tampered / "policy.onnx").write_bytes(b"changed after commit")
    missing = _committed(st, "rl-missing-file")
    (missing / "policy.onnx").unlink()
    assert good.is_dir()
    yield {"root": root}


INCOMPLETE = ["rl-nomanifest", "rl-empty", "rl-spec-list"]
DAMAGED = ["rl-zero-manifest", "rl-garbage-manifest", "rl-list-manifest", "rl-files-list", "rl-extra-list",
           "rl-manifest-dir"]


def test_runs_stored_never_lists_a_partial_run_as_complete(sandbox: Sandbox, store: dict[str, Any]) -> None:
    with unchanged(*sandbox.roots):
        rc, out, err = run_cli("runs --stored --json --target sink")
    assert rc == 0, err
    docs = {d["run_id"]: d for d in json.loads(out)}
    assert set(INCOMPLETE + DAMAGED) <= set(docs)
    for rid in INCOMPLETE + DAMAGED:
        count("artifacts")
        assert docs[rid]["complete"] is False, docs[rid]
    assert docs["rl-good"]["complete"] is True
    for rid in DAMAGED:
        assert docs[rid]["state"] == "damaged" and "manifest" in docs[rid]["problem"], docs[rid]


# run id -> what 'rlfleet artifacts' says: ("incomplete", None) or ("error", words)
ARTIFACTS_TABLE: list[tuple[str, str, list[str]]] = [
    ("rl-nomanifest", "incomplete", []),
    ("rl-spec-list", "incomplete", []),
    ("rl-empty", "error", ["rl-empty", "no artifacts"]),
    ("rl-zero-manifest", "error", ["rl-zero-manifest", "manifest"]),
    ("rl-garbage-manifest", "error", ["rl-garbage-manifest", "manifest"]),
    ("rl-list-manifest", "error", ["rl-list-manifest", "manifest"]),
    ("rl-files-list", "error", ["rl-files-list", "manifest"]),
    ("rl-extra-list", "error", ["rl-extra-list", "manifest"]),
    ("rl-manifest-dir", "error", ["rl-manifest-dir", "manifest"]),
    ("rl-tampered", "error", ["rl-tampered/policy.onnx", "does not match its manifest"]),
    ("rl-missing-file", "error", ["rl-missing-file", "missing", "policy.onnx"]),
    ("rl-absent", "error", ["rl-absent", "no artifacts"]),
]


@pytest.mark.parametrize(("run_id", "outcome", "needles"), ARTIFACTS_TABLE, ids=[r for r, _, _ in ARTIFACTS_TABLE])
def test_artifacts_command(sandbox: Sandbox, store: dict[str, Any], run_id: str, outcome: str,
                           needles: list[str]) -> None:
    count("artifacts")
    with unchanged(*sandbox.roots):
        rc, out, err = run_cli(f"artifacts {run_id} --json --target sink")
    if outcome == "incomplete":
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["complete"] is False and doc["verified"] is False
    else:
        assert_cli_error(rc, out, err, *needles)


@pytest.mark.parametrize("run_id", INCOMPLETE[:1] + DAMAGED + ["rl-tampered", "rl-missing-file"])
def test_sdk_never_reads_a_partial_run_as_committed(sandbox: Sandbox, store: dict[str, Any], run_id: str) -> None:
    count("artifacts")
    arts = ArtifactStore(f"file://{store['root']}").run(run_id)
    with unchanged(*sandbox.roots):
        with pytest.raises(ArtifactError) as ei:
            arts.verify()
    assert_one_line(str(ei.value), run_id)
    if run_id in INCOMPLETE:
        assert isinstance(ei.value, IncompleteRunError)


@pytest.mark.parametrize("run_id", ["rl-nomanifest", "rl-empty", "rl-garbage-manifest", "rl-absent"])
def test_eval_from_a_partial_run_is_refused(sandbox: Sandbox, store: dict[str, Any], run_id: str) -> None:
    """An eval run names its source: a run that never committed is refused before submitting."""
    count("artifacts")
    with unchanged(*sandbox.roots):
        rc, out, err = run_cli(f"run eval --from {run_id} --target sink")
    assert_cli_error(rc, out, err, "source", run_id)
