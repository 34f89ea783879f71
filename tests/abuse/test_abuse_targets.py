"""Targets file abuse (./rlfleet.yaml and $RLFLEET_CONFIG): malformed YAML, wrong types, unknown
kinds, bad token sources, bad URIs. Each fails with one line naming the file/target/field, through
the SDK and through the CLI, and neither the file nor anything else on disk changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from rlfleet.errors import AuthError, ConfigError
from rlfleet.targets import load_targets

from .conftest import Sandbox, closed_port
from .harness import assert_cli_error, assert_one_line, count, fuzz, run_cli, unchanged


@pytest.fixture
def targets(sandbox: Sandbox) -> Iterator[Sandbox]:
    """Each case writes its own targets file; the sink file comes back afterwards."""
    yield sandbox
    sandbox.write_targets(sandbox.sink_yaml())


def entry(sb: Sandbox, **over: object) -> dict[str, object]:
    base: dict[str, object] = {"kind": "ray", "ray_address": f"http://127.0.0.1:{closed_port()}",
                               "token_source": f"file:{sb.token}", "artifact_root": f"file://{sb.art}"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def one_target(sb: Sandbox, **over: object) -> str:
    return yaml.safe_dump({"targets": {"c": entry(sb, **over)}})


# text of the targets file -> words the one line must contain
LOAD_TABLE: list[tuple[str, list[str]]] = [
    ("targets: [", ["rlfleet.yaml", "not valid YAML", "line 1"]),
    ("targets:\n\tc: {}", ["rlfleet.yaml", "not valid YAML"]),
    ("\x00", ["rlfleet.yaml", "not valid YAML"]),
    ("targets: !!python/name:os.system", ["rlfleet.yaml", "not valid YAML"]),
    ("targets: 5", ["rlfleet.yaml", "'targets:'"]),
    ("- 1", ["rlfleet.yaml", "'targets:'"]),
    ("targets:\n  c: 5", ["rlfleet.yaml", "target 'c'", "mapping"]),  # was AttributeError
    ("targets:\n  c: [1]", ["rlfleet.yaml", "target 'c'", "mapping"]),  # was AttributeError
    ("targets:\n  c: hunter2", ["rlfleet.yaml", "target 'c'", "mapping"]),
    ("targets:\n  c:\n    1: 2", ["rlfleet.yaml", "target 'c'", "field names"]),  # was TypeError
    ("targets:\n  c:\n    ? [a]\n    : 2", ["rlfleet.yaml", "not valid YAML", "unhashable key", "line 3"]),
    ("targets:\n  Bad Name: {}", ["target 'Bad Name'", "name"]),
    ("targets:\n  1: {kind: ray}", ["target 1", "name"]),
    ("targets:\n  c: {kind: ray}", ["target 'c'", "ray_address"]),
    ("targets:\n  c: &a\n    <<: *a", ["target 'c'"]),
]


@pytest.mark.parametrize(("text", "needles"), LOAD_TABLE, ids=[f"l{i}" for i in range(len(LOAD_TABLE))])
def test_bad_targets_file(targets: Sandbox, text: str, needles: list[str]) -> None:
    path = targets.write_targets(text)
    count("targets")
    with unchanged(*targets.roots):
        with pytest.raises(ConfigError) as ei:
            load_targets(path)
        assert_one_line(str(ei.value), *needles)
        rc, out, err = run_cli("target list")
        assert_cli_error(rc, out, err, *needles)


# one field of a target entry -> (bad value, words the message must contain)
FIELD_TABLE: list[tuple[dict[str, object], list[str]]] = [
    ({"kind": "k8s"}, ["target 'c'", "kind"]),
    ({"kind": ["ray"]}, ["target 'c'", "kind"]),
    ({"kind": None}, ["target 'c'", "kind"]),
    ({"token_source": "hunter2"}, ["token_source", "never goes into the targets file"]),
    ({"token_source": "vault:x"}, ["token_source"]),
    ({"token_source": "s3://bucket/token"}, ["token_source"]),
    ({"token_source": 12345}, ["token_source"]),
    ({"ray_address": 5}, ["ray_address"]),
    ({"ray_address": "ftp://10.0.0.5:8265"}, ["ray_address", "http"]),  # was saved and failed only on use
    ({"ray_address": "10.0.0.5:8265"}, ["ray_address", "http"]),
    ({"ray_address": "http://"}, ["ray_address"]),
    ({"artifact_root": ["s3://b"]}, ["artifact_root"]),
    ({"storage_options": "anon"}, ["storage_options"]),
    ({"env_vars": {"A": [1]}}, ["env_vars.A"]),
    ({"env_vars": ["A=1"]}, ["env_vars"]),
    ({"provisioner": "pulumi"}, ["provisioner"]),
    ({"bogus": 1}, ["bogus"]),
    ({"ca_cert": {"pem": "x"}}, ["ca_cert"]),
]


@pytest.mark.parametrize(("over", "needles"), FIELD_TABLE, ids=[f"f{i}" for i in range(len(FIELD_TABLE))])
def test_bad_target_field(targets: Sandbox, over: dict[str, object], needles: list[str]) -> None:
    path = targets.write_targets(one_target(targets, **over))
    count("targets")
    with unchanged(*targets.roots):
        with pytest.raises(ConfigError) as ei:
            load_targets(path)
        assert_one_line(str(ei.value), "target 'c'", *needles)
        rc, out, err = run_cli("target show c")
        assert_cli_error(rc, out, err, *needles)


def test_rlfleet_config_variable(targets: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$RLFLEET_CONFIG names the file in the message; a directory or binary file is one line too."""
    targets.targets_file.unlink()
    for i, (make, needle) in enumerate([
        (lambda p: p.mkdir(), "rlfleet-config-0"),
        (lambda p: p.write_bytes(bytes(range(256))), "rlfleet-config-1"),
        (lambda p: p.write_text("targets:\n  c: [1]\n"), "rlfleet-config-2"),
    ]):
        path = tmp_path / f"rlfleet-config-{i}"
        make(path)
        monkeypatch.setenv("RLFLEET_CONFIG", str(path))
        count("targets")
        with unchanged(*targets.roots, path):
            rc, out, err = run_cli("target list")
            assert_cli_error(rc, out, err, needle)


# -- problems that show when the target is used: token sources and artifact URIs ----------------

# (target fields, command, words) -- the token file and artifact paths are made in the sandbox
USE_TABLE: list[tuple[dict[str, str], str, list[str]]] = [
    ({"token_source": "env:RLFLEET_ABUSE_UNSET"}, "runs", ["RLFLEET_ABUSE_UNSET", "empty"]),
    ({"token_source": "file:/nonexistent/token"}, "runs", ["/nonexistent/token", "does not exist"]),
    ({"token_source": "file:{base}/loose-token"}, "runs", ["chmod 600"]),
    ({"token_source": "file:{base}/empty-token"}, "runs", ["token", "empty"]),
    ({"token_source": "file:{base}"}, "runs", ["token file", "not a regular file"]),  # was IsADirectoryError
    ({"artifact_root": "nosuchproto://x/y"}, "runs --stored", ["nosuchproto://x/y"]),
    ({"artifact_root": "nosuchproto://x/y"}, "artifacts rl-1", ["nosuchproto://x/y"]),
    ({"artifact_root": "file:///dev/null/x"}, "runs --stored", ["/dev/null/x", "not a directory"]),  # was a traceback
    ({"artifact_root": "file:///dev/null/x"}, "artifacts rl-1", ["/dev/null/x"]),
    ({"ca_cert": "/nonexistent/ca.pem", "ray_address": "https://127.0.0.1:9"}, "runs", ["/nonexistent/ca.pem"]),
]


@pytest.mark.parametrize(("over", "cmd", "needles"), USE_TABLE, ids=[f"u{i}" for i in range(len(USE_TABLE))])
def test_bad_token_sources_and_uris_on_use(targets: Sandbox, over: dict[str, str], cmd: str,
                                           needles: list[str]) -> None:
    for name, mode, text in (("loose-token", 0o644, "t\n"), ("empty-token", 0o600, "\n")):
        p = targets.base / name
        if not p.exists():
            p.write_text(text)
            p.chmod(mode)
    targets.write_targets(one_target(targets, **{k: v.format(base=targets.base) for k, v in over.items()}))
    count("targets")
    with unchanged(*targets.roots):
        rc, out, err = run_cli(f"{cmd} --target c")
        assert_cli_error(rc, out, err, *needles)


def test_token_errors_are_auth_errors(targets: Sandbox) -> None:
    targets.write_targets(one_target(targets, token_source="env:RLFLEET_ABUSE_UNSET"))
    count("targets")
    with pytest.raises(AuthError, match="RLFLEET_ABUSE_UNSET"):
        load_targets()["c"].token()


# -- generated ----------------------------------------------------------------------------------

_word = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
BAD_FIELDS: dict[str, st.SearchStrategy[object]] = {
    "kind": _word.filter(lambda w: w not in ("local", "aws", "gcp", "onprem", "ray")),
    "token_source": st.one_of(_word, st.from_regex(r"(vault|http|s3|token):[a-z]{1,8}", fullmatch=True),
                              st.integers()),
    "ray_address": st.one_of(st.integers(), st.from_regex(r"(ftp|ray|tcp|ws)://[a-z0-9.]{1,12}:[0-9]{2,5}",
                                                          fullmatch=True), st.lists(_word, min_size=1)),
    "artifact_root": st.one_of(st.integers(), st.lists(_word, min_size=1), st.dictionaries(_word, _word, min_size=1)),
    "storage_options": st.one_of(_word, st.integers(), st.lists(_word)),
    "env_vars": st.one_of(_word, st.dictionaries(_word, st.lists(st.integers()), min_size=1)),
}


@fuzz(40)
@given(st.sampled_from(sorted(BAD_FIELDS)).flatmap(lambda f: st.tuples(st.just(f), BAD_FIELDS[f])))
def test_generated_bad_field_is_named(sandbox: Sandbox, case: tuple[str, object]) -> None:
    field, value = case
    path = sandbox.base / "gen-targets.yaml"
    path.write_text(yaml.safe_dump({"targets": {"c": entry(sandbox, **{field: value})}}))
    count("targets")
    with unchanged(*sandbox.roots):
        with pytest.raises(ConfigError) as ei:
            load_targets(path)
    assert_one_line(str(ei.value), "target 'c'", field)


@fuzz(30)
@given(st.text(alphabet="targes:ckindray{}[]-&*!|>'\"# \n\t0123", max_size=60))
def test_generated_file_text_never_escapes(sandbox: Sandbox, text: str) -> None:
    """Arbitrary targets-file text: loads, or one ConfigError line naming the file; nothing else."""
    path = sandbox.base / "gen-text.yaml"
    path.write_text(text)
    count("targets")
    with unchanged(*sandbox.roots):
        try:
            load_targets(path)
        except ConfigError as err:
            assert_one_line(str(err), str(path))
