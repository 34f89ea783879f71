"""The SDK <-> runtime contract on the real local target: the run acts on the envelope alone.

The submitting machine and the cluster are different machines: nothing the run does may depend
on the submitter's paths. These tests take the submitter's files away right after submitting.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest

from rlfleet import RunSpec, RunStatus, submit_run
from rlfleet.errors import RlfleetError

from .test_local_runs import _write_env_project

pytestmark = pytest.mark.integration


def test_bring_your_own_env_with_requirements_runs_after_the_code_dir_is_gone(local_cluster, tmp_path,
                                                                             make_wheel) -> None:
    """Bug (issue 9): the run re-validated the spec on the cluster and failed with
    "code: '...' is not a directory on this machine" once the submitter's directory was gone."""
    proj = _write_env_project(tmp_path, name="my_project", reward_module="corridor_rewards")
    make_wheel(proj / "wheels", "corridor_rewards", "1.0", "def reward(done):\n    return 1.0 if done else -0.01\n")
    (proj / "requirements.txt").write_text("./wheels/corridor_rewards-1.0-py3-none-any.whl\n")
    spec = RunSpec(kind="train", agent="random", env="corridor_env:Corridor-v0", env_kwargs={"length": 3},
                   code=str(proj), requirements="requirements.txt", budget={"steps": 300}, name="byo-gone")
    run = submit_run(spec)
    shutil.rmtree(proj)  # the submitting machine's copy is gone; the cluster has its own
    assert run.wait(timeout=300) is RunStatus.SUCCEEDED, run.failure_reason()
    manifest = run.artifacts().verify()
    assert manifest.extra["env"] == "corridor_env:Corridor-v0"
    assert run.metrics()[-1]["step"] >= 300
    assert run.spec.code == str(proj)  # the spec is recorded as submitted


def test_a_requirement_that_cannot_install_fails_fast_with_pips_error(local_cluster, tmp_path) -> None:
    proj = tmp_path / "proj"
    (proj / "wheels").mkdir(parents=True)
    (proj / "wheels" / "broken-1.0-py3-none-any.whl").write_bytes(b"this is not a zip file")
    (proj / "sim.py").write_text("")
    run = submit_run(RunSpec(kind="train", agent="random", code=str(proj), budget={"steps": 100},
                             requirements=["./wheels/broken-1.0-py3-none-any.whl"]))
    assert run.wait(timeout=180) is RunStatus.FAILED
    reason = run.failure_reason()
    assert reason.startswith("ERROR:"), reason  # pip's own first error line
    assert "broken-1.0-py3-none-any.whl" in reason and "\n" not in reason
    info = run.info()
    assert info["wall_time_s"] is None or info["wall_time_s"] < 60


def _status(url: str, token: str | None, body: bytes | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_a_deployment_has_its_own_token_never_the_clusters(local_cluster) -> None:
    """Bug (issue 10.7): the serving token was the Ray cluster token, so anyone allowed to call a
    policy could submit jobs. The endpoint's token must open the policy and nothing else."""
    from rlfleet.targets import rlfleet_home

    train = submit_run(RunSpec(kind="train", agent="ppo", budget={"steps": 2048}, name="tok-src",
                               resources={"cpus": 0.5}))
    assert train.wait(timeout=300) is RunStatus.SUCCEEDED, train.failure_reason()
    dep = submit_run(RunSpec(kind="deploy", source=train.run_id, resources={"cpus": 0.5}))
    try:
        dep.result(timeout=180)
        ep = dep.endpoint()
        cluster_token = local_cluster.token()
        assert ep.token and ep.token != cluster_token
        body = b'{"observations": [[0.0, 0.0, 0.0, 0.0]]}'
        assert _status(ep.act_url, ep.token, body) == 200
        assert _status(ep.act_url, cluster_token, body) == 403  # the cluster's token does not call the policy
        assert _status(ep.act_url, None, body) == 401
        jobs = local_cluster.ray_address + "/api/jobs/"
        assert _status(jobs, ep.token) in (401, 403)  # the policy's token does not open the Ray API
        token_file = rlfleet_home() / "tokens" / f"deploy-{dep.run_id}"
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert token_file.parent.stat().st_mode & 0o777 == 0o700
        # the cluster never held the token: not in the job's environment, not in any artifact
        job_env = str(dep.info(refresh=True)) + str(dep._job().get("runtime_env"))
        assert ep.token not in job_env
        arts = dep.artifacts()
        for name in arts.list_files(include_manifest=False):
            assert ep.token.encode() not in arts.read_bytes(name, allow_incomplete=True), name
        assert ep.token not in arts.manifest().to_json()
    finally:
        assert dep.cancel() is True
    assert dep.wait(timeout=60) is RunStatus.CANCELLED
    assert not (rlfleet_home() / "tokens" / f"deploy-{dep.run_id}").exists()  # revoked
    with pytest.raises(RlfleetError, match="no token for deployment"):
        dep.endpoint()
