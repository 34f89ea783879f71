"""The controller of one named deployment: ``python -m rlfleet_agents.controller``, a long-running
Ray job submitted by :func:`rlfleet.deployments.deploy` (the submitting laptop may be closed).

It polls the registry (``deployments/<name>/state/``, about once a second) and makes the cluster
match the state in force:

- **Replicas** are :class:`rlfleet_agents.replica.Replica` Ray actors spread over the cluster's
  nodes (:func:`spread_nodes`, hard node affinity). One on this node binds 127.0.0.1 (only the balancer on the same node
  reaches it); one on another node serves its node's address over mutual TLS with a certificate of
  this deployment's CA (rlfleet_agents.deploytls), which HAProxy verifies. A replica that dies is
  replaced. Shadow replicas always serve mutual TLS on their node's address; every live replica
  copies traffic to them with a client certificate of the same CA.
- **The balancer** is HAProxy (an existing load balancer, not ours), started once with a fixed
  frontend port (the name's port never changes across versions) and a pool of server slots
  (``server-template``); replicas join, leave and change weight through HAProxy's runtime API on a
  0600 unix socket, without a reload. Active health checks (``GET /healthz``), ``retries`` with
  ``option redispatch`` and ``retry-on conn-failure empty-response`` so a dead replica costs no
  request once it is seen down. Canary = weights of the live and canary servers of one backend.
- **Rolling update / promote / rollback**: the new version's replicas start and join first; the old
  ones are set to maintenance (drained), then stopped.
- **Shadow**: the live replicas send a copy of each answered request to the shadow replicas (which
  are not in the balancer) and count agreement and latency.
- **Automatic rollback**: over the SLO window, a canary whose error rate (HAProxy's per-server 5xx
  and failed responses) or p99 latency (measured by its replicas) breaks the thresholds is
  removed by a new state document written by the controller, saying why.
- ``status.json`` records what it observes each round; an undeploy state (``active: false``) or
  SIGTERM removes the replicas and the balancer and ends the job.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from rlfleet.artifacts import ArtifactStore
from rlfleet.deployments import CONTROLLER_ENV, DeploymentError, Registry

SLOTS = 32
BACKEND = "replicas"
POLL_S = 0.5
ANSWER_WAIT_S = 1.0  # how long a round waits for the replicas' pings and stats (a cut-off node never answers)
DRAIN_S = 2.0
START_TIMEOUT_S = 120.0


@dataclass
class Slot:
    srv: str  # its HAProxy server: s<n> (loopback, plain HTTP) or t<n> (another node, TLS)
    version: int
    actor: Any
    port: int
    pid: int
    role: str  # balanced | shadow
    replica: str = ""  # its id in metrics and under deployments/<name>/replicas/
    host: str = "127.0.0.1"  # the address HAProxy reaches it at
    node_id: str = ""  # the Ray node it runs on
    client_cert: bytes = b""  # a live replica's client certificate, for its copies to https shadows
    draining_since: float | None = None

    @property
    def order(self) -> tuple[str, int]:
        return self.srv[0], int(self.srv[1:])


@dataclass
class Window:
    """Per-server HAProxy counters over time, for error rates over the SLO window."""

    samples: list[tuple[float, dict[str, dict[str, int]]]] = field(default_factory=list)

    def add(self, t: float, rows: dict[str, dict[str, int]], keep_s: float) -> None:
        self.samples.append((t, rows))
        while len(self.samples) > 2 and self.samples[1][0] < t - keep_s:
            self.samples.pop(0)

    def delta(self, servers: list[str]) -> tuple[int, int]:
        """(responses, errors) over the window for ``servers``."""
        if len(self.samples) < 2:
            return 0, 0
        (_, old), (_, new) = self.samples[0], self.samples[-1]
        resp = err = 0
        for s in servers:
            a, b = old.get(s, {}), new.get(s, {})
            d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
            err += max(0, d.get("hrsp_5xx", 0)) + max(0, d.get("eresp", 0))
            resp += sum(max(0, d.get(k, 0)) for k in ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx",
                                                       "hrsp_5xx", "hrsp_other", "eresp"))
        return resp, err


class Balancer:
    """One HAProxy process: frontend 127.0.0.1:<port>, one backend of SLOTS server slots."""

    def __init__(self, name: str, port: int, balance: str = "roundrobin", ca: Any = None) -> None:
        # Debian's haproxy is /usr/sbin/haproxy; a node's Ray unit (on-prem) has no sbin in its PATH
        exe = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin:/sbin")
        if exe is None:
            raise DeploymentError("haproxy is not installed on this node: apt-get install haproxy "
                                  "(the Makefile's APT_PACKAGES and the on-prem role install it)")
        self.dir = tempfile.mkdtemp(prefix=f"rlfleet-lb-{name}-")
        os.chmod(self.dir, 0o700)
        self.sock = os.path.join(self.dir, "admin.sock")
        self.port = port
        if ca is not None:  # the remote replicas' CA and HAProxy's client certificate (rlfleet_agents.deploytls)
            from rlfleet_agents.deploytls import write_private

            write_private(os.path.join(self.dir, "ca.pem"), ca.cert_pem)
            write_private(os.path.join(self.dir, "client.pem"), ca.client_pem())
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_config(name, port, self.sock, balance, self.dir if ca is not None else None))
        self.proc = subprocess.Popen([exe, "-f", cfg, "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = (self.proc.stdout.read() if self.proc.stdout else b"").decode(errors="replace")
                raise DeploymentError(f"haproxy could not start on 127.0.0.1:{port}: {' '.join(out.split())[-300:]}")
            with contextlib.suppress(OSError):
                self.cmd("show info")
                return
            time.sleep(0.05)
        raise DeploymentError(f"haproxy did not open its runtime socket in 15 s ({self.sock})")

    def cmd(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.sock)
            s.sendall(command.encode() + b"\n")
            out = bytearray()
            while chunk := s.recv(65536):
                out += chunk
        return out.decode(errors="replace")

    def enable(self, server: str, host: str, port: int, weight: int) -> None:
        srv = f"{BACKEND}/{server}"
        self.cmd(f"set server {srv} addr {host} port {port}; set server {srv} weight {weight}; "
                 f"set server {srv} state ready")

    def weight(self, server: str, weight: int) -> None:
        self.cmd(f"set server {BACKEND}/{server} weight {weight}")

    def drain(self, server: str) -> None:
        self.cmd(f"set server {BACKEND}/{server} state maint")

    def stats(self) -> dict[str, dict[str, Any]]:
        text = self.cmd("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        cols = lines[0][2:].split(",")
        out: dict[str, dict[str, Any]] = {}
        for line in lines[1:]:
            row = dict(zip(cols, line.split(","), strict=False))
            sv = row.get("svname", "")
            if row.get("pxname") == BACKEND and sv[:1] in ("s", "t") and sv[1:].isdigit():
                out[row["svname"]] = {k: (int(v) if v.isdigit() else v) for k, v in row.items()}
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def haproxy_config(name: str, port: int, sock: str, balance: str = "roundrobin", tls_dir: str | None = None) -> str:
    """Slots s1..s32 for replicas on this node (127.0.0.1, plain HTTP); with ``tls_dir`` (ca.pem,
    client.pem) also t1..t32 for replicas on other nodes: HTTPS (health checks too), the replica's
    certificate verified against the deployment's CA, HAProxy's client certificate presented."""
    remote = (f"\n    server-template t 1-{SLOTS} 127.0.0.1:9 disabled ssl verify required "
              f"ca-file {tls_dir}/ca.pem crt {tls_dir}/client.pem" if tls_dir else "")
    return f"""global
    maxconn 4096
    stats socket {sock} mode 600 level admin
    stats timeout 10s

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    retries 3
    option redispatch 1
    option http-buffer-request
    retry-on conn-failure empty-response response-timeout

frontend {name}
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance {balance}
    option httpchk GET /healthz
    http-check expect status 200
    default-server check inter 500ms fastinter 200ms downinter 1s fall 2 rise 1
    server-template s 1-{SLOTS} 127.0.0.1:9 disabled{remote}
"""


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def weights(live: int, n_live: int, canary: int | None, n_canary: int, canary_pct: int) -> dict[int, int]:
    """HAProxy weights (1-256 per server) of the live and canary replicas whose traffic share is the
    closest to ``canary_pct`` % (the best integer pair; rounding one scale was 20 % off at 1 %)."""
    if not canary or not n_canary:
        return {live: 100}
    if canary_pct >= 100:
        return {live: 0, canary: 100}
    target, best = canary_pct / 100, (2.0, 0, 1, 1)
    for wc in range(1, 257):
        wl = round(wc * (100 - canary_pct) * n_canary / (canary_pct * max(1, n_live)))
        if 1 <= wl <= 256:
            err = abs(wc * n_canary / (wc * n_canary + wl * n_live) - target)
            best = min(best, (round(err, 9), -wc, wl, wc))  # ties: the larger weights (HAProxy spreads them finer)
    return {live: best[2], canary: best[3]}


def pick_port(serve_ports: list[int], *, any_port: bool = True) -> int:
    """The first free of the target's deploy ports (the ports the local target forwards), else any
    free port (unless ``any_port`` is False: then a clear error)."""
    for p in [*serve_ports, *([0] if any_port else [])]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DeploymentError(f"all deploy ports {serve_ports} of this node's TLS front are in use: undeploy a "
                          "deployment (or cancel a deploy run), or add ports to tls_front_serve_ports and converge")


def balancer_address(env: dict[str, str], serve_ports: list[int]) -> tuple[int, str]:
    """(port HAProxy binds on 127.0.0.1, URL clients use). On a node with a TLS front (on-prem: the
    Ray unit's RLFLEET_SERVE_TLS_ADDRESS/PORTS, nginx serving https://<address>:<p> for
    127.0.0.1:<p>), one of the front's ports and its https URL; else a loopback URL."""
    host = env.get("RLFLEET_SERVE_TLS_ADDRESS", "").strip()
    front = [int(p) for p in env.get("RLFLEET_SERVE_TLS_PORTS", "").split(",") if p.strip()]
    if host and front:
        port = pick_port([p for p in serve_ports if p in front] or front, any_port=False)
        return port, f"https://{f'[{host}]' if ':' in host else host}:{port}"
    port = pick_port(serve_ports)
    return port, f"http://127.0.0.1:{port}"


def spread_nodes(alive: list[str], placed: list[str], count: int, home: str) -> list[str]:
    """The nodes for ``count`` new replicas: each to the alive node that holds fewest of the
    deployment's replicas so far (``placed``, one node id per replica), ties to ``home`` (the
    controller's node: loopback, no TLS hop) and then by node id. No alive node known: "" each
    (Ray places them)."""
    if not alive:
        return [""] * count
    held = {n: 0 for n in alive}
    for n in placed:
        if n in held:
            held[n] += 1
    out = []
    for _ in range(count):
        node = min(held, key=lambda n: (held[n], n != home, n))
        out.append(node)
        held[node] += 1
    return out


def replica_policy_uri(doc: dict[str, Any], artifact_root: str) -> str:
    """The version's policy.onnx as this cluster reads it: under the cluster's artifact root. The
    document's policy_uri is where the registering SDK read it, which on-prem is the NAS as the
    client mounts it (client_artifact_root); the sha256 check is the same either way."""
    from rlfleet.artifacts import RUNS_DIR

    return f"{artifact_root.rstrip('/')}/{RUNS_DIR}/{doc['source_run']}/policy.onnx"


def slo_breach(slo: dict[str, Any], responses: int, errors: int, p99_ms: float | None) -> str | None:
    """Why a canary breaks its SLO over the window, or None (too few requests to judge is no breach)."""
    if responses < int(slo.get("min_requests", 20)):
        return None
    rate = errors / responses
    if rate > float(slo["max_error_rate"]):
        return f"error rate {rate:.2f} > {slo['max_error_rate']} over {responses} requests"
    if p99_ms is not None and p99_ms > float(slo["p99_ms"]):
        return f"p99 {p99_ms:.0f} ms > {slo['p99_ms']} ms over {responses} requests"
    return None


class ReplicaStartError(Exception):
    def __init__(self, version: int, reason: str) -> None:
        super().__init__(reason)
        self.version = version
        self.reason = reason


def _reason(err: BaseException) -> str:
    """The line that says why from a Ray error wrapping a replica's exception (not its traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "refused:" in ln:
            return ln[ln.index("refused:"):]
    return lines[-1][:300] if lines else type(err).__name__


class Autoscaler:
    """Replicas of the live version between ``min`` and ``max`` from the in-flight requests per
    replica (HAProxy's current sessions of the live servers, averaged over the last ``window_s``):
    up at once to ceil(in-flight / target), down one replica at a time after ``down_after_s`` of
    needing fewer."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.current: int | None = None
        self.low_since: float | None = None
        self.inflight_avg = 0.0

    def sample(self, inflight: int, window_s: float) -> None:
        now = time.monotonic()
        self.samples = [(t, n) for t, n in self.samples if t >= now - window_s] + [(now, inflight)]
        self.inflight_avg = sum(n for _, n in self.samples) / len(self.samples)

    def replicas(self, cfg: dict[str, Any], fallback: int) -> int:
        lo, hi = int(cfg["min"]), int(cfg["max"])
        cur = min(max(self.current or fallback, lo), hi)
        need = min(max(math.ceil(self.inflight_avg / float(cfg.get("target_inflight", 4))), lo), hi)
        now = time.monotonic()
        if need > cur:
            cur, self.low_since = need, None
        elif need < cur:
            self.low_since = self.low_since or now
            if now - self.low_since >= float(cfg.get("down_after_s", 10)):
                cur, self.low_since = cur - 1, now
        else:
            self.low_since = None
        self.current = cur
        return cur


class Controller:
    def __init__(self, reg: Registry, cfg: dict[str, Any]) -> None:
        import ray

        self.ray = ray
        self.reg = reg
        self.cfg = cfg
        self.slots: dict[str, Slot] = {}
        self.pings: dict[str, tuple[Any, float]] = {}  # server -> (its unanswered ping, sent at)
        self.stats_calls: dict[str, Any] = {}  # server -> its stats call not answered yet
        self.last_stats: dict[str, dict[str, Any]] = {}  # server -> its last stats answer
        self.window = Window()
        self.stop = False
        self.applied = 0
        self.shadow_urls: list[str] = []
        self.scaler = Autoscaler()
        self.problem: str | None = None
        self.audit_rate = float((reg.state() or {}).get("audit_rate", 0.01))
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        ep = reg.endpoint()
        if ep:
            port, url = int(ep["port"]), ep["url"]
        else:
            port, url = balancer_address(dict(os.environ), list(cfg.get("serve_ports") or []))
        from rlfleet_agents.deploytls import DeploymentCA

        self.ca = DeploymentCA(reg.name)
        self.lb = Balancer(reg.name, port, ca=self.ca)
        if ep is None:
            reg.create("endpoint.json", {"url": url, "port": port, "path": f"/v1/policies/{reg.name}/act",
                                         "node": self.node_id})

    # -- replicas ---------------------------------------------------------------------------------
    def _start(self, version: int, count: int, role: str, token_sha: str) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from rlfleet_agents.replica import Replica

        doc = self.reg.version(version)
        # over the cluster's alive nodes, each new replica to the node holding fewest of this
        # deployment's. Hard node affinity: on Ray 2.60 soft affinity (and SPREAD) put all 3 of a
        # deployment's replicas on the controller's node (measured on the multi-node cluster); a
        # replica its node cannot take (the node died meanwhile) is started once more wherever Ray
        # places it. A shadow always serves mutual TLS on its node's address, where the live
        # replicas on every node reach it.
        alive = [str(n["NodeID"]) for n in self.ray.nodes() if n.get("Alive")]
        targets = spread_nodes(alive, [s.node_id for s in self.slots.values() if s.draining_since is None],
                               count, self.node_id)
        observe = {"artifact_root": self.cfg["artifact_root"], "target": self.cfg.get("target"),
                   "env": doc.get("env"), "audit_rate": self.audit_rate}
        uri = replica_policy_uri(doc, self.cfg["artifact_root"])

        def launch(node: str) -> Any:
            strategy = NodeAffinitySchedulingStrategy(node, soft=False) if node else "SPREAD"
            cls: Any = self.ray.remote(Replica).options(num_cpus=0, max_restarts=0, max_concurrency=4,
                                                        scheduling_strategy=strategy)
            return cls.remote(self.reg.name, version, token_sha, uri, doc["policy_sha256"],
                              self.cfg.get("storage_options") or {}, observe, self.node_id, role == "shadow")

        def ready(actor: Any) -> dict[str, Any]:
            info = self.ray.get(actor.info.remote(), timeout=START_TIMEOUT_S)
            if info["port"] is None:  # TLS: it serves once this deployment's CA signed its key
                cert = self.ca.sign(info["csr"], ip=info["host"])
                info = self.ray.get(actor.serve_tls.remote(cert, self.ca.cert_pem), timeout=START_TIMEOUT_S)
            return dict(info)

        actors = [(launch(node), node) for node in targets]
        failure = None
        for actor, node in actors:
            try:
                try:
                    info = ready(actor)
                except Exception:
                    if not node:
                        raise
                    with contextlib.suppress(Exception):
                        self.ray.kill(actor)
                    actor = launch("")  # its node could not take it: wherever Ray places it
                    info = ready(actor)
            except Exception as err:  # the actor's __init__ raised (e.g. a policy that fails its checksum)
                failure = failure or err
                with contextlib.suppress(Exception):
                    self.ray.kill(actor)
                continue
            prefix = "t" if info.get("tls") else "s"
            srv = next(f"{prefix}{i}" for i in range(1, SLOTS + 1) if f"{prefix}{i}" not in self.slots)
            self.slots[srv] = Slot(srv, version, actor, info["port"], info["pid"], role, info.get("replica", ""),
                                   info.get("host", "127.0.0.1"), info.get("node_id", ""),
                                   self.ca.sign(info["csr"], client=True) if role == "balanced" else b"")
            if self.shadow_urls and role == "balanced":
                actor.set_shadows.remote(self.shadow_urls, self.slots[srv].client_cert, self.ca.cert_pem)
        if failure is not None:
            raise ReplicaStartError(version, _reason(failure))

    def _reap_dead(self) -> bool:
        """Take replicas whose process is gone out of the balancer; True if there were any. A ping
        that is not answered within ANSWER_WAIT_S stays pending for the next rounds (a replica on a
        cut-off node: HAProxy's checks take it out; Ray says when its node is dead) instead of
        holding up the round."""
        live = [s for s in self.slots.values() if s.draining_since is None]
        now = time.monotonic()
        for s in live:
            if s.srv not in self.pings:
                self.pings[s.srv] = (s.actor.ping.remote(), now)
        refs = {self.pings[s.srv][0]: s for s in live}
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=ANSWER_WAIT_S)
        dead = False
        for ref in ready:
            self.pings.pop(refs[ref].srv, None)
            try:
                self.ray.get(ref)
            except Exception:
                s = refs[ref]
                if s.role == "balanced":
                    self.lb.drain(s.srv)
                self._forget(s.srv)
                print(f"replica v{s.version} {s.srv} (pid {s.pid} on {s.host}) died; replacing it", flush=True)
                dead = True
        return dead

    def _forget(self, srv: str) -> None:
        """The server's slot is free again: nothing of its replica may be taken for the next one."""
        self.slots.pop(srv, None)
        for d in (self.pings, self.stats_calls, self.last_stats):
            d.pop(srv, None)

    def apply(self, st: dict[str, Any]) -> bool:
        """Move towards ``st``; True once it is fully applied."""
        live, canary, shadow = st["live"], st.get("canary"), st.get("shadow")
        want = {int(v): int(n) for v, n in (st.get("replicas") or {}).items() if int(v) in (live, canary, shadow)}
        want.setdefault(live, 1)
        if st.get("autoscale"):
            want[live] = self.scaler.replicas(st["autoscale"], want[live])
        roles = {v: ("shadow" if v == shadow and v not in (live, canary) else "balanced") for v in want}
        token = st["token_sha256"]
        active = [s for s in self.slots.values() if s.draining_since is None]
        for v, n in want.items():
            have = [s for s in active if s.version == v and s.role == roles[v]]
            if len(have) < n:
                try:
                    self._start(v, n - len(have), roles[v], token)
                except ReplicaStartError as err:
                    self._cannot_start(st, err)
                    return False
        # shadow targets of the live replicas
        urls = sorted(f"https://{f'[{s.host}]' if ':' in s.host else s.host}:{s.port}" for s in self.slots.values()
                      if s.role == "shadow" and s.draining_since is None)
        if urls != self.shadow_urls:
            self.shadow_urls = urls
            for s in self.slots.values():
                if s.role == "balanced":
                    s.actor.set_shadows.remote(urls, s.client_cert, self.ca.cert_pem)
        # weights: new servers join before old ones leave
        active = [s for s in self.slots.values() if s.draining_since is None]
        count = {v: sum(1 for s in active if s.version == v and s.role == "balanced") for v in (live, canary) if v}
        w = weights(live, count.get(live, 0), canary, count.get(canary, 0) if canary else 0,
                    int(st.get("canary_weight") or 0))
        stats = self.lb.stats()
        for s in active:
            if s.role != "balanced" or s.version not in w:
                continue
            row = stats.get(s.srv, {})
            if str(row.get("status", "")).startswith("MAINT"):
                self.lb.enable(s.srv, s.host, s.port, w[s.version])
            elif row.get("weight") != w[s.version]:
                self.lb.weight(s.srv, w[s.version])
        stats = self.lb.stats()
        serving = all(str(stats.get(s.srv, {}).get("status", "")).startswith("UP")
                      for s in active if s.role == "balanced" and s.version in w)
        # surplus and retired replicas: drained once the wanted ones serve, stopped after DRAIN_S
        now = time.monotonic()
        for v in {s.version for s in active}:
            mine = sorted((s for s in active if s.version == v), key=lambda s: (s.role != roles.get(v), s.order))
            keep = sum(1 for s in mine[:want.get(v, 0)] if s.role == roles.get(v))
            for s in mine[keep:]:
                if serving or s.role == "shadow":
                    if s.role == "balanced":
                        self.lb.drain(s.srv)
                    s.draining_since = now
        for s in list(self.slots.values()):
            if s.draining_since is not None and now - s.draining_since >= DRAIN_S:
                self._kill(s)
        return serving and not any(s.draining_since is not None for s in self.slots.values())

    def _cannot_start(self, st: dict[str, Any], err: ReplicaStartError) -> None:
        """A version whose replicas cannot start: a canary or shadow is removed, a new live version is
        rolled back to the previous one (state documents by the controller, saying why); with nothing
        to go back to, status.json carries the error."""
        v, why = err.version, f"replicas of v{err.version} cannot start: {err.reason}"
        print(why, flush=True)
        replicas = {k: n for k, n in st["replicas"].items() if k != str(v)}
        if v == st.get("canary"):
            changes: dict[str, Any] = {"canary": None, "canary_weight": 0, "replicas": replicas}
        elif v == st.get("shadow"):
            changes = {"shadow": None, "replicas": replicas}
        elif v == st["live"] and st.get("previous"):
            changes = {"live": st["previous"], "previous": None,
                       "replicas": {**replicas, str(st["previous"]): st["replicas"].get(str(v), 1)}}
        else:
            self.problem = why
            return
        try:
            self.reg.write_state(st, {**changes, "rolled_back": {"version": v, "reason": why}},
                                 f"automatic rollback: {why}", by="controller")
        except DeploymentError:
            pass  # changed meanwhile: judged again next round

    def _kill(self, s: Slot) -> None:
        with contextlib.suppress(Exception):
            self.ray.get(s.actor.stop.remote(), timeout=10)
        with contextlib.suppress(Exception):
            self.ray.kill(s.actor)
        self._forget(s.srv)

    # -- observation --------------------------------------------------------------------------------
    def observe(self, st: dict[str, Any]) -> dict[str, Any]:
        slo = st.get("slo") or {}
        window_s = float(slo.get("window_s", 5.0))
        stats = self.lb.stats()
        self.window.add(time.monotonic(), {k: {c: v for c, v in row.items() if isinstance(v, int)}
                                           for k, row in stats.items()}, window_s)
        current = list(self.slots.values())
        now = time.monotonic()
        unanswered = {srv: now - t for srv, (_, t) in self.pings.items() if now - t > ANSWER_WAIT_S}
        # one stats call per replica at a time; a round waits at most ANSWER_WAIT_S for them and
        # otherwise uses each replica's last answer (a loaded node answers late, a cut-off one never)
        for s in current:
            if s.srv not in self.stats_calls:
                self.stats_calls[s.srv] = s.actor.stats.remote(window_s)
        refs = {self.stats_calls[s.srv]: s for s in current}
        ready = self.ray.wait(list(refs), num_returns=len(refs), timeout=ANSWER_WAIT_S)[0] if refs else []
        for ref in ready:
            srv = refs[ref].srv
            self.stats_calls.pop(srv, None)
            with contextlib.suppress(Exception):
                self.last_stats[srv] = self.ray.get(ref)
        replica_stats = {s.srv: self.last_stats[s.srv] for s in current if s.srv in self.last_stats}
        versions: dict[str, Any] = {}
        for v in {s.version for s in current}:
            mine = [s for s in current if s.version == v]
            servers = [s.srv for s in mine if s.role == "balanced"]
            resp, err = self.window.delta(servers)
            rs = [replica_stats[s.srv] for s in mine if s.srv in replica_stats]
            p99s = [r["p99_ms"] for r in rs if r.get("p99_ms") is not None]
            p50s = [r["p50_ms"] for r in rs if r.get("p50_ms") is not None]
            role = ("live" if v == st["live"] else "canary" if v == st.get("canary") else
                    "shadow" if v == st.get("shadow") else "retiring")
            versions[str(v)] = {
                "role": role, "replicas": len([s for s in mine if s.draining_since is None]),
                "weight": sum(int(stats.get(s, {}).get("weight", 0) or 0) for s in servers),
                "requests_window": resp or sum(r["requests"] for r in rs),
                "error_rate": round(err / resp, 4) if resp else 0.0,
                "p50_ms": max(p50s) if p50s else None, "p99_ms": max(p99s) if p99s else None,
                "inflight": sum(int(stats.get(s, {}).get("scur", 0) or 0) for s in servers),
                "requests_total": sum(r["total"] for r in rs),
            }
        shadow = None
        if st.get("shadow"):
            agg = {"compared": 0, "agreed": 0, "failed": 0, "dropped": 0}
            sh_p50, live_p50 = [], []
            for s in current:
                r = replica_stats.get(s.srv)
                if s.role == "balanced" and r:
                    for k in agg:
                        agg[k] += r["shadow"][k]
                    if r.get("shadow_p50_ms") is not None:
                        sh_p50.append(r["shadow_p50_ms"])
                        live_p50.append(r["live_p50_ms_compared"])
            shadow = {**agg, "version": st["shadow"],
                      "agreement": round(agg["agreed"] / agg["compared"], 4) if agg["compared"] else None,
                      "shadow_p50_ms": max(sh_p50) if sh_p50 else None,
                      "live_p50_ms": max(live_p50) if live_p50 else None}
        live_servers = [s.srv for s in current if s.version == st["live"] and s.role == "balanced"]
        self.scaler.sample(sum(int(stats.get(s, {}).get("scur", 0) or 0) + int(stats.get(s, {}).get("qcur", 0) or 0)
                               for s in live_servers), float((st.get("autoscale") or {}).get("window_s", 3.0)))
        canary = st.get("canary")
        if canary and str(canary) in versions:
            cv = versions[str(canary)]
            servers = [s.srv for s in current if s.version == canary and s.role == "balanced"]
            resp, err = self.window.delta(servers)
            why = slo_breach(slo, resp, err, cv["p99_ms"])
            if why:
                self._auto_rollback(st, canary, why)
        autoscale = ({**st["autoscale"], "replicas": self.scaler.current,
                      "inflight_avg": round(self.scaler.inflight_avg, 2)} if st.get("autoscale") else None)
        return {"versions": versions, "shadow": shadow, "autoscale": autoscale,
                "replicas": [{"slot": s.srv, "version": s.version, "role": s.role, "port": s.port, "pid": s.pid,
                              "replica": s.replica, "node": s.host if s.srv.startswith("t") else self.node_ip,
                              "node_id": s.node_id, "address": f"{s.host}:{s.port}",
                              "tls": s.srv.startswith("t"),
                              "balancer": stats.get(s.srv, {}).get("status") if s.role == "balanced" else None,
                              # HAProxy's average response time of its last 1024 answers (ms)
                              "rtime_ms": stats.get(s.srv, {}).get("rtime") if s.role == "balanced" else None,
                              # seconds its last ping has gone unanswered (its node cut off?), else None
                              "unanswered_s": round(unanswered[s.srv], 1) if s.srv in unanswered else None,
                              "draining": s.draining_since is not None}
                             for s in sorted(current, key=lambda s: s.order)]}

    def _auto_rollback(self, st: dict[str, Any], canary: int, why: str) -> None:
        replicas = {k: n for k, n in st["replicas"].items() if k != str(canary)}
        try:
            self.reg.write_state(st, {"canary": None, "canary_weight": 0, "replicas": replicas,
                                      "rolled_back": {"version": canary, "reason": why}},
                                 f"automatic rollback of canary v{canary}: {why}", by="controller")
            print(f"automatic rollback of canary v{canary}: {why}", flush=True)
        except DeploymentError:
            pass  # someone changed the deployment meanwhile: judge again next round

    def write_status(self, st: dict[str, Any], observed: dict[str, Any], error: str | None = None) -> None:
        self.reg.write_status({"applied_seq": self.applied, "seq": st.get("seq"), "active": not self.stop,
                               "updated_at": time.time(), "balancer": {"pid": self.lb.proc.pid, "port": self.lb.port},
                               "controller_pid": os.getpid(), "error": error, **observed})

    def run(self) -> None:
        st: dict[str, Any] = {}
        while not self.stop:
            st = self.reg.state() or {}
            if not st.get("active"):
                break
            if self._reap_dead():  # say so before the replacements start (seconds)
                self.write_status(st, self.observe(st))
            if self.apply(st):
                self.applied = max(self.applied, int(st["seq"]))
                self.problem = None
            self.write_status(st, self.observe(st), self.problem)
            time.sleep(POLL_S)

    def close(self) -> None:
        for s in list(self.slots.values()):
            if s.role == "balanced":
                with contextlib.suppress(Exception):
                    self.lb.drain(s.srv)
        for s in list(self.slots.values()):
            self._kill(s)
        self.lb.close()


def main() -> int:
    import logging

    import ray

    try:
        cfg = json.loads(os.environ[CONTROLLER_ENV])
        store = ArtifactStore(cfg["artifact_root"], storage_options=cfg.get("storage_options") or {}, retry_s=60)
        reg = Registry(store, cfg["name"])
    except (KeyError, ValueError) as err:
        print(f"rlfleet: error: the controller needs {CONTROLLER_ENV} from rlfleet.deployments ({err})",
              file=sys.stderr)
        return 1
    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    ctl: Controller | None = None
    try:
        ctl = Controller(reg, cfg)
        signal.signal(signal.SIGTERM, lambda *_: setattr(ctl, "stop", True))
        print(f"deployment {reg.name}: balancer on 127.0.0.1:{ctl.lb.port}", flush=True)
        ctl.run()
        return 0
    except Exception as err:
        msg = " ".join(f"{err}".split()) if isinstance(err, DeploymentError) else f"{type(err).__name__}: {err}"
        with contextlib.suppress(Exception):
            reg.write_status({"applied_seq": 0, "error": msg, "active": False, "updated_at": time.time()})
        print(f"rlfleet: error: deployment {reg.name}: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("RLFLEET_DEBUG"):
            raise
        return 1
    finally:
        if ctl is not None:
            ctl.stop = True
            ctl.close()
            with contextlib.suppress(Exception):
                reg.write_status({"applied_seq": ctl.applied, "active": False, "replicas": [], "versions": {},
                                  "updated_at": time.time(), "error": None})


if __name__ == "__main__":
    sys.exit(main())
