"""RunSpec abuse: every bad spec (dict, YAML, JSON, file) fails with a SpecError of one line naming
the field; no other exception type escapes; nothing on disk changes."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlfleet.errors import SpecError
from rlfleet.spec import RunSpec

from .conftest import Sandbox
from .harness import assert_one_line, count, fuzz, unchanged

BASE = {"kind": "train", "env": "CartPole-v1", "agent": "ppo"}


def check_spec_error(sb: Sandbox, make: Any, *needles: str) -> str:
    count("runspec")
    with unchanged(*sb.roots):
        with pytest.raises(SpecError) as ei:
            make()
    msg = str(ei.value)
    assert_one_line(msg, *needles)
    return msg


def check_spec_or_one_line(sb: Sandbox, make: Any) -> None:
    """``make()`` gives a spec or raises one SpecError line (never another exception); nothing
    on disk changes either way."""
    count("runspec")
    with unchanged(*sb.roots):
        try:
            make()
        except SpecError as err:
            assert_one_line(str(err))


# (data, words the message must contain) -- the nasty cases, by hand
TABLE: list[tuple[Any, list[str]]] = [
    ({1: 2}, ["field names"]),  # non-string keys (YAML: `1: 2`) -> was a TypeError
    ({"kind": "train", None: 1}, ["field names"]),
    ([1, 2], ["mapping", "list"]),
    ("kind: train", ["mapping", "str"]),
    (None, ["mapping"]),
    ({}, ["kind", "Field required"]),
    ({"kind": "fly"}, ["kind", "'fly'"]),
    ({"kind": ["train"]}, ["kind"]),
    ({**BASE, "kind": "eval"}, ["source", "--from"]),
    ({**BASE, "source": "rl-1"}, ["source", "resume_from"]),
    ({**BASE, "kind": "eval", "source": "x", "resume_from": "y"}, ["resume_from"]),
    ({**BASE, "budget": "x"}, ["budget"]),
    ({**BASE, "budget": None}, ["budget"]),
    ({**BASE, "budget": {"steps": 0}}, ["budget.steps", "greater than 0"]),
    ({**BASE, "budget": {"steps": 1.5}}, ["budget.steps"]),
    ({**BASE, "budget": {"minutes": float("nan")}}, ["budget.minutes"]),
    ({**BASE, "budget": {"minutes": float("inf")}}, ["budget.minutes", "finite"]),  # was accepted
    ({**BASE, "budget": {"minutes": -1}}, ["budget.minutes"]),
    ({**BASE, "budget": {"step": 5}}, ["budget.step", "did you mean 'steps'"]),
    ({**BASE, "resources": {"cpus": float("nan")}}, ["resources.cpus"]),
    ({**BASE, "resources": {"cpus": float("inf")}}, ["resources.cpus"]),
    ({**BASE, "resources": {"gpus": -1}}, ["resources.gpus"]),
    ({**BASE, "resources": {"gpus": 65}}, ["resources.gpus"]),
    ({**BASE, "seed": -1}, ["seed"]),
    ({**BASE, "seed": 2**31}, ["seed"]),
    ({**BASE, "seed": float("nan")}, ["seed"]),
    ({**BASE, "seed": "abc"}, ["seed"]),
    ({**BASE, "name": "Bad Name"}, ["name", "lowercase"]),
    ({**BASE, "name": "-lead"}, ["name"]),
    ({**BASE, "name": "a" * 64}, ["name"]),
    ({**BASE, "env": "Cart Pole"}, ["env", "Gymnasium env id"]),
    ({**BASE, "env": ""}, ["env"]),
    ({**BASE, "env": "\x00"}, ["env"]),
    ({**BASE, "env": "../../etc/passwd"}, ["env"]),
    ({**BASE, "agent": "sac"}, ["agent", "'sac'"]),
    ({**BASE, "config": {"learnin_rate": 0.1}}, ["config.learnin_rate", "unknown"]),
    ({**BASE, "config": {"gamma": 2.0}}, ["config.gamma"]),
    ({**BASE, "config": {"gamma": "x"}}, ["config.gamma"]),
    ({**BASE, "config": {"hidden_sizes": [-1]}}, ["config.hidden_sizes"]),
    ({**BASE, "config": {"hidden_sizes": [10**30]}}, ["config.hidden_sizes"]),
    ({**BASE, "config": {1: 2}}, ["config"]),
    ({**BASE, "config": "lr=1"}, ["config"]),
    ({**BASE, "agent": "random", "config": {"x": 1}}, ["config", "random"]),
    ({**BASE, "env_kwargs": {"a": object()}}, ["env_kwargs", "JSON"]),
    ({**BASE, "env_kwargs": {"a": b"x"}}, ["env_kwargs"]),
    ({**BASE, "env_kwargs": {"a": float("nan")}}, ["env_kwargs", "JSON"]),  # NaN is not JSON: was accepted
    ({**BASE, "env_kwargs": {"a": float("inf")}}, ["env_kwargs", "JSON"]),
    ({**BASE, "env_kwargs": []}, ["env_kwargs"]),
    ({**BASE, "tags": {"a": 1}}, ["tags.a"]),
    ({**BASE, "tags": ["a"]}, ["tags"]),
    ({**BASE, "eval": []}, ["eval"]),
    ({**BASE, "eval": {"episodes": 0}}, ["eval.episodes"]),
    ({**BASE, "eval": {"policy_format": "pickle"}}, ["eval.policy_format", "'pickle'"]),
    ({**BASE, "deploy": {"port": 80}}, ["deploy.port"]),
    ({**BASE, "deploy": {"port": "x"}}, ["deploy.port"]),
    ({**BASE, "deploy": {"name": "UP"}}, ["deploy.name"]),
    ({**BASE, "deploy": {"hots": "0.0.0.0"}}, ["deploy.hots", "did you mean 'host'"]),
    ({**BASE, "source": 5, "kind": "eval"}, ["source"]),
    ({**BASE, "sed": 1}, ["sed", "did you mean 'seed'"]),
]


@pytest.mark.parametrize(("data", "needles"), TABLE, ids=[f"t{i}" for i in range(len(TABLE))])
def test_bad_dict(sandbox: Sandbox, data: Any, needles: list[str]) -> None:
    check_spec_error(sandbox, lambda: RunSpec.from_dict(data), *needles)


YAML_TABLE: list[tuple[str, list[str]]] = [
    ("kind: [", ["not valid YAML", "line 1"]),  # was several lines (PyYAML's caret drawing)
    ("kind: train\n  x: :", ["not valid YAML", "line 2"]),
    ("\x00", ["not valid YAML"]),
    ("!!python/object/apply:os.system [echo pwned]", ["not valid YAML"]),
    ("kind: train\nbudget: &a [*a]", ["budget"]),
    ("kind: !!binary aGVsbG8=", ["kind"]),
    ("- kind: train", ["mapping", "list"]),
    ("12", ["mapping", "int"]),
    ("", ["mapping"]),
    ("1: 2", ["field names"]),
    ("kind: train\nbudget: {steps: .inf}", ["budget.steps"]),
    ("kind: train\nbudget: {minutes: .inf}", ["budget.minutes"]),
    ("kind: train\nseed: 0x7fffffffff", ["seed"]),
    ("kind: train\n\tseed: 1", ["not valid YAML"]),
]


@pytest.mark.parametrize(("text", "needles"), YAML_TABLE, ids=[f"y{i}" for i in range(len(YAML_TABLE))])
def test_bad_yaml(sandbox: Sandbox, text: str, needles: list[str]) -> None:
    check_spec_error(sandbox, lambda: RunSpec.from_yaml(text), *needles)


FILE_TABLE: list[tuple[str, bytes | None, list[str]]] = [
    ("missing.yaml", None, ["cannot read spec file", "missing.yaml"]),
    ("bad.json", b"{kind: train}", ["not valid JSON"]),
    ("list.json", b"[]", ["mapping"]),
    ("binary.yaml", bytes(range(256)), ["spec file", "binary.yaml"]),
    ("latin1.yaml", "kind: tr\xe4in".encode("latin-1"), ["spec file", "latin1.yaml"]),
    ("nan.json", b'{"kind": "train", "budget": {"minutes": NaN}}', ["budget.minutes"]),
]


@pytest.mark.parametrize(("name", "content", "needles"), FILE_TABLE, ids=[n for n, _, _ in FILE_TABLE])
def test_bad_file(sandbox: Sandbox, tmp_path: Path, name: str, content: bytes | None, needles: list[str]) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    check_spec_error(sandbox, lambda: RunSpec.from_file(path), *needles)


def test_directory_as_spec_file(sandbox: Sandbox) -> None:
    check_spec_error(sandbox, lambda: RunSpec.from_file(sandbox.home), "cannot read spec file")


# -- generated: one field made wrong, the message must name it -----------------------------------

_word = st.from_regex(r"[a-z]{1,8}", fullmatch=True)  # never parses as a number or bool
_frac = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))
_junk = st.one_of(_word, st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(_word, st.integers(),
                                                                                          min_size=1, max_size=2))
_bad_slug = st.one_of(
    st.from_regex(r"[A-Z][a-z0-9]{0,10}", fullmatch=True),
    st.from_regex(r"[a-z]{1,5}[ _/.!@$%][a-z]{0,5}", fullmatch=True),
    st.from_regex(r"-[a-z0-9]{0,10}", fullmatch=True),
    st.text(alphabet=string.ascii_lowercase, min_size=64, max_size=80),
)
# field path -> strategy of values that are wrong for it
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "kind": _word.filter(lambda w: w not in ("train", "eval", "deploy")),
    "agent": _word.filter(lambda w: w not in ("ppo", "dqn", "random")),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31), _frac, _junk),
    "name": _bad_slug,
    "env": st.from_regex(r"[a-zA-Z]{0,4}[ !@#$%^&*(){}\[\]|;'\"<>?,][a-zA-Z0-9 ]{0,6}", fullmatch=True),
    "budget.steps": st.one_of(st.integers(max_value=0), _frac, _junk),
    "budget.minutes": st.one_of(st.floats(max_value=0), st.just(float("nan")), st.just(float("inf")), _junk),
    "resources.cpus": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1024.001), _junk),
    "resources.gpus": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=64.001), _junk),
    "eval.episodes": st.one_of(st.integers(max_value=0), st.integers(min_value=100_001), _junk),
    "eval.policy_format": _word.filter(lambda w: w not in ("onnx", "torch")),
    "deploy.port": st.one_of(st.integers(max_value=1023), st.integers(min_value=65536), _junk),
    "deploy.name": _bad_slug,
    "tags": st.one_of(_word, st.lists(_word, min_size=1)),
}


def _with(path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = dict(BASE)
    if "." in path:
        top, sub = path.split(".")
        data[top] = {sub: value}
    else:
        data[path] = value
    return data


@fuzz(60)
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda f: st.tuples(st.just(f), BAD_VALUES[f])))
def test_generated_wrong_field_is_named(sandbox: Sandbox, case: tuple[str, Any]) -> None:
    field, value = case
    check_spec_error(sandbox, lambda: RunSpec.from_dict(_with(field, value)), field)


@fuzz(20)
@given(st.from_regex(r"[a-z_]{2,12}", fullmatch=True).filter(lambda k: k not in RunSpec.model_fields))
def test_generated_unknown_field_is_named(sandbox: Sandbox, key: str) -> None:
    check_spec_error(sandbox, lambda: RunSpec.from_dict({**BASE, key: 1}), key, "unknown field")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_keys = st.one_of(st.sampled_from(sorted(RunSpec.model_fields)), st.text(max_size=6), st.integers(), st.none())


@fuzz(40)
@given(st.dictionaries(_keys, _json, max_size=5))
def test_generated_mapping_never_escapes(sandbox: Sandbox, data: dict[Any, Any]) -> None:
    """Arbitrary mappings: either a valid spec, or one SpecError line; never another exception."""
    check_spec_or_one_line(sandbox, lambda: RunSpec.from_dict(data))


@fuzz(40)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="{}[]:,-&*!|>'\"#%@` \n\tkind", max_size=40)))
def test_generated_yaml_text_never_escapes(sandbox: Sandbox, text: str) -> None:
    check_spec_or_one_line(sandbox, lambda: RunSpec.from_yaml(text))


def test_json_round_trip_of_accepted_specs_is_strict_json() -> None:
    """What RunSpec accepts crosses the process hop as standard JSON (no NaN/Infinity tokens)."""
    spec = RunSpec.from_dict({**BASE, "budget": {"minutes": 5.5}, "env_kwargs": {"a": [1.5, None]}})
    json.loads(spec.to_json(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
