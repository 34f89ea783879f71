"""How the SDK decides that an on-prem target is supervised (runs through the queue, max_restarts
accepted): the heartbeat its rlfleet-supervisor unit keeps fresh in the artifact store, read where
the submitting machine sees the store. No host needed (tests/onprem/test_queue_supervisor.py runs
the real unit); the store is a directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rlfleet import RunSpec
from rlfleet.errors import SpecError
from rlfleet.provisioners import registry
from rlfleet.runqueue import FRESH_S, QueueStore
from rlfleet.runs import _submit
from rlfleet.targets import Target


def _onprem(root: Path, name: str) -> Target:
    # the cluster sees the NAS at /mnt/rlfleet/rlfleet; this machine at client_artifact_root
    return Target(name=name, kind="onprem", ray_address="https://10.0.0.9:8443", token_source="env:T",
                  artifact_root="file:///mnt/rlfleet/rlfleet", client_artifact_root=f"file://{root}")


def test_onprem_is_supervised_only_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    absent, stale, fresh = (_onprem(tmp_path / n, n) for n in ("absent", "stale", "fresh"))
    for t in (absent, stale, fresh):
        (tmp_path / t.name).mkdir()
    QueueStore(stale.store()).put_heartbeat({"beat": time.time() - FRESH_S - 5, "pid": 7, "host": "head"})
    QueueStore(fresh.store()).put_heartbeat({"beat": time.time(), "pid": 7, "host": "head"})
    assert [registry.supervised(t) for t in (absent, stale, fresh)] == [False, False, True]
    # a machine that cannot see the NAS at all: not supervised (runs go straight to Ray)
    assert not registry.supervised(_onprem(tmp_path / "no-such-mount", "unmounted"))
    for t in (absent, stale):
        with pytest.raises(SpecError, match=rf"^max_restarts: target '{t.name}' \(onprem\) has no live run "
                                            r"supervisor"):
            _submit(RunSpec(kind="train", agent="random", budget={"steps": 10}, max_restarts=1), t, None)
    with pytest.raises(SpecError) as err:
        _submit(RunSpec(kind="train", agent="random", budget={"steps": 10}, max_restarts=1), stale, None)
    line = str(err.value)
    assert "\n" not in line and f"{tmp_path}/stale/queue/supervisor.json" in line
    assert "'systemctl start rlfleet-supervisor'" in line and "client_artifact_root" in line
