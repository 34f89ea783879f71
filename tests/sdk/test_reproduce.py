"""Reproducibility: the manifest's provenance (kit version, packages, seed, device, code hash) and
``rlfleet run train --reproduce RUN_ID`` on the real local target."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlfleet import RunSpec, RunStatus, get_run, reproduce_run, submit_run
from rlfleet.artifacts import ArtifactStore
from rlfleet.errors import ArtifactError, TamperedRunError

RLFLEET = str(Path(sys.executable).parent / "rlfleet")
PPO = {"kind": "train", "agent": "ppo", "env": "CartPole-v1", "budget": {"steps": 4096}, "seed": 11,
       "resources": {"cpus": 1}}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RLFLEET, *args], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _outputs(onnx_bytes: bytes, obs: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, {"obs": obs})]


def _graph_bytes(onnx_bytes: bytes) -> bytes:
    """The model without its metadata (which names the run id)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    del model.metadata_props[:]
    return bytes(model.SerializeToString())


@pytest.mark.integration
def test_reproduce_gives_identical_onnx_outputs(local_cluster) -> None:
    first = submit_run(RunSpec(**PPO))
    other_seed = submit_run(RunSpec(**{**PPO, "seed": 12}))
    assert first.wait(timeout=600) is RunStatus.SUCCEEDED, first.failure_reason()
    res = cli("run", "train", "--reproduce", first.run_id, "--wait", "--json")
    assert res.returncode == 0, res.stderr
    again = get_run(json.loads(res.stdout)["run_id"])
    assert other_seed.wait(timeout=600) is RunStatus.SUCCEEDED, other_seed.failure_reason()
    a, b, c = (r.artifacts() for r in (first, again, other_seed))

    # the same spec, byte for byte; the new run says which run it reproduces
    assert b.read_bytes("spec.json") == a.read_bytes("spec.json")
    prov_a, prov_b = a.verify().provenance, b.verify().provenance
    assert prov_a is not None and prov_b is not None
    assert prov_b["reproduces"] == first.run_id and prov_a["reproduces"] is None
    assert prov_a["seed"] == 11 and prov_a["device"] == "cpu" and prov_a["code_sha256"] is None
    from rlfleet.envelope import kit_version

    assert prov_a["kit_version"] == kit_version()
    env_txt = a.read_text("environment.txt")
    assert prov_a["packages_sha256"] == hashlib.sha256(env_txt.encode()).hexdigest()
    import torch

    assert f"torch=={torch.__version__}" in env_txt.splitlines()
    assert prov_b["packages_sha256"] == prov_a["packages_sha256"]

    # identical policy outputs on a fixed batch; the graphs are identical too (only the run id in
    # the metadata differs); another seed gives another policy
    obs = np.random.default_rng(0).normal(0, 1, size=(256, 4)).astype(np.float32)
    pa, pb, pc = (x.read_bytes("policy.onnx") for x in (a, b, c))
    out_a, out_b, out_c = _outputs(pa, obs), _outputs(pb, obs), _outputs(pc, obs)
    assert all(np.array_equal(x, y) for x, y in zip(out_a, out_b, strict=True))
    assert _graph_bytes(pa) == _graph_bytes(pb)
    assert pa != pb  # the metadata names each run
    assert not np.array_equal(out_a[1], out_c[1])


def _fake_run(store: ArtifactStore, run_id: str, spec: dict | str, commit: bool) -> None:
    arts = store.run(run_id)
    arts.write_text("spec.json", spec if isinstance(spec, str) else json.dumps(spec))
    if commit:
        arts.commit(extra={})


@pytest.mark.integration
def test_reproduce_refusals_are_one_line(local_cluster) -> None:
    store = local_cluster.store()
    _fake_run(store, "rl-20200101-000000-aaaaa1", {"kind": "train", "agent": "random"}, commit=False)
    _fake_run(store, "rl-20200101-000000-aaaaa2", {"kind": "eval", "source": "rl-x"}, commit=True)
    _fake_run(store, "rl-20200101-000000-aaaaa3", "{not json", commit=True)
    before = set(store.list_run_ids())
    cases = {
        "rl-20200101-000000-aaaaa1": "is incomplete (no manifest.json)",
        "rl-20200101-000000-aaaaa2": "is not a train run (kind eval)",
        "rl-20200101-000000-aaaaa3": "spec.json is not JSON",
        "rl-nope": "no run 'rl-nope'",
    }
    for rid, msg in cases.items():
        res = cli("run", "train", "--reproduce", rid)
        assert res.returncode != 0 and msg in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = cli("run", "train", "--reproduce", "rl-nope", "--steps", "10", "--seed", "3")
    assert res.returncode != 0 and "drop --seed, --steps" in res.stderr, res.stderr
    res = cli("run", "eval", "--reproduce", "rl-nope")
    assert res.returncode != 0 and "--reproduce re-runs a train run" in res.stderr, res.stderr
    assert set(store.list_run_ids()) == before  # nothing submitted, nothing written


@pytest.mark.integration
def test_reproduce_reuses_the_stored_code_archive(local_cluster, tmp_path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helper.py").write_text("VALUE = 1\n")
    first = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 200}, code=str(proj),
                               resources={"cpus": 0.5}))
    assert first.wait(timeout=300) is RunStatus.SUCCEEDED, first.failure_reason()
    a = first.artifacts()
    prov = a.verify().provenance
    archive = a.read_bytes("code.zip")
    assert prov["code_sha256"] == hashlib.sha256(archive).hexdigest()
    import zipfile
    from io import BytesIO

    with zipfile.ZipFile(BytesIO(archive)) as zf:
        assert zf.read("helper.py") == b"VALUE = 1\n"
    # the user's directory changes (or goes): the reproduction still runs the stored code
    (proj / "helper.py").write_text("VALUE = 2\n")
    again = reproduce_run(first.run_id)
    assert again.wait(timeout=300) is RunStatus.SUCCEEDED, again.failure_reason()
    b = again.artifacts()
    assert b.verify().provenance["code_sha256"] == prov["code_sha256"]
    assert b.read_bytes("code.zip") == archive


def test_provenance_is_covered_by_the_manifest_integrity_rules(tmp_path) -> None:
    arts = ArtifactStore(str(tmp_path)).run("rl-1")
    arts.write_text("environment.txt", "numpy==2.0\n")
    good = {"kit_version": "0.1.0", "python": "3.12.0", "platform": "Linux-x86_64", "seed": 1, "device": "cpu",
            "torch_threads": 1, "deterministic": False, "code_sha256": None, "reproduces": None,
            "packages_sha256": hashlib.sha256(b"numpy==2.0\n").hexdigest()}
    with pytest.raises(ArtifactError, match=r"not committed: provenance\.packages_sha256 is not the sha256"):
        arts.commit(provenance={**good, "packages_sha256": "0" * 64})
    assert not arts.is_complete()  # nothing partial: no manifest
    arts.commit(provenance=good)
    assert ArtifactStore(str(tmp_path)).run("rl-1").verify().provenance == good
    # the packages list changed after the commit: the file check catches it
    (tmp_path / "runs/rl-1/environment.txt").write_text("numpy==9.9\n")
    with pytest.raises(TamperedRunError, match=r"environment\.txt does not match its manifest"):
        ArtifactStore(str(tmp_path)).run("rl-1").verify()
    # the manifest's provenance edited (hash, or a field dropped): the manifest is refused
    mpath = tmp_path / "runs/rl-1/manifest.json"
    for edit, msg in ((lambda d: d["provenance"].update(packages_sha256="0" * 64), "not the sha256"),
                      (lambda d: d["provenance"].pop("seed"), "provenance.seed is missing"),
                      (lambda d: d["provenance"].update(code_sha256="ab"), "code.zip")):
        doc = json.loads(mpath.read_text())
        doc["provenance"] = dict(good)
        edit(doc)
        mpath.write_text(json.dumps(doc))
        with pytest.raises(TamperedRunError, match=msg):
            ArtifactStore(str(tmp_path)).run("rl-1").manifest()
