"""The deployment registry in a real file:// artifact store: commit point, races, version checks.
No cluster: these are the registry's own rules (tests/serving/test_local_serving.py drives them
end to end)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from rlfleet.artifacts import ArtifactStore
from rlfleet.deployments import (
    DeploymentError,
    Registry,
    check_name,
    onnx_rlfleet_metadata,
    version_from_run,
)

from .policies import CARTPOLE, argmax_onnx, other_space_onnx, write_policy_run


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(f"file://{tmp_path}/root")


def test_version_document_from_a_committed_run(store: ArtifactStore) -> None:
    write_policy_run(store, "rl-a", argmax_onnx())
    doc = version_from_run(store, "rl-a")
    manifest = json.loads(Path(store.root_path, "runs/rl-a/manifest.json").read_text())
    assert doc["policy_sha256"] == manifest["files"]["policy.onnx"]["sha256"]
    assert doc["policy_uri"].endswith("/runs/rl-a/policy.onnx")
    assert doc["spaces"] == CARTPOLE and doc["env"] == "CartPole-v1" and doc["source_run"] == "rl-a"


def test_metadata_is_read_without_onnx_and_matches_onnxruntime() -> None:
    import onnxruntime as ort

    data = other_space_onnx()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert onnx_rlfleet_metadata(data) == json.loads(sess.get_modelmeta().custom_metadata_map["rlfleet"])
    with pytest.raises(DeploymentError, match="no 'rlfleet' metadata"):
        onnx_rlfleet_metadata(b"\x08\x07garbage")


@pytest.mark.parametrize("case, match", [
    ("tampered", "fails its checksum"),
    ("no-parity", "no parity record"),
    ("incomplete", "is incomplete"),
    ("missing", "does not exist"),
])
def test_a_run_that_is_not_a_checked_policy_is_refused(store: ArtifactStore, case: str, match: str) -> None:
    if case != "missing":
        write_policy_run(store, "rl-x", argmax_onnx(), parity=case != "no-parity")
    run_dir = Path(store.root_path, "runs/rl-x")
    if case == "tampered":
        (run_dir / "policy.onnx").write_bytes(other_space_onnx())
    if case == "incomplete":
        (run_dir / "manifest.json").unlink()
    with pytest.raises(DeploymentError, match=match):
        version_from_run(store, "rl-x")


def test_state_commit_point_and_lost_race(store: ArtifactStore) -> None:
    reg = Registry(store, "cartpole")
    assert reg.state() is None
    s1 = reg.write_state(None, {"active": True, "live": 1}, "first")
    s2 = reg.write_state(s1, {"live": 2}, "second")
    assert (s1["seq"], s2["seq"], reg.state()["live"]) == (1, 2, 2)
    # a half-written temporary (a writer killed mid-write) is never read as a state
    Path(reg._path("state", "3.json.tmp-999-dead")).write_text('{"seq": 3, "liv')
    assert reg.state()["seq"] == 2
    # a writer that read state 1 and writes after state 2 committed loses, and changes nothing
    with pytest.raises(DeploymentError, match=r"changed meanwhile \(state 2 written by .*: second\)"):
        reg.write_state(s1, {"live": 9}, "stale writer")
    assert reg.state() == s2
    assert sorted(os.listdir(reg._path("state"))) == ["1.json", "2.json", "3.json.tmp-999-dead"]


def test_concurrent_writers_exactly_one_wins_each_seq(store: ArtifactStore) -> None:
    reg = Registry(store, "race")
    base = reg.write_state(None, {"active": True}, "base")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            reg.write_state(base, {"who": i}, f"writer {i}")
            results.append("won")
        except DeploymentError:
            results.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
    assert reg.state()["seq"] == 2 and [d["seq"] for d in reg.history()] == [1, 2]


def test_versions_are_numbered_and_immutable(store: ArtifactStore) -> None:
    write_policy_run(store, "rl-a", argmax_onnx())
    reg = Registry(store, "cartpole")
    doc = version_from_run(store, "rl-a")
    assert [reg.add_version(doc), reg.add_version(doc)] == [1, 2]
    assert not reg.create("versions/1.json", {"tampered": True})
    assert reg.version(1)["version"] == 1 and "tampered" not in reg.version(1)
    with pytest.raises(DeploymentError, match="has no version 7 \\(versions: 1, 2\\)"):
        reg.version(7)


@pytest.mark.parametrize("name", ["", "Cart", "-a", "a_b", "x" * 41, "../etc"])
def test_bad_names(name: str) -> None:
    with pytest.raises(DeploymentError, match="deployment name"):
        check_name(name)


def test_s3_create_is_conditional(moto_reset: str) -> None:
    """On s3:// the commit point is a conditional put (If-None-Match: *) on a real moto server: a
    second writer of the same seq loses instead of replacing the first one's document."""
    import boto3

    boto3.client("s3", endpoint_url=moto_reset).create_bucket(Bucket="reg")
    store = ArtifactStore("s3://reg/root", storage_options={"endpoint_url": moto_reset})
    reg = Registry(store, "cartpole")
    first = reg.write_state(None, {"active": True, "live": 1}, "first writer")
    assert not reg.create("state/1.json", {"seq": 1, "who": "second writer"})
    with pytest.raises(DeploymentError, match=r"changed meanwhile \(state 1 written by .*: first writer\)"):
        reg.write_state(None, {"live": 2}, "second writer")
    assert reg.state() == first and [d["seq"] for d in reg.history()] == [1]


def test_a_long_lived_reader_sees_states_other_machines_write(moto_reset: str) -> None:
    """The controller keeps one store for its whole life and polls the registry: a state another
    machine (the SDK) writes must show in its next listing, not be hidden by the filesystem's cached
    listing (s3fs, gcsfs cache directory listings; on the aws-node host a canary was never applied:
    'the controller did not apply state 2 in 120 s')."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_reset)
    s3.create_bucket(Bucket="reg")
    reader = Registry(ArtifactStore("s3://reg/root", storage_options={"endpoint_url": moto_reset}), "cp")
    assert reader.state() is None
    first = reader.write_state(None, {"active": True, "live": 1}, "first")
    assert reader.state() == first  # (the listing is cached now)
    second = {**first, "seq": 2, "live": 2, "why": "another machine"}
    s3.put_object(Bucket="reg", Key="root/deployments/cp/state/2.json", Body=json.dumps(second).encode())
    assert reader.state() == second
    assert [d["seq"] for d in reader.history()] == [1, 2]


@pytest.mark.skipif(os.geteuid() != 0, reason="writes as root into a store another user owns")
def test_root_writes_into_a_store_another_user_owns_as_that_user() -> None:
    """An admin (root) deploying to an on-prem store (the NAS directory, owned by the cluster's
    service user) creates the registry's directories and documents as the store's owner: the
    controller, running as that user, must add endpoint.json, status.json and state files there."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rlfleet-owned-"))  # pytest's tmp_path is 0700: nobody could enter
    try:
        base.chmod(0o755)
        _owned_store_checks(base / "root")
    finally:
        shutil.rmtree(base)


def _owned_store_checks(root: Path) -> None:
    import subprocess

    store = ArtifactStore(f"file://{root}")
    root.mkdir()
    os.chown(root, 65534, 65534)
    reg = Registry(store, "owned")
    reg.write_state(None, {"active": True}, "first")
    made = [root / "deployments", root / "deployments/owned", root / "deployments/owned/state",
            root / "deployments/owned/state/1.json"]
    assert [(p.stat().st_uid, p.stat().st_gid) for p in made] == [(65534, 65534)] * 4
    # the service user adds its own document next to it
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "touch",
                          str(root / "deployments/owned/endpoint.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("kind", "serve_ports", "placed"), [
    ("aws", (8600, 8601), True),
    ("gcp", (8600,), True),
    ("aws", (), False),  # a stack without deploy ports has no such resource
    ("onprem", (8600,), False),  # every on-prem node has its own TLS front
    ("local", (), False),
])
def test_the_controller_asks_for_the_cloud_heads_front(kind: str, serve_ports: tuple, placed: bool) -> None:
    """The controller job binds one of the TLS front's ports: on a cloud stack only the head has the
    front, so its submission asks for the head's rlfleet_serve_front resource, as a deploy run's does."""
    from rlfleet.deployments import controller_placement
    from rlfleet.stack_outputs import RAY_RESOURCE_SERVE_FRONT
    from rlfleet.targets import Target

    t = Target(name="t", kind=kind, ray_address="https://198.51.100.7:8443", token_source="env:T",
               artifact_root="s3://b/rlfleet", serve_ports=serve_ports)
    assert controller_placement(t) == ({RAY_RESOURCE_SERVE_FRONT: 1} if placed else None)
