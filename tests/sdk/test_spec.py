"""RunSpec: validation names the field and the allowed values; round trips are exact."""

from __future__ import annotations

import pytest

from rlfleet.errors import SpecError
from rlfleet.spec import Kind, RunSpec

BAD = [
    # (fields, substrings the message must contain)
    ({"kind": "trian"}, ["kind", "'train', 'eval' or 'deploy'", "trian"]),
    ({"kind": "train", "budget": {"steps": -5}}, ["budget.steps", "greater than 0", "-5"]),
    ({"kind": "train", "budget": {"steps": 10, "epochs": 3}}, ["budget.epochs", "unknown field", "steps, minutes"]),
    ({"kind": "train", "agnet": "ppo"}, ["agnet", "did you mean 'agent'"]),
    ({"kind": "train", "agent": "sac"}, ["agent", "'ppo', 'dqn' or 'random'", "sac"]),
    ({"kind": "eval"}, ["source", "--from RUN_ID"]),
    ({"kind": "deploy"}, ["source", "deploy run needs"]),
    ({"kind": "train", "source": "rl-1"}, ["source", "resume_from"]),
    ({"kind": "eval", "source": "rl-1", "resume_from": "rl-0"}, ["resume_from", "only train runs"]),
    ({"kind": "train", "env": "Cart Pole"}, ["env", "not a Gymnasium env id"]),
    ({"kind": "train", "seed": -1}, ["seed", "greater than or equal to 0"]),
    ({"kind": "train", "resources": {"gpus": -1}}, ["resources.gpus"]),
    ({"kind": "train", "name": "My Run"}, ["name", "lowercase"]),
    ({"kind": "train", "requirements": "requirements.txt"}, ["requirements", "give code=<dir>"]),
    ({"kind": "train", "requirements": ["./wheels/x.whl"]}, ["requirements", "give code=<dir>"]),
    ({"kind": "train", "requirements": ["--index-url=http://x"]}, ["requirements", "entry 0", "no pip options"]),
    ({"kind": "train", "code": ".", "requirements": "../reqs.txt"}, ["requirements", "no '..'"]),
    ({"kind": "train", "code": ".", "requirements": ["./../x.whl"]}, ["requirements", "no '..'"]),
    ({"kind": "deploy", "source": "rl-1", "deploy": {"port": 80}}, ["deploy.port", "greater than or equal to 1024"]),
    ({"kind": "train", "agent": "random", "config": {"lr": 1}}, ["config", "random"]),
    ({"kind": "eval", "source": "rl-1", "eval": {"episodes": 0}}, ["eval.episodes"]),
]


@pytest.mark.parametrize(("fields", "expect"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_specs_name_the_field(fields: dict, expect: list[str]) -> None:
    with pytest.raises(SpecError) as exc:
        RunSpec(**fields)
    msg = str(exc.value)
    assert msg.startswith("invalid run spec: ")
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"


# Facts about the submitting machine are checked by submit_run()'s preflight, never by RunSpec:
# the same spec must validate on the cluster, where the submitter's paths do not exist.
PREFLIGHT_BAD = [
    ({"kind": "train", "env": "CartPol-v1"}, ["env", "not a registered Gymnasium env", "did you mean 'CartPole-v1'"]),
    ({"kind": "train", "code": "/nonexistent/dir"}, ["code", "not a directory on this machine"]),
    ({"kind": "train", "code": "{tmp}", "requirements": "reqs.txt"}, ["requirements", "cannot read", "reqs.txt"]),
    ({"kind": "train", "code": "{tmp}", "requirements": ["./w/x.whl"]}, ["requirements", "'./w/x.whl' is not a file"]),
    ({"kind": "train", "code": "{tmp}", "requirements": "bad.txt"}, ["requirements", "no pip options", "bad.txt"]),
]


@pytest.mark.parametrize(("fields", "expect"), PREFLIGHT_BAD, ids=[str(b[0]) for b in PREFLIGHT_BAD])
def test_machine_facts_are_checked_by_preflight_not_by_the_spec(fields: dict, expect: list[str], tmp_path) -> None:
    from rlfleet.preflight import check_spec

    (tmp_path / "bad.txt").write_text("numpy\n-e .\n")
    fields = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in fields.items()}
    spec = RunSpec(**fields)  # schema only: valid anywhere
    with pytest.raises(SpecError) as exc:
        check_spec(spec)
    for part in expect:
        assert part in str(exc.value), f"{part!r} not in {str(exc.value)!r}"


def test_requirements_file_and_local_wheels_become_cluster_paths(tmp_path) -> None:
    from rlfleet.preflight import requirements

    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "sim-1.0-py3-none-any.whl").write_bytes(b"PK")
    (tmp_path / "requirements.txt").write_text("# deps\nnumpy>=1.20  # inline\n\n./wheels/sim-1.0-py3-none-any.whl\n")
    spec = RunSpec(kind="train", code=str(tmp_path), requirements="requirements.txt")
    wheel = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/wheels/sim-1.0-py3-none-any.whl"
    assert requirements(spec) == ["numpy>=1.20", wheel]
    assert requirements(RunSpec(kind="train")) is None


def test_spec_is_immutable() -> None:
    spec = RunSpec(kind="train")
    with pytest.raises(Exception):
        spec.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip(fmt: str, tmp_path) -> None:
    spec = RunSpec(
        kind="train",
        env="CartPole-v1",
        agent="ppo",
        seed=7,
        budget={"steps": 50_000},
        env_kwargs={"render_mode": None},
        config={"learning_rate": 0.001},
        tags={"team": "rl"},
        resources={"cpus": 2, "gpus": 0.5},
    )
    text = spec.to_yaml() if fmt == "yaml" else spec.to_json()
    back = RunSpec.from_yaml(text) if fmt == "yaml" else RunSpec.from_json(text)
    assert back == spec
    assert back.spec_hash() == spec.spec_hash()
    path = tmp_path / f"spec.{fmt}"
    path.write_text(text)
    assert RunSpec.from_file(path) == spec


def test_hash_changes_with_content() -> None:
    a = RunSpec(kind="train", seed=1)
    assert a.spec_hash() != RunSpec(kind="train", seed=2).spec_hash()
    assert a.spec_hash() == RunSpec(kind="train", seed=1).spec_hash()


def test_defaults_and_label() -> None:
    spec = RunSpec(kind="train")
    assert spec.kind is Kind.TRAIN and spec.env == "CartPole-v1" and spec.agent == "ppo"
    assert spec.label == "ppo-cartpole-v1"
    assert RunSpec(kind="eval", source="rl-1", name="my-eval").label == "my-eval"


def test_custom_env_ids_accepted(tmp_path) -> None:
    spec = RunSpec(kind="train", env="my_envs.grid:GridWorld-v0", code=str(tmp_path), env_kwargs={"size": 5})
    assert spec.env_kwargs == {"size": 5}


@pytest.mark.parametrize("text", ["kind: [unclosed", "- just\n- a list\n"])
def test_bad_yaml_is_a_spec_error(text: str) -> None:
    with pytest.raises(SpecError):
        RunSpec.from_yaml(text)


def test_missing_spec_file(tmp_path) -> None:
    with pytest.raises(SpecError, match="cannot read spec file"):
        RunSpec.from_file(tmp_path / "nope.yaml")


def test_unknown_ppo_hyperparameter_rejected() -> None:
    with pytest.raises(SpecError, match="config"):
        RunSpec(kind="train", agent="ppo", config={"learnin_rate": 0.1})
