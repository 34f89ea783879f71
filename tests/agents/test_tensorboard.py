"""TensorBoard event files of a train run, read back with TensorBoard's own reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.artifacts import open_run


def _accumulator(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    return acc


def test_train_run_writes_event_files_equal_to_metrics(runner) -> None:
    out = runner.run("tb", {"kind": "train", "agent": "ppo", "env": "CartPole-v1", "seed": 5,
                            "budget": {"steps": 4096}, "config": {"eval_every": 2048, "num_steps": 128}})
    assert out.returncode == 0, out.stderr
    run = open_run(runner.uri, "tb")
    manifest = run.verify()  # every event file hashed like every artifact, and unchanged
    events = [f for f in manifest.files if f.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 1, manifest.files
    assert manifest.files[events[0]].size > 0

    root = Path(runner.uri.removeprefix("file://"))
    acc = _accumulator(root / "runs" / "tb")
    # what `tensorboard --logdir <artifact root>` lists: one TensorBoard run per rlfleet run
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    assert list(EventMultiplexer().AddRunsFromDirectory(str(root)).Runs()) == ["runs/tb/tensorboard"]
    rows = list(run.iter_metrics())
    for tag, pick in (("episode_return_mean", lambda r: r.get("episode_return_mean")),
                      ("eval_return_mean", lambda r: r.get("eval_return_mean")),
                      ("steps_per_second", lambda r: r.get("steps_per_second")),
                      ("losses/loss_value", lambda r: r["losses"].get("loss_value"))):
        want = [(r["step"], pick(r)) for r in rows if pick(r) is not None]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert want, tag
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_array_equal(np.float32([v for _, v in got]), np.float32([v for _, v in want]), tag)
    final = acc.Scalars("final_eval/mean")
    assert final[0].value == np.float32(manifest.extra["final_eval"]["mean"])

    # kit version, code and packages hashes, spec as text; hyperparameters for the hparams plugin
    def text(tag: str) -> str:
        return acc.Tensors(f"rlfleet/{tag}/text_summary")[0].tensor_proto.string_val[0].decode()

    prov = manifest.provenance
    assert text("kit_version") == prov["kit_version"] and text("run_id") == "tb"
    assert text("packages_sha256") == prov["packages_sha256"]
    assert text("code_sha256").startswith("none")
    assert '"seed":5' in text("spec")
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["agent"].string_value == "ppo" and hp["seed"].number_value == 5
    assert hp["num_steps"].number_value == 128 and hp["total_steps"].number_value == 4096
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in exp.metric_infos] == ["final_eval/mean"]


def test_importing_the_run_entrypoint_loads_no_tensorboard() -> None:
    code = "import sys, rlfleet_agents.run; print(sorted(m for m in sys.modules if 'tensorboard' in m.lower()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
