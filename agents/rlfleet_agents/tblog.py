"""TensorBoard event files of a train run, stored under ``tensorboard/`` next to metrics.jsonl
(so ``tensorboard --logdir <artifact root>`` lists every run as ``runs/<run_id>/tensorboard``).

Written with tensorboardX (0.7 MB installed, against 34 MB for the ``tensorboard`` package that
``torch.utils.tensorboard`` needs; the cluster only writes, the viewer runs where you look).
Events go to a local temporary directory while the run trains and are stored, each file through
the artifact store like every artifact, when the run ends, before the manifest: so the manifest
lists them with their sha256.

Scalars: every numeric field of a metrics row under its metrics.jsonl name (``losses`` as
``losses/<name>``), at the row's ``step``; ``final_eval/mean`` at the end. The hparams plugin
gets the agent's resolved config plus agent/env/seed/steps; text summaries hold the kit version,
code and packages hashes and the spec.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from rlfleet.artifacts import RunArtifacts

TB_DIR = "tensorboard"
FINAL_TAG = "final_eval/mean"


def _hparam(value: Any) -> float | int | str | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics row, tag -> value (``step`` is the x axis, not a scalar)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "losses" and isinstance(value, dict):
            out.update({f"losses/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class TensorBoardLog:
    def __init__(self, arts: RunArtifacts, hparams: dict[str, Any], text: dict[str, str]) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams as hparams_summary

        self.arts = arts
        self.tmp = tempfile.mkdtemp(prefix="rlfleet-tb-")
        self.writer = SummaryWriter(logdir=self.tmp, flush_secs=30)
        exp, ssi, self._sei = hparams_summary({k: _hparam(v) for k, v in hparams.items()}, {FINAL_TAG: 0.0})
        self.writer.file_writer.add_summary(exp)
        self.writer.file_writer.add_summary(ssi)
        for tag, body in text.items():
            self.writer.add_text(tag, body, 0)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)

    def close(self, final_mean: float, step: int) -> list[str]:
        """Write the final return and the hparams session end, store every event file; return
        their paths in the run."""
        self.writer.add_scalar(FINAL_TAG, final_mean, step)
        self.writer.file_writer.add_summary(self._sei)
        self.writer.close()
        stored = []
        for dirpath, _, names in os.walk(self.tmp):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                rel = f"{TB_DIR}/{os.path.relpath(path, self.tmp)}"
                with open(path, "rb") as f:
                    self.arts.write_bytes(rel, f.read())
                stored.append(rel)
        self.discard()
        return stored

    def discard(self) -> None:
        """Drop the local files (a run that fails stores none)."""
        self.writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
