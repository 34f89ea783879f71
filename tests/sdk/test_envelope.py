"""What a cluster says when the envelope it is handed is not one it can run (RunEnvelope.from_env)."""

from __future__ import annotations

import json

import pytest

from rlfleet.envelope import ENV_VAR, EnvelopeError, RunEnvelope, kit_version
from rlfleet.spec import RunSpec


def _envelope(**overrides: object) -> dict[str, object]:
    spec = RunSpec.model_validate({"kind": "train", "agent": "random", "env": "CartPole-v1"})
    data = json.loads(RunEnvelope(run_id="R1", artifact_root="file:///tmp/x", spec=spec).model_dump_json())
    data.update(overrides)
    return data


def _read(data: object) -> RunEnvelope:
    return RunEnvelope.from_env({ENV_VAR: json.dumps(data)})


def test_a_valid_envelope_round_trips() -> None:
    assert _read(_envelope()).run_id == "R1"


@pytest.mark.parametrize("environ, needle", [
    ({}, f"missing {ENV_VAR}"),
    ({ENV_VAR: "{not json"}, "is not valid JSON"),
    ({ENV_VAR: "[1, 2]"}, "must be a JSON object"),
])
def test_an_unreadable_envelope_says_what_is_wrong(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(EnvelopeError, match=needle):
        RunEnvelope.from_env(environ)


def test_another_kit_version_names_both_versions() -> None:
    with pytest.raises(EnvelopeError) as err:
        _read(_envelope(kit_version="0.0.0-other"))
    assert "0.0.0-other" in str(err.value) and kit_version() in str(err.value)


def test_fields_from_a_newer_checkout_of_the_same_version_name_them_and_say_re_provision() -> None:
    """A checkout that adds a field without bumping the version used to get 'malformed (spec.x)'."""
    data = _envelope()
    data["spec"] = {**data["spec"], "max_widgets": 3}  # type: ignore[dict-item]
    data["brand_new"] = True
    with pytest.raises(EnvelopeError) as err:
        _read(data)
    msg = str(err.value)
    assert "spec.max_widgets" in msg and "brand_new" in msg
    assert "rlfleet up" in msg and "malformed" not in msg


def test_a_wrong_type_is_still_called_malformed_and_names_the_field() -> None:
    with pytest.raises(EnvelopeError, match=r"malformed \(run_id\)"):
        _read(_envelope(run_id=12))


def test_an_unknown_field_inside_an_optional_section_is_named_too() -> None:
    data = _envelope()
    data["spec"] = {**data["spec"], "kind": "deploy", "source": "R0",  # type: ignore[dict-item]
                    "deploy": {"name": "cp", "autoscale_widgets": 2}}
    with pytest.raises(EnvelopeError, match=r"spec\.deploy\.autoscale_widgets"):
        _read(data)
