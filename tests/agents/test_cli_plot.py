"""`rlfleet plot` draws learning curves from runs' metrics.jsonl (the local target's store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfleet.cli import main


def test_plot_writes_png(trained_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("RLFLEET_HOME", str(trained_root.root))  # the local target's root is $RLFLEET_HOME
    out = tmp_path / "curves.png"
    assert main(["plot", "ppo-cp", "--target", "local", "--out", str(out), "--threshold", "475"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "ppo-cp" in capsys.readouterr().out

    assert main(["plot", "no-such-run", "--target", "local", "--out", str(out)]) != 0
    assert "no run 'no-such-run'" in capsys.readouterr().err
