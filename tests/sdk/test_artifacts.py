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
    path = store.run("rl-tamper").path("policy.onnx")
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


# -- the commit point is atomic (issue 10 item 4) ----------------------------------------------

_FULL_DISK_CHILD = """
import resource, signal, sys
from rlfleet.artifacts import ArtifactStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
run = ArtifactStore(sys.argv[1], retries=2, backoff_s=0.01).run("rl-full")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    run.commit()
except Exception as err:
    print(type(err).__name__, err, file=sys.stderr)
    sys.exit(3)
"""


def test_manifest_write_that_dies_midway_leaves_no_manifest(tmp_path) -> None:
    """A real partial write (file size limit: the first 4096 bytes land, then EFBIG) during commit."""
    import subprocess
    import sys

    store = ArtifactStore(f"file://{tmp_path}/root")
    run = store.run("rl-full")
    for i in range(60):  # the manifest lists 60 files: ~7 KiB, larger than the limit
        run.write_bytes(f"checkpoints/part_{i:03d}.bin", b"x" * 10)
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, store.root_uri], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3 and "StoreUnavailable" in out.stderr, out.stderr
    fresh = ArtifactStore(f"file://{tmp_path}/root").run("rl-full")
    assert not fresh.is_complete()  # no truncated manifest.json: the run is simply incomplete
    with pytest.raises(IncompleteRunError):
        fresh.manifest()
    leftovers = [p.name for p in (tmp_path / "root" / "runs" / "rl-full").iterdir() if not p.is_dir()]
    assert leftovers == []  # nor a temporary file left behind
    fresh.commit()  # with room again, the commit succeeds
    assert len(ArtifactStore(f"file://{tmp_path}/root").run("rl-full").verify().files) == 60


def test_readers_never_see_a_partial_manifest_while_it_is_written(tmp_path) -> None:
    import threading

    store = ArtifactStore(f"file://{tmp_path}/root")
    run = store.run("rl-busy")
    for i in range(300):
        run.write_bytes(f"f/{i:04d}.bin", b"%d" % i)
    run.commit()
    stop = threading.Event()
    seen = {"ok": 0, "bad": []}

    def reader() -> None:
        while not stop.is_set():
            try:
                store.run("rl-busy").manifest()
                seen["ok"] += 1
            except (TamperedRunError, IncompleteRunError) as err:
                seen["bad"].append(str(err)[:120])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(15):
            run.commit()  # rewrites the commit point while the reader polls it
    finally:
        stop.set()
        t.join()
    assert seen["ok"] > 0 and seen["bad"] == []


def test_delete_removes_the_manifest_before_any_file(store: ArtifactStore, monkeypatch) -> None:
    """While a run is being deleted, no reader may see a committed run with files missing."""
    run = store.run("rl-old")
    for rel in ("spec.json", "metrics.jsonl", "checkpoints/step_1.pt", "policy.onnx"):
        run.write_bytes(rel, b"data of " + rel.encode())
    run.commit()
    fs = store.fs
    real_rm, real_rm_file = fs.rm, getattr(fs, "rm_file", None)
    states: list[bool] = []

    def check(path) -> None:
        paths = path if isinstance(path, list) else [path]
        if any(not str(p).rstrip("/").endswith(MANIFEST) for p in paths):
            reader = ArtifactStore(store.root_uri, storage_options={**store.storage_options,
                                                                    "skip_instance_cache": True})
            states.append(reader.run("rl-old").is_complete())

    def rm(path, *a, **kw):
        check(path)
        return real_rm(path, *a, **kw)

    monkeypatch.setattr(fs, "rm", rm)
    if real_rm_file is not None:
        monkeypatch.setattr(fs, "rm_file", lambda path, *a, **kw: (check(path), real_rm_file(path, *a, **kw))[1])
    run.delete()
    assert states and not any(states), states  # every data deletion happened after the manifest was gone
    assert store.list_run_ids() == []


def test_retry_budget_is_a_time_budget(tmp_path) -> None:
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ArtifactStore(
        "s3://bucket/prefix", retry_s=1.5, backoff_s=0.05, max_backoff_s=0.2,
        storage_options={"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "key": "x", "secret": "y",
                         "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}},
    )
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"over \d+\.\d s"):
        store.run("rl-x").write_bytes("spec.json", b"{}")
    took = time.monotonic() - t0
    assert 1.2 < took < 6, took


def test_metrics_segments_and_the_single_file_read_the_same(tmp_path) -> None:
    from rlfleet.artifacts import METRICS, metrics_segment

    store = ArtifactStore(str(tmp_path))
    rows = [{"step": i} for i in range(20)]

    def lines(a: int, b: int) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows[a : b + 1])

    old = store.run("rl-old")  # a run from before segments: one metrics.jsonl
    old.write_text(METRICS, lines(0, 19))
    assert list(old.iter_metrics()) == rows
    live = store.run("rl-live")  # a running run: segments, one merged range overlapping small ones
    for a, b in ((0, 3), (4, 7), (0, 7), (8, 8), (9, 12), (13, 13)):
        live.write_text(metrics_segment(a, b), lines(a, b))
    assert list(live.iter_metrics()) == rows[:14]
    live.write_text(metrics_segment(16, 19), lines(16, 19))  # a gap (14-15 not visible yet): stop before it
    assert list(live.iter_metrics()) == rows[:14]
    live.write_text(METRICS, lines(0, 19))  # finished: the consolidated file wins
    assert list(live.iter_metrics()) == rows


def test_a_long_lived_reader_sees_new_metrics_segments(store: ArtifactStore) -> None:
    """E.g. a progress bar polling Run.metrics(): the reader's cached listing must not hide new rows."""
    from rlfleet.artifacts import METRICS, metrics_segment

    reader = store.run("rl-live")
    writer = ArtifactStore(store.root_uri, storage_options={**store.storage_options, "skip_instance_cache": True},
                           backoff_s=0.01).run("rl-live")
    writer.write_text("spec.json", "{}")
    assert list(reader.iter_metrics()) == []
    writer.write_text(metrics_segment(0, 1), '{"step": 1}\n{"step": 2}\n')
    assert [r["step"] for r in reader.iter_metrics()] == [1, 2]
    writer.write_text(metrics_segment(2, 2), '{"step": 3}\n')
    assert [r["step"] for r in reader.iter_metrics()] == [1, 2, 3]
    writer.write_text(METRICS, '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n')
    writer.delete_dir("metrics")
    assert [r["step"] for r in reader.iter_metrics()] == [1, 2, 3, 4]


def test_a_changed_cloud_environment_reaches_the_store(moto_reset: str, monkeypatch) -> None:
    """fsspec caches one S3 filesystem per set of arguments, with the endpoint and credentials the
    environment had when it was first used; a process whose AWS environment changes afterwards
    (rotated session credentials, another endpoint) must get a filesystem that uses the new one."""
    import boto3

    from rlfleet.artifacts import filesystem

    bucket = f"env-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("s3").put_object(Bucket=bucket, Key="rlfleet/x", Body=b"1")
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    fs, path = filesystem(f"s3://{bucket}/rlfleet", {})
    with pytest.raises(Exception):  # any connection error: nothing listens there
        fs.ls(path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_reset)
    fs, path = filesystem(f"s3://{bucket}/rlfleet", {})
    assert [p.rsplit("/", 1)[1] for p in fs.ls(path)] == ["x"]
