"""Part 1 of issue 12: the multi-node cluster on this machine (``rlfleet local up --nodes N``).

One session cluster (tests/scaleout/multinode.py): head + worker-1 (2 CPUs) + worker-2 (2 CPUs,
1 fake GPU), each in its own network namespace on a private bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rlfleet.paths import local_state_file

from .multinode import LAYOUT, MultiNode


def _state(mn: MultiNode) -> dict:
    with mn.home_env():
        return json.loads(local_state_file().read_text())


def _holder(mn: MultiNode, name: str) -> int:
    return next(n["holder_pid"] for n in _state(mn)["nodes"] if n["name"] == name)


def _can_connect_from(pid: int, host: str, port: int) -> bool:
    """A TCP connect from inside ``pid``'s network namespace."""
    code = f"import socket;socket.create_connection(({host!r},{port}),timeout=3)"
    res = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code],
                         capture_output=True, timeout=30)  # fmt: skip
    return res.returncode == 0


def test_every_node_joins_with_the_resources_it_declares(multinode: MultiNode) -> None:
    nodes = {n["node_ip"]: n for n in multinode.nodes() if n["state"] == "ALIVE"}
    assert set(nodes) == {"10.87.0.1", "10.87.0.2", "10.87.0.3"}
    for i, (cpus, gpus) in enumerate(LAYOUT, start=1):
        res = nodes[f"10.87.0.{i + 1}"]["resources_total"]
        assert res["CPU"] == cpus
        assert res.get("GPU", 0.0) == gpus
    assert "GPU" not in nodes["10.87.0.1"]["resources_total"]
    # the cluster is behind token auth: the Jobs API refuses a request without the token
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(multinode.target.ray_address + "/api/v0/nodes", timeout=10)  # noqa: S310 - loopback
        raise AssertionError("the multi-node cluster answered without a token")
    except urllib.error.HTTPError as err:
        assert err.code == 401


def test_nothing_of_the_cluster_listens_on_the_host_network(multinode: MultiNode) -> None:
    """Every Ray process lives in a node namespace; on the host only the forwarder listens, on 127.0.0.1."""
    st = _state(multinode)
    host_ns = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip()
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    fwd = st["forwarder_pid"]
    seen_fwd = False
    for line in out.splitlines():
        for pid_s in [p.split(",")[0] for p in line.split("pid=")[1:]]:
            pid = int(pid_s)
            try:
                env = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if pid == fwd:
                seen_fwd = True
                assert line.split()[3].startswith("127.0.0.1:"), line
            else:  # no process of this cluster (marked by its nodes' RAY_TMPDIR) listens in the host namespace
                parent = f"RAY_TMPDIR={os.path.dirname(st['temp_dir'])}/".encode()
                assert not any(e.startswith(parent) for e in env.split(b"\0")), line
    assert seen_fwd
    for n in st["nodes"]:
        ns = subprocess.run(["readlink", f"/proc/{n['holder_pid']}/ns/net"], capture_output=True, text=True)
        assert ns.stdout.strip() not in ("", host_ns)
    # the bridge's subnet exists only inside the nodes' namespaces: no host interface is on it
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert " 10.87.0." not in addrs
    assert "rlbr0" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_a_node_can_be_cut_off_and_reconnected(multinode: MultiNode) -> None:
    pid = _holder(multinode, "worker-1")
    assert _can_connect_from(pid, "10.87.0.1", 6379)
    with multinode.restored("worker-1"):
        multinode.cut_node("worker-1")
        assert not _can_connect_from(pid, "10.87.0.1", 6379)
    deadline = time.monotonic() + 20  # the veth's carrier and the neighbour entry come back
    while not _can_connect_from(pid, "10.87.0.1", 6379):
        assert time.monotonic() < deadline, "worker-1 cannot reach the head 20 s after its link came back"


def test_a_stopped_node_is_lost_to_ray_and_comes_back(multinode: MultiNode) -> None:
    t0 = time.monotonic()
    with multinode.restored("worker-1"):
        assert multinode.stop_node("worker-1") >= 2  # raylet, agents, workers
        deadline = time.monotonic() + 90
        while "10.87.0.2" in multinode.alive_ips():
            assert time.monotonic() < deadline, "Ray still reports the stopped node ALIVE after 90 s"
            time.sleep(0.5)
        lost = time.monotonic() - t0
    print(f"\nnode lost to Ray after {lost:.1f} s, back after {time.monotonic() - t0:.1f} s")
    assert "10.87.0.2" in multinode.alive_ips()
