"""aws and gcp targets are supervised (runs through the durable queue, ``max_restarts`` accepted)
while the head's ``rlfleet-supervisor`` unit (the cloud bootstrap installs it) keeps its heartbeat
fresh in the stack's bucket: ``s3://`` through a real moto server, ``gs://`` through the GCS
emulator. The real supervisor process announces itself through the bucket and withdraws on
SIGTERM. The unit on booted cloud nodes, a run restarted there: tests/conformance/test_cloud_supervisor.py."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

from rlfleet import RunSpec
from rlfleet.errors import SpecError
from rlfleet.provisioners import registry
from rlfleet.runqueue import FRESH_S, QueueStore
from rlfleet.runs import _submit
from rlfleet.targets import Target

from .test_supervisor_heartbeat import _supervised, start_supervisor


@pytest.fixture(params=["aws", "gcp"])
def cloud_root(request, monkeypatch) -> tuple[str, str]:
    """(kind, artifact root) in a fresh bucket of that cloud's local stand-in."""
    bucket = "rlfleet-sup-" + secrets.token_hex(4)
    if request.param == "aws":
        endpoint = request.getfixturevalue("moto_server")
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        return "aws", f"s3://{bucket}/rlfleet"
    request.getfixturevalue("gcs_emulator")  # sets STORAGE_EMULATOR_HOST for this process
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project="p", credentials=AnonymousCredentials()).create_bucket(bucket)
    return "gcp", f"gs://{bucket}/rlfleet"


def _target(kind: str, root: str) -> Target:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {"token": "anon"} if kind == "gcp" else {}
    return Target(name=f"{kind}-sup", kind=kind, ray_address=f"http://127.0.0.1:{port}", token_source="env:T",
                  artifact_root=root, storage_options=opts,
                  provisioner={"type": "pulumi", "project_dir": "/p", "stack": "s"})




def test_a_cloud_target_is_supervised_only_while_its_bucket_heartbeat_is_fresh(cloud_root) -> None:
    kind, root = cloud_root
    t = _target(kind, root)
    q = QueueStore(t.store())
    assert not _supervised(t)  # no heartbeat in the bucket
    with pytest.raises(SpecError) as err:
        _submit(RunSpec(kind="train", agent="random", budget={"steps": 10}, max_restarts=1), t, None)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"max_restarts: target '{kind}-sup' ({kind}) has no live run "
                                                "supervisor")
    assert f"{root}/queue/supervisor.json" in line and "'systemctl start rlfleet-supervisor'" in line
    assert "rlfleet up" in line  # a stack from before the unit: re-run up
    q.put_heartbeat({"beat": time.time() - FRESH_S - 5, "pid": 1, "host": "head"})
    assert not _supervised(t)  # a supervisor (or a head) gone a while ago
    q.put_heartbeat({"beat": time.time(), "pid": 1, "host": "head"})
    assert _supervised(t) and registry.may_queue(t)


def test_the_supervisor_announces_itself_through_the_bucket(cloud_root, tmp_path: Path) -> None:
    """The program the head's unit runs, with the bucket as its root and the machine's own cloud
    credentials (no storage options on its command line): its heartbeat makes the target
    supervised; SIGTERM (systemctl stop) withdraws it."""
    kind, root = cloud_root
    t = _target(kind, root)
    env = {k: v for k, v in os.environ.items() if k != "RLFLEET_STORAGE_OPTIONS"}
    proc = start_supervisor(t, root, tmp_path, poll=0.5, timeout=90, env=env)
    try:
        beat = QueueStore(t.store()).heartbeat() or {}
        assert beat["pid"] == proc.pid and beat["host"] == socket.gethostname()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"watching {root}/queue" in out, out
    assert QueueStore(t.store()).heartbeat() is None, "the heartbeat was left behind on SIGTERM"
    assert not _supervised(t)
