"""The session's one multi-node Ray cluster: a head plus worker nodes on this machine, each node in
its own network namespace on a private bridge (``rlfleet local up --nodes N`` underneath), token auth
on, with the run supervisor on the head (its heartbeat in the store makes the ``ray`` target below
supervised: queue and ``max_restarts``). Registered in tests/conftest.py as the session fixture
``multinode``, so every test directory shares the same cluster.

Layout (``LAYOUT``): the head (1 CPU) at 10.87.0.1, ``worker-1`` (2 CPUs, no GPU) at 10.87.0.2,
``worker-2`` (2 CPUs, 1 fake GPU) at 10.87.0.3. It lives in its own ``RLFLEET_HOME`` (the session's
single-node ``local_cluster`` keeps the test run's home), and tests reach it as a ``ray``-kind
target (``multinode.target``) that nothing re-provisions on submit.

Tests can break nodes: ``stop_node("worker-1")`` SIGKILLs that node's Ray processes (a lost node),
``start_node`` brings it back as a new Ray node, ``cut_node`` / ``reconnect_node`` set its link
on the bridge down / up. A test that breaks a node must put it back (``restored(name)``) so later
tests find the cluster whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import said

# (cpus, gpus) per worker node; the head gets HEAD_CPUS
LAYOUT = [(2, 0.0), (2, 1.0)]
HEAD_CPUS = 1


@contextlib.contextmanager
def _home(path: Path) -> Iterator[None]:
    old = os.environ.get("RLFLEET_HOME")
    os.environ["RLFLEET_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RLFLEET_HOME", None)
        else:
            os.environ["RLFLEET_HOME"] = old


@dataclass
class MultiNode:
    home: Path
    target: Any  # rlfleet.targets.Target (kind 'ray')
    boot_s: float
    figures: dict[str, float] = field(default_factory=dict)

    def home_env(self) -> contextlib.AbstractContextManager[None]:
        """RLFLEET_HOME pointing at this cluster's home (for rlfleet.local calls)."""
        return _home(self.home)

    def client(self) -> Any:
        from rlfleet.jobs import JobsClient

        return JobsClient(self.target.ray_address, self.target.token(), target_name=self.target.name)

    def nodes(self) -> list[dict[str, Any]]:
        """Ray's view of the nodes (state API): node_id, node_ip, state, resources_total."""
        out = self.client().get_json("/api/v0/nodes?limit=100&detail=1") or {}
        return list(out.get("data", {}).get("result", {}).get("result", []))

    def node_ip_of(self) -> dict[str, str]:
        """node_id -> node IP, for every node Ray knows (alive or dead)."""
        return {n["node_id"]: n["node_ip"] for n in self.nodes()}

    def actors(self, class_name: str | None = None) -> list[dict[str, Any]]:
        """Ray's actor table (state API), optionally only actors of ``class_name``."""
        q = "/api/v0/actors?limit=1000&detail=1"
        if class_name:
            q += f"&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        out = self.client().get_json(q) or {}
        return list(out.get("data", {}).get("result", {}).get("result", []))

    def stop_node(self, name: str, *, hard: bool = True) -> int:
        from rlfleet.local import node_stop

        with self.home_env():
            return node_stop(name, hard=hard)

    def start_node(self, name: str) -> None:
        from rlfleet.local import node_start

        with self.home_env():
            node_start(name)

    def cut_node(self, name: str) -> None:
        from rlfleet.local import node_link

        with self.home_env():
            node_link(name, up=False)

    def reconnect_node(self, name: str) -> None:
        from rlfleet.local import node_link

        with self.home_env():
            node_link(name, up=True)

    def alive_ips(self) -> set[str]:
        return {n["node_ip"] for n in self.nodes() if n.get("state") == "ALIVE"}

    def wait_alive(self, ips: set[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not ips <= self.alive_ips():
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes {sorted(ips - self.alive_ips())} not ALIVE within {timeout:.0f} s")
            time.sleep(1)

    @contextlib.contextmanager
    def restored(self, name: str) -> Iterator[None]:
        """Run a block that breaks node ``name``; afterwards it is reconnected, restarted if its Ray
        is gone, and ALIVE again."""
        ip = self.node_record(name)["ip"]
        try:
            yield
        finally:
            self.reconnect_node(name)
            if ip not in self.alive_ips():
                self.stop_node(name)  # whatever is left of the old raylet
                self.start_node(name)
            self.wait_alive({ip})

    def node_record(self, name: str) -> dict[str, Any]:
        from rlfleet.local import local_status

        with self.home_env():
            return next(n for n in local_status()["nodes"] if n["name"] == name)


def start_multinode() -> Iterator[MultiNode]:
    from rlfleet.local import local_down, local_status
    from rlfleet.provisioners.local_supervisor import local_up
    from rlfleet.provisioners.refs import NoRef
    from rlfleet.targets import Target

    base = Path(tempfile.mkdtemp(prefix="rlfleet-mn-"))
    home = base / "home"
    t0 = time.monotonic()
    with _home(home):
        try:
            local = local_up(  # as 'rlfleet local up --nodes 2': with the run supervisor
                num_cpus=HEAD_CPUS, nodes=len(LAYOUT), node_cpus=LAYOUT[0][0], node_gpus=[g for _, g in LAYOUT]
            )
            assert local_status()["running"]
        except BaseException:
            local_down()
            raise
    target = Target(
        name="multinode", kind="ray", ray_address=local.ray_address, token_source=local.token_source,
        artifact_root=local.artifact_root, provisioner=NoRef(type="none"),
    )  # fmt: skip
    mn = MultiNode(home=home, target=target, boot_s=time.monotonic() - t0)
    try:
        mn.wait_alive({"10.87.0.1", "10.87.0.2", "10.87.0.3"}, timeout=60)
        said.say(f"multinode cluster up in {mn.boot_s:.1f} s")
        yield mn
    finally:
        t1 = time.monotonic()
        with _home(home):
            local_down()
        shutil.rmtree(base, ignore_errors=True)  # the cluster's home: token, state, the runs' artifacts
        print(f"\nmultinode cluster stopped in {time.monotonic() - t1:.1f} s", flush=True)


@pytest.fixture(scope="session")
def multinode() -> Iterator[MultiNode]:
    """The session's multi-node cluster (head + 2 worker nodes, one with a fake GPU); ~40 s to boot."""
    yield from start_multinode()
