"""The artifact store on file://, a real moto S3 server and a real GCS emulator (all on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import uuid

import pytest

from rlfleet.artifacts import MANIFEST, ArtifactStore, open_run
from rlfleet.errors import ArtifactError, IncompleteRunError, StoreUnavailable, TamperedRunError


def _s3_store(endpoint: str) -> ArtifactStore:
    import boto3

    bucket = f"art-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return ArtifactStore(
        f"s3://{bucket}/team-a", storage_options={"client_kwargs": {"endpoint_url": endpoint}}, backoff_s=0.01
    )


def _gs_store(endpoint: str) -> ArtifactStore:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = f"art-{uuid.uuid4().hex[:10]}"
    storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(bucket)
    return ArtifactStore(
        f"gs://{bucket}/team-a", storage_options={"token": "anon", "endpoint_url": endpoint}, backoff_s=0.01
    )


@pytest.fixture(params=["file", "s3", "gs"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path}/root", backoff_s=0.01)
    if request.param == "s3":
        return _s3_store(request.getfixturevalue("moto_reset"))
    return _gs_store(request.getfixturevalue("gcs_emulator"))


def test_round_trip_and_manifest(store: ArtifactStore) -> None:
    run = store.run("rl-20260101-000000-abcdef")
    run.write_json("spec.json", {"kind": "train"})
    run.write_text("metrics.jsonl", '{"step": 1}\n{"step": 2}\n')
    run.write_bytes("checkpoints/step_100.pt", b"\x00\x01" * 1000)
    run.write_bytes("policy.onnx", b"onnx-bytes")
    assert not run.is_complete()
    with pytest.raises(IncompleteRunError, match="incomplete"):
        run.read_bytes("policy.onnx")
    assert run.read_bytes("policy.onnx", allow_incomplete=True) == b"onnx-bytes"

    manifest = run.commit(extra={"env_steps": 100})
    assert set(manifest.files) == {"spec.json", "metrics.jsonl", "checkpoints/step_100.pt", "policy.onnx"}
    assert manifest.files["checkpoints/step_100.pt"].size == 2000

    fresh = store.run(run.run_id)  # a new reader sees the committed run
    assert fresh.is_complete()
    assert fresh.verify().extra == {"env_steps": 100}
    assert fresh.read_json("spec.json") == {"kind": "train"}
    assert [r["step"] for r in fresh.iter_metrics()] == [1, 2]
    assert store.list_run_ids() == [run.run_id]
    assert sorted(fresh.list_files()) == sorted([*manifest.files, MANIFEST])

    reopened = open_run(fresh.uri, storage_options=store.storage_options)
    assert reopened.read_bytes("policy.onnx") == b"onnx-bytes"


def test_changed_byte_is_detected(store: ArtifactStore) -> None:
    run = store.run("rl-tamper")
    run.write_bytes("policy.onnx", b"A" * 64)
    run.commit()
    # change one byte behind the store's back
    path = store._path("runs", "rl-tamper", "policy.onnx")
    with store.fs.open(path, "wb") as f:
        f.write(b"A" * 63 + b"B")
    fresh = store.run("rl-tamper")
    with pytest.raises(TamperedRunError, match="does not match its manifest"):
        fresh.read_bytes("policy.onnx")
    with pytest.raises(TamperedRunError):
        fresh.verify()


def test_missing_file_listed_in_manifest(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    run = store.run("rl-x")
    run.write_bytes("a.bin", b"1")
    run.write_bytes("b.bin", b"2")
    run.commit()
    (tmp_path / "runs" / "rl-x" / "b.bin").unlink()
    with pytest.raises(TamperedRunError, match="missing"):
        store.run("rl-x").verify()


def test_manifest_cannot_be_written_directly(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="commit"):
        ArtifactStore(str(tmp_path)).run("rl-x").write_bytes(MANIFEST, b"{}")


@pytest.mark.parametrize("bad", ["", "../etc", "a/b"])
def test_bad_run_ids(tmp_path, bad: str) -> None:
    with pytest.raises(ArtifactError):
        ArtifactStore(str(tmp_path)).run(bad)


def test_unreachable_store_fails_after_retries_and_writes_no_manifest(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ArtifactStore(
        "s3://bucket/prefix",
        retries=3,
        backoff_s=0.01,
        storage_options={
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
            "key": "x",
            "secret": "y",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
        },
    )
    run = store.run("rl-unreachable")
    with pytest.raises(StoreUnavailable) as exc:
        run.write_bytes("spec.json", b"{}")
    msg = str(exc.value)
    assert "s3://bucket/prefix" in msg and "after 3 attempts" in msg and "spec.json" in msg


def test_transient_failures_are_retried(tmp_path, monkeypatch) -> None:
    store = ArtifactStore(str(tmp_path), retries=4, backoff_s=0.001)
    run = store.run("rl-flaky")
    fs = store.fs
    real_open = fs.open
    calls = {"n": 0}

    def flaky_open(path, mode="rb", **kw):
        if "w" in mode and calls["n"] < 2:
            calls["n"] += 1
            raise ConnectionError("simulated throttling")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(fs, "open", flaky_open)
    run.write_bytes("spec.json", json.dumps({"ok": True}).encode())
    assert calls["n"] == 2
    assert json.loads(run.read_bytes("spec.json", allow_incomplete=True)) == {"ok": True}


def test_missing_driver_message(monkeypatch) -> None:
    with pytest.raises(ArtifactError, match=r"not a usable URI|needs the"):
        _ = ArtifactStore("nosuchproto://x/y").fs
