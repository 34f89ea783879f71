"""CLI abuse: bad commands, options and values give a non-zero exit and ONE error line on stderr
('rlfleet: error: ...' or click's 'Error: ...' naming the option), no traceback, and change nothing
on disk. Most cases run in-process (rlfleet.cli.main); a sample runs the real console script."""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .conftest import Sandbox
from .harness import RLFLEET, assert_cli_error, count, fuzz, run_cli, unchanged

# argv -> words the error line must contain. The default target is 'sink' (a closed loopback
# port), so nothing here can reach a cluster; the local Ray head is guarded off in conftest.
TABLE: list[tuple[str, list[str]]] = [
    ("nosuchcommand", ["No such command 'nosuchcommand'"]),
    ("run", ["Missing argument"]),
    ("run fly", ["'fly' is not one of"]),
    ("run train --steps ten", ["'--steps'", "'ten'"]),
    ("run train --steps -5", ["budget.steps"]),
    ("run train --steps 0", ["budget.steps"]),
    ("run train --minutes inf", ["budget.minutes"]),  # was submitted with an infinite budget
    ("run train --minutes nan", ["budget.minutes"]),
    ("run train --minutes 0", ["budget.minutes"]),
    ("run train --cpus nan", ["resources.cpus"]),
    ("run train --cpus -1", ["resources.cpus"]),
    ("run train --gpus 1e9", ["resources.gpus"]),
    ("run train --seed -3", ["seed"]),
    ("run train --seed 2147483648", ["seed"]),
    ("run train --seed 1.5", ["'--seed'"]),
    ("run train --name 'Bad Name'", ["name", "lowercase"]),
    ("run train --name ''", ["name"]),
    ("run train --env 'Cart Pole'", ["env", "Gymnasium env id"]),
    ("run train --agent sac", ["'sac' is not one of"]),
    ("run train --config learnin_rate=0.1", ["config.learnin_rate"]),
    ("run train --config novalue", ["--config takes KEY=VALUE"]),
    ("run train --config =1", ["--config takes KEY=VALUE"]),
    ("run train --config gamma=NaN", ["config", "JSON"]),
    ("run train --env-kwarg =1", ["--env-kwarg takes KEY=VALUE"]),
    ("run train --env-kwarg x=NaN", ["env_kwargs"]),
    ("run train --episodes 0 --from rl-1", ["eval.episodes"]),
    ("run eval", ["source", "--from RUN_ID"]),
    ("run eval --from rl-1 --episodes 0", ["eval.episodes"]),
    ("run train --from rl-1", ["source", "resume_from"]),
    ("run eval --from rl-1 --resume rl-0", ["resume_from"]),
    ("run deploy --from x --name UPPER", ["name"]),
    ("run train --spec /nonexistent.yaml", ["cannot read spec file", "/nonexistent.yaml"]),
    ("run train --spec /", ["'--spec'", "is a directory"]),
    ("run train --target nope", ["no target named 'nope'", "rlfleet target add"]),
    ("run train --target ''", ["target 'sink'"]),  # empty means the default ($RLFLEET_TARGET)
    ("runs --target nope", ["no target named 'nope'"]),
    ("runs --limit abc", ["'--limit'"]),
    ("runs --limit -1", ["--limit"]),  # was accepted: [:-1] dropped the oldest run silently
    ("runs --limit 0", ["--limit"]),
    ("status", ["Missing argument"]),
    ("status rl-1 --target nope", ["no target named 'nope'"]),
    ("logs rl-1 --target nope", ["no target named 'nope'"]),
    ("wait rl-1 --timeout soon", ["'--timeout'"]),
    ("cancel rl-1 --target nope", ["no target named 'nope'"]),
    ("endpoint rl-1 --target nope", ["no target named 'nope'"]),
    ("artifacts ../../etc", ["invalid run id '../../etc'"]),
    ("artifacts ..", ["invalid run id '..'"]),
    ("artifacts rl-none", ["rl-none", "no artifacts"]),
    ("local up --cpus x", ["'--cpus'"]),
    ("local nope", ["No such command 'nope'"]),
    ("target nope", ["No such command 'nope'"]),
    ("target add k8s", ["'k8s' is not one of"]),
    ("target add ray", ["--address", "--token-file", "--artifact-root"]),
    ("target add ray --address http://127.0.0.1:1", ["needs --token-file, --artifact-root"]),
    ("target add ray --name 'Bad Name' --address http://127.0.0.1:1 --token-file /tmp/t --artifact-root file:///x",
     ["name", "lowercase"]),  # was a pydantic traceback
    ("target add ray --name a/b --address http://127.0.0.1:1 --token-file /tmp/t --artifact-root file:///x",
     ["name"]),
    ("target add ray --name ok --address ftp://x --token-file /tmp/t --artifact-root file:///x",
     ["ray_address", "http"]),  # was saved to the targets file
    ("target add ray --name ok --address 10.0.0.5:8265 --token-file /tmp/t --artifact-root file:///x",
     ["ray_address"]),
    ("target add onprem", ["--inventory"]),
    ("target add onprem --inventory /nonexistent", ["'--inventory'", "does not exist"]),
    ("target add aws", ["--stack", "--outputs-file"]),
    ("target add aws --stack nope", ["stack 'nope'"]),
    ("target add gcp --stack a/b/c", ["stack 'a/b/c'", "Pulumi.yaml"]),
    ("target add aws --outputs-file /etc/hostname", ["outputs file", "not JSON"]),
    ("target add aws --outputs-file /", ["'--outputs-file'"]),
    ("target show nope", ["no target named 'nope'"]),
    ("target remove nope", ["no target named 'nope'"]),
    ("up nope", ["no target named 'nope'"]),
    ("up sink", ["kind 'ray' have no provisioner"]),
    ("down nope", ["no target named 'nope'"]),
    ("down sink --dry-run", ["kind 'ray' have no provisioner"]),
    ("cleanup sink", ["retention rule"]),
    ("cleanup sink --older-than 5x", ["--older-than", "'5x'"]),
    ("cleanup sink --older-than -5d", ["--older-than"]),
    ("cleanup sink --keep-last -1", ["--keep-last"]),  # printed a 'cluster does not answer' line first
    ("cleanup sink --keep-last 0", ["--keep-last"]),
    ("cleanup sink --keep-last x", ["'--keep-last'"]),
    ("cost nope", ["no target named 'nope'"]),
    ("cost sink", ["no cloud stack to price"]),
    ("plot", ["Missing argument"]),
    ("plot --target nope rl-1", ["no target named 'nope'"]),
    ("--nope", ["No such option"]),
    ("run train --nope", ["No such option"]),
]


@pytest.mark.parametrize(("argv", "needles"), TABLE, ids=[a for a, _ in TABLE])
def test_bad_command(sandbox: Sandbox, argv: str, needles: list[str]) -> None:
    count("cli")
    with unchanged(*sandbox.roots):
        rc, out, err = run_cli(argv)
    assert_cli_error(rc, out, err, *needles)


# The console script itself (a real process) for a sample: exit code, one line, no traceback.
SUBPROCESS = [
    (["run", "train", "--steps", "-5"], 2, "budget.steps"),
    (["run", "train", "--minutes", "inf"], 2, "budget.minutes"),
    (["target", "add", "ray", "--name", "Bad Name", "--address", "http://127.0.0.1:1", "--token-file", "/tmp/t",
      "--artifact-root", "file:///x"], 2, "name"),
    (["runs", "--limit", "-1"], 2, "--limit"),
    (["nosuchcommand"], 2, "nosuchcommand"),
]


@pytest.mark.parametrize(("args", "code", "needle"), SUBPROCESS, ids=[" ".join(a[:3]) for a, _, _ in SUBPROCESS])
def test_console_script(sandbox: Sandbox, args: list[str], code: int, needle: str) -> None:
    count("cli")
    with unchanged(*sandbox.roots):
        res = subprocess.run([RLFLEET, *args], capture_output=True, text=True, timeout=120, cwd=sandbox.cwd,
                             env={**os.environ}, stdin=subprocess.DEVNULL)
    assert res.returncode == code, res.stderr
    assert res.stdout == ""
    assert_cli_error(res.returncode, res.stdout, res.stderr, needle)


# -- generated flag values -------------------------------------------------------------------------

_word = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
_bad_name = st.one_of(st.from_regex(r"[A-Z][a-zA-Z0-9]{0,8}", fullmatch=True),
                      st.from_regex(r"[a-z]{1,4}[ .!@%+/:][a-z]{1,4}", fullmatch=True))
FLAGS: dict[str, tuple[st.SearchStrategy[str], str]] = {
    # flag -> (bad values, what the error names)
    "--steps": (st.one_of(_word, st.integers(max_value=0).map(str)), "steps"),
    "--minutes": (st.one_of(_word, st.floats(max_value=0).map(str), st.just("inf")), "minutes"),
    "--seed": (st.one_of(_word, st.integers(max_value=-1).map(str), st.integers(min_value=2**31).map(str)), "seed"),
    "--cpus": (st.one_of(_word, st.floats(min_value=1024.5, allow_infinity=False).map(str)), "cpus"),
    "--gpus": (st.one_of(_word, st.floats(max_value=-0.5).map(str)), "gpus"),
    "--name": (_bad_name, "name"),
    "--env": (st.from_regex(r"[a-z]{0,4}[ !$%&*(){}|;<>?,][a-z]{0,4}", fullmatch=True), "env"),
    "--agent": (_word.filter(lambda w: w not in ("ppo", "dqn", "random")), "--agent"),
    "--config": (_word.filter(lambda w: w not in ("gamma", "lr")).map(lambda w: f"{w}x=1"), "config."),
    "--env-kwarg": (_word, "--env-kwarg"),
}


@fuzz(60)
@given(st.sampled_from(sorted(FLAGS)).flatmap(lambda f: st.tuples(st.just(f), FLAGS[f][0])))
def test_generated_bad_run_flag(sandbox: Sandbox, case: tuple[str, str]) -> None:
    flag, value = case
    count("cli")
    with unchanged(*sandbox.roots):
        rc, out, err = run_cli(["run", "train", flag, value])
    assert_cli_error(rc, out, err, FLAGS[flag][1])


@fuzz(25)
@given(_bad_name)
def test_generated_bad_target_name(sandbox: Sandbox, name: str) -> None:
    count("cli")
    with unchanged(*sandbox.roots):
        rc, out, err = run_cli(["target", "add", "ray", "--name", name, "--address", "http://127.0.0.1:1",
                                "--token-file", str(sandbox.token), "--artifact-root", f"file://{sandbox.art}"])
    assert_cli_error(rc, out, err, "name")
