"""The infra commands through the real CLI entry point (rlfleet.cli.main)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from rlfleet.artifacts import ArtifactStore
from rlfleet.cli import main

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RLFLEET_CONFIG", str(tmp_path / "targets.yaml"))
    monkeypatch.setenv("RLF_TOKEN", "t" * 32)
    targets = {
        # kind local: its provisioner is in the tree; nothing here may reach destroy()
        "lab": {"kind": "local", "ray_address": f"http://127.0.0.1:{_closed_port()}", "token_source": "env:RLF_TOKEN",
                "artifact_root": f"file://{tmp_path}/nas"},
        "prod": {"kind": "aws", "ray_address": "https://10.0.0.5:8443", "token_source": "env:RLF_TOKEN",
                 "artifact_root": "s3://rlf-prod-artifacts/rlfleet",
                 "provisioner": {"type": "pulumi", "project_dir": str(REPO / "infra_cloud" / "aws"), "stack": "dev"}},
    }
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump({"targets": targets}))
    return tmp_path


def test_cost_prints_a_dated_estimate(config, capsys):
    assert main(["cost", "prod"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "g5.xlarge x1" in out and "/month" in out
    assert main(["cost", "prod", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["label"] == "estimate" and d["monthly"] > d["hourly"] > 0


def test_up_shows_cost_and_refuses_to_spend_without_tty_or_yes(config, capsys):
    assert main(["up", "prod"]) == 2
    err = capsys.readouterr().err
    assert "ESTIMATE" in err and "--yes" in err and "nothing" not in err.split("ESTIMATE")[0]


def test_down_delete_data_without_tty_is_refused_with_a_clear_message(config, capsys):
    store = ArtifactStore(f"file://{config}/nas")
    store.run("r1").write_text("spec.json", "{}")
    assert main(["down", "lab", "--delete-data"]) == 2
    err = capsys.readouterr().err
    assert "rlfleet: error: --delete-data would permanently delete" in err and "--yes" in err
    assert "1 object(s)" in err
    assert store.run("r1").exists("spec.json")


def test_cleanup_with_unreachable_cluster_keeps_incomplete_runs(config, capsys):
    store = ArtifactStore(f"file://{config}/nas")
    for rid in ("a", "b", "c"):
        arts = store.run(rid)
        arts.write_text("spec.json", json.dumps({"kind": "train", "name": "cp"}))
        arts.write_bytes("checkpoints/x.pt", b"0" * 2048)
        if rid != "b":
            arts.commit()
    assert main(["cleanup", "lab", "--keep-last", "1", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "does not answer" in cap.err and "would remove" in cap.err and "dry run" in cap.out
    assert store.list_run_ids() == ["a", "b", "c"]
    assert main(["cleanup", "lab", "--keep-last", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "b" in d["kept"] and len(d["removed"]) == 1 and d["bytes_freed"] > 2048
    assert len(ArtifactStore(f"file://{config}/nas").list_run_ids()) == 2
    assert main(["cleanup", "lab"]) == 2  # no rule given
    assert "retention rule" in capsys.readouterr().err


def test_cleanup_with_unreachable_cluster_keeps_deploys_and_every_source(config, capsys, monkeypatch):
    """The target's ray_address is a closed loopback port: the cluster really does not answer."""
    from datetime import datetime, timedelta, timezone

    import rlfleet.artifacts as artifacts_mod

    store = ArtifactStore(f"file://{config}/nas")
    runs = {  # run id -> (spec, age in days)
        "src-d": ({"kind": "train", "name": "cp"}, 90), "src-e": ({"kind": "train", "name": "cp"}, 89),
        "src-r": ({"kind": "train", "name": "cp"}, 88), "plain": ({"kind": "train", "name": "cp"}, 87),
        "latest": ({"kind": "train", "name": "cp"}, 1),
        "dep-old": ({"kind": "deploy", "name": "srv", "source": "src-d"}, 60),
        "dep-new": ({"kind": "deploy", "name": "srv", "source": "latest"}, 2),
        "ev": ({"kind": "eval", "name": "ev", "source": "src-e"}, 50),
        "res": ({"kind": "train", "name": "cp2", "resume_from": "src-r"}, 50),
    }
    now = datetime.now(timezone.utc)
    for rid, (spec, days) in runs.items():
        arts = store.run(rid)
        arts.write_text("spec.json", json.dumps(spec))
        monkeypatch.setattr(artifacts_mod, "_now", lambda d=days: (now - timedelta(days=d)).isoformat())
        arts.commit()
    assert main(["cleanup", "lab", "--older-than", "30d", "--json"]) == 0
    cap = capsys.readouterr()
    assert "does not answer" in cap.err
    d = json.loads(cap.out)
    assert d["removed"] == ["plain"]
    assert "deploy" in d["kept"]["dep-old"] and "src-d" in d["kept"] and "src-e" in d["kept"]
    assert "src-r" in d["kept"] and "res" in d["kept"]["src-r"]
    assert sorted(store.list_run_ids()) == sorted(set(runs) - {"plain"})
