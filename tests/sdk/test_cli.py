"""The CLI: bad input gives one clear line on stderr and a conventional exit code, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RLFLEET = str(Path(sys.executable).parent / "rlfleet")


def cli(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RLFLEET, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def _bad_spec_file(tmp: Path) -> str:
    p = tmp / "bad.yaml"
    p.write_text("kind: train\nbudget: {steps: 0}\n")
    return str(p)


# (args, exit code, substrings of stderr). No cluster needed for any of these.
BAD_CLI = [
    (["run", "train", "--steps", "-5"], 2, ["budget.steps", "greater than 0"]),
    (["run", "train", "--steps", "ten"], 2, ["'ten' is not a valid integer"]),
    (["run", "eval"], 2, ["source", "--from RUN_ID"]),
    (["run", "train", "--from", "rl-1"], 2, ["source", "resume_from"]),
    (["run", "fly"], 2, ["'fly' is not one of 'train', 'eval', 'deploy'"]),
    (["run", "train", "--agent", "sac"], 2, ["'sac' is not one of"]),
    (["run", "train", "--env", "Cart Pole"], 2, ["env", "not a Gymnasium env id"]),
    (["run", "train", "--seed", "-3"], 2, ["seed"]),
    (["run", "train", "--config", "learnin_rate=0.1"], 2, ["config", "learnin_rate"]),
    (["run", "train", "--config", "novalue"], 2, ["--config takes KEY=VALUE"]),
    (["run", "train", "--code", "/nonexistent"], 2, ["code", "not a directory"]),
    (["run", "train", "--spec", "/nonexistent.yaml"], 2, ["cannot read spec file"]),
    (["run", "train", "--target", "nope"], 2, ["no target named 'nope'", "rlfleet target add"]),
    (["runs", "--target", "nope"], 2, ["no target named 'nope'"]),
    (["status", "rl-1", "--target", "nope"], 2, ["no target named 'nope'"]),
    (["target", "add", "ray", "--address", "http://127.0.0.1:1"], 2, ["needs --token-file, --artifact-root"]),
    (["target", "remove", "nope"], 2, ["no target named 'nope'"]),
    (["nosuchcommand"], 2, ["No such command 'nosuchcommand'"]),
]


@pytest.mark.parametrize(("args", "code", "expect"), BAD_CLI, ids=[" ".join(a) for a, _, _ in BAD_CLI])
def test_bad_cli_input(args: list[str], code: int, expect: list[str]) -> None:
    res = cli(*args)
    assert res.returncode == code, res.stderr
    for part in expect:
        assert part in res.stderr, f"{part!r} not in {res.stderr!r}"
    assert "Traceback" not in res.stderr
    assert res.stdout == ""


def test_spec_file_errors(tmp_path: Path) -> None:
    res = cli("run", "train", "--spec", _bad_spec_file(tmp_path))
    assert res.returncode == 2 and "budget.steps" in res.stderr and "Traceback" not in res.stderr
    good = tmp_path / "train.yaml"
    good.write_text("kind: train\nbudget: {steps: 100}\n")
    res = cli("run", "eval", "--spec", str(good), "--from", "rl-1")
    assert res.returncode == 2 and "describes a train run" in res.stderr


def test_debug_shows_traceback() -> None:
    res = cli("--debug", "run", "train", "--steps", "-5")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_help_is_cheap_and_lists_commands() -> None:
    res = cli("--help")
    assert res.returncode == 0
    for name in ("run", "runs", "status", "logs", "wait", "cancel", "artifacts", "local", "target", "down"):
        assert f"  {name} " in res.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from rlfleet.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy=('torch','ray','pulumi','pulumi_aws','ansible_runner','gymnasium','pydantic')\n"
            "heavy=[m for m in heavy if m in sys.modules]\n"
            "print(heavy)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip().splitlines()[-1] == "[]", probe.stdout


def test_unreachable_and_wrong_token_targets(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("not-the-token")
    token.chmod(0o600)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    res = cli(
        "target",
        "add",
        "ray",
        "--name",
        "dead",
        "--address",
        "http://127.0.0.1:9",
        "--token-file",
        str(token),
        "--artifact-root",
        f"file://{tmp_path}/art",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    res = cli("status", "rl-x", "--target", "dead", env=env)
    assert res.returncode == 3 and "cannot reach the Ray cluster of target 'dead'" in res.stderr
    res = cli("runs", "--target", "dead", env=env)  # the head is down: its store is listed instead
    assert res.returncode == 0 and "cannot reach the Ray cluster of target 'dead'" in res.stderr
    res = cli("target", "list", "--json", env=env)
    names = [t["name"] for t in json.loads(res.stdout)]
    assert names == ["local", "dead"]
    token.chmod(0o644)
    res = cli("runs", "--target", "dead", env=env)
    assert res.returncode == 3 and "chmod 600" in res.stderr
    res = cli("target", "remove", "dead", env=env)
    assert res.returncode == 0


def test_artifacts_of_unknown_run(tmp_path: Path) -> None:
    res = cli("artifacts", "rl-nope", env={"RLFLEET_HOME": str(tmp_path)})
    assert res.returncode == 6 and "rl-nope has no artifacts" in res.stderr


def test_https_target_with_missing_ca_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    token.chmod(0o600)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    res = cli("target", "add", "ray", "--name", "tls", "--address", "https://127.0.0.1:9", "--token-file", str(token),
              "--artifact-root", f"file://{tmp_path}/art", "--ca-cert", str(tmp_path / "ca.crt"), env=env)
    assert res.returncode == 0, res.stderr
    res = cli("runs", "--target", "tls", env=env)
    assert res.returncode == 2 and "CA certificate" in res.stderr and "does not exist yet" in res.stderr


def test_runs_without_a_running_local_head_lists_the_artifact_store(tmp_path: Path) -> None:
    from rlfleet.artifacts import ArtifactStore

    store = ArtifactStore(str(tmp_path / "home"))
    done = store.run("rl-20260101-000000-aaaaaa")
    done.write_json("spec.json", {"kind": "train", "name": "old-run"})
    done.commit(extra={"wall_time_s": 12.5, "gpu_hours": 0.0})
    half = store.run("rl-20260102-000000-bbbbbb")
    half.write_json("spec.json", {"kind": "train", "name": "killed"})
    env = {"RLFLEET_HOME": str(tmp_path / "home")}
    res = cli("runs", env=env)
    assert res.returncode == 0, res.stderr
    assert "local Ray head is not running" in res.stderr
    assert "old-run" in res.stdout and "complete" in res.stdout and "INCOMPLETE" in res.stdout
    docs = json.loads(cli("runs", "--json", env=env).stdout)
    assert [(d["run_id"], d["complete"], d["wall_time_s"]) for d in docs] == [
        ("rl-20260102-000000-bbbbbb", False, None), ("rl-20260101-000000-aaaaaa", True, 12.5)]


def test_stored_runs_report_a_damaged_manifest_as_a_damaged_run(tmp_path: Path) -> None:
    from rlfleet.artifacts import ArtifactStore

    store = ArtifactStore(str(tmp_path / "home"))
    good = store.run("rl-20260101-000000-aaaaaa")
    good.write_json("spec.json", {"kind": "train", "name": "good"})
    good.commit(extra={"wall_time_s": 3.0})
    bad = store.run("rl-20260102-000000-bbbbbb")
    bad.write_json("spec.json", {"kind": "train", "name": "cut"})
    bad.commit()
    path = tmp_path / "home" / "runs" / bad.run_id / "manifest.json"
    path.write_bytes(path.read_bytes()[:37])  # e.g. written in place by an older version when the disk filled
    env = {"RLFLEET_HOME": str(tmp_path / "home")}
    res = cli("runs", "--stored", "--json", env=env)
    assert res.returncode == 0, res.stderr
    docs = {d["run_id"]: d for d in json.loads(res.stdout)}
    assert docs[bad.run_id]["state"] == "damaged" and not docs[bad.run_id]["complete"]
    assert docs[bad.run_id]["name"] == "cut"  # its spec.json is still shown (unverified)
    assert "manifest.json is not a valid manifest" in docs[bad.run_id]["problem"]
    assert docs[good.run_id]["state"] == "complete" and docs[good.run_id]["wall_time_s"] == 3.0
    res = cli("runs", "--stored", env=env)
    assert res.returncode == 0 and "DAMAGED" in res.stdout and "good" in res.stdout, res.stderr


def test_runs_of_a_target_whose_head_is_down_lists_its_store(tmp_path: Path) -> None:
    """A remote head behind a front end (nginx on an on-prem node) that is down answers 502: the
    cluster is unreachable, and 'rlfleet runs' lists the target's artifact store instead."""
    import http.server
    import threading

    from rlfleet.artifacts import ArtifactStore

    class Front(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(502)
            self.end_headers()
            self.wfile.write(b"<html><center><h1>502 Bad Gateway</h1></center></html>")

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Front)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    store = ArtifactStore(f"file://{tmp_path}/art")
    done = store.run("rl-20260101-000000-aaaaaa")
    done.write_json("spec.json", {"kind": "train", "name": "on-the-nas"})
    done.commit(extra={"wall_time_s": 3.0, "gpu_hours": 0.0})
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    try:
        res = cli("target", "add", "ray", "--name", "behind-nginx", "--address",
                  f"http://127.0.0.1:{srv.server_address[1]}", "--token-file", str(token),
                  "--artifact-root", f"file://{tmp_path}/art", env=env)
        assert res.returncode == 0, res.stderr
        res = cli("runs", "--json", "--target", "behind-nginx", env=env)
    finally:
        srv.shutdown()
    assert res.returncode == 0, res.stderr
    assert [(d["run_id"], d["complete"], d["name"]) for d in json.loads(res.stdout)] == [
        ("rl-20260101-000000-aaaaaa", True, "on-the-nas")]
    assert "HTTP 502" in res.stderr and "artifact store" in res.stderr
