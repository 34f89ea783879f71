"""What a conformance target is: the rlfleet Target plus the few things that differ by nature
between targets (where its store really is, where its monitoring reads, how its head stops).
See conftest.py for how targets are built and parametrized."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlfleet.targets import Target

RLFLEET = str(Path(sys.executable).parent / "rlfleet")


@dataclass
class ConformanceTarget:
    key: str
    target: Target
    own_store: str  # fsspec URI of the artifact root, read where the target's store really is
    storage_options: dict[str, Any] = field(default_factory=dict)
    timeout: float = 300.0  # one run's wait, generous for a 2-core machine shared by several sessions
    cache: dict[str, Any] = field(default_factory=dict)  # runs shared by several scenarios

    @property
    def name(self) -> str:
        return self.target.name

    # -- what every target answers the same way ------------------------------------------------
    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RLFLEET, *args, "--target", self.name], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([RLFLEET, *args, "--target", self.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def own_files(self, run_id: str) -> dict[str, bytes]:
        """Every file of a run, read straight from the target's store with fsspec (not the SDK)."""
        import fsspec

        fs, base = fsspec.core.url_to_fs(f"{self.own_store}/runs/{run_id}", **self.storage_options)
        base = base.rstrip("/")
        return {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}

    def trainer_pids(self, run_id: str) -> list[int]:
        """The run's Python process(es), found in this machine's /proc by the run id in their
        environment (RLFLEET_RUN_ID or the run envelope). The local head and the throwaway hosts
        (systemd-nspawn) are all processes of this machine, so one scan serves every target here."""
        return _pids_with_env(run_id, "rlfleet_agents.run")

    def kill(self, pid: int) -> None:
        """SIGKILL a process of the target by the pid it reports (its own pid namespace)."""
        os.kill(pid, signal.SIGKILL)

    def killable(self, replica: dict[str, Any]) -> bool:
        """Can kill() reach this replica (a row of the deployment's status)?"""
        return True

    def serve_front(self) -> str:
        """How a named deployment's URL starts on this target (its TLS front, or loopback)."""
        return "http://127.0.0.1:"

    # -- what differs by nature ----------------------------------------------------------------
    def monitored(self, run_id: str) -> dict[str, Any]:
        """{'episode_return': float, 'env_steps': float, 'labels': {...}} as the monitoring sees it."""
        raise NotImplementedError

    @contextlib.contextmanager
    def head_down(self) -> Iterator[None]:
        raise NotImplementedError
        yield

    def release(self) -> None:
        """Called when the session is done with this target (its scenarios ran): stop what only it
        uses. Idempotent; the session fixtures' own teardown still runs at the end."""


def _pids_with_env(run_id: str, cmd_part: str) -> list[int]:
    # the run id travels in the run's environment: RLFLEET_RUN_ID, or inside the run envelope's JSON
    want = re.compile(rb'(?:^RLFLEET_RUN_ID=|"run_id":\s*")' + re.escape(run_id.encode()) + rb'(?:"|$)')
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not comm.startswith("python") or cmd_part not in cmdline:
                continue  # the shell Ray starts the entrypoint with carries the same environment
            if any(want.search(var) for var in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")):
                out.append(int(entry))
        except OSError:
            continue
    return out


# -- local ----------------------------------------------------------------------------------------

class LocalConformance(ConformanceTarget):
    def monitored(self, run_id: str) -> dict[str, Any]:
        # the local target has no Prometheus: its monitoring is metrics.jsonl in the store, what
        # 'rlfleet run --wait' (progress) and 'rlfleet plot' read (docs/agents.md)
        res = self.cli("plot", run_id, "--out", str(Path(self.cache["tmp"]) / f"{run_id}.png"), "--json")
        assert res.returncode == 0, res.stderr
        rows = [json.loads(line) for line in self.own_files(run_id)["metrics.jsonl"].decode().splitlines()]
        last = rows[-1]
        return {"episode_return": last["episode_return_mean"], "env_steps": last["step"],
                "labels": {"run_id": run_id, "plot": json.loads(res.stdout)}}

    @contextlib.contextmanager
    def head_down(self) -> Iterator[None]:
        from rlfleet.local import ensure_local_up, local_down

        assert local_down() is True
        try:
            yield
        finally:
            self.target = ensure_local_up()  # new ports; the shared local_cluster fixture follows


# -- the cloud-node hosts (awsnode.py, gcpnode.py) ------------------------------------------------

class CloudNodeConformance(ConformanceTarget):
    """A stack's nodes as throwaway hosts (``cluster``: tests/conformance/cloudnode.py)."""

    cluster: Any = None

    def kill(self, pid: int) -> None:
        # a replica: on the head, a pid of its namespace (the shell's kill: the image has no procps)
        self.cluster.head.nsexec("sh", "-c", f"kill -KILL {int(pid)}")

    def killable(self, replica: dict[str, Any]) -> bool:
        # replicas are spread over the nodes; kill() reaches the head's, which serve on its loopback
        # beside the balancer (the deploy run and its controller are placed on the head)
        return str(replica.get("address", "")).startswith("127.0.0.1:")

    def serve_front(self) -> str:
        return f"https://{self.cluster.public_ip}:"  # the head's nginx on its public ip, the stack's CA


# -- onprem ---------------------------------------------------------------------------------------

class OnpremConformance(ConformanceTarget):
    host: Any = None

    def _prom(self, query: str) -> list[dict[str, Any]]:
        q = urllib.parse.quote(query, safe="")
        out = self.host.nsexec("curl", "-fsS", f"http://127.0.0.1:9090/api/v1/query?query={q}").stdout
        return list(json.loads(out)["data"]["result"])

    def kill(self, pid: int) -> None:
        self.host.nsexec("kill", "-KILL", str(pid))  # a pid of the container's namespace

    def serve_front(self) -> str:
        return f"https://{self.host.ip}:"  # nginx on the head's address, the cluster CA

    def monitored(self, run_id: str) -> dict[str, Any]:
        # the host's Prometheus (loopback on the monitoring host), asked from inside the host
        return prometheus_monitored(self._prom, run_id, "Prometheus on the on-prem host")

    @contextlib.contextmanager
    def head_down(self) -> Iterator[None]:
        self.host.nsexec("systemctl", "stop", "rlfleet-ray-head", timeout=120)
        try:
            yield
        finally:
            self.host.nsexec("systemctl", "start", "rlfleet-ray-head", timeout=120)
            wait_jobs_api(self.target)


def wait_jobs_api(target: Target, timeout: float = 180) -> None:
    """Until the target's Jobs API answers again (after its head was started)."""
    from rlfleet.jobs import JobsClient

    client = JobsClient(target.ray_address, target.token(), target_name=target.name, ca_cert=target.ca_cert,
                        timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def prometheus_monitored(query: Callable[[str], list[dict[str, Any]]], run_id: str, where: str,
                         timeout: float = 90) -> dict[str, Any]:
    """A run's episode return and env steps (and the labels) from a Prometheus query API."""
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for name in ("episode_return", "env_steps_total"):
        promql = f'last_over_time(ray_rlfleet_{name}{{run_id="{run_id}"}}[15m])'
        while not (result := query(promql)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{where} has no {promql}")
            time.sleep(3)
        got[name] = max(float(r["value"][1]) for r in result)
        got["labels"] = result[0]["metric"]
    return {"episode_return": got["episode_return"], "env_steps": got["env_steps_total"], "labels": got["labels"]}


def driver_ip(tgt: ConformanceTarget, run_id: str) -> str:
    """The node ip where Ray ran the run's entrypoint, from the Jobs API: the driver's own address
    when it connected to Ray as a driver (driver_info), else the address of the job agent that
    started the entrypoint on its node (driver_agent_http_address, with driver_node_id)."""
    from rlfleet.jobs import JobsClient

    t = tgt.target
    info = JobsClient(t.ray_address, t.token(), target_name=t.name, ca_cert=t.ca_cert).get(run_id)
    driver = info.get("driver_info") or {}
    if driver.get("node_ip_address"):
        return str(driver["node_ip_address"])
    agent = urllib.parse.urlsplit(info.get("driver_agent_http_address") or "").hostname
    assert agent and info.get("driver_node_id"), f"the Jobs API names no driver node for {run_id}: {json.dumps(info)}"
    return agent


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
