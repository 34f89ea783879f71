"""One replica of a named deployment: a Ray actor that serves a version's policy with
:class:`rlfleet_agents.serve.PolicyApp` behind the controller's HAProxy: on a 127.0.0.1 port when Ray
placed it on the controller's node, else on its node's address over mutual TLS
(rlfleet_agents.deploytls).

The actor's process is the replica process: it loads the version's ONNX file, refuses it unless its
sha256 is the version's, binds a free port and serves from a thread until ``stop()`` or the
actor dies. Every response carries ``x-rlfleet-version``. A thin ASGI layer around PolicyApp records
each request's latency and status (500s included, which PolicyApp never sees) for the controller's
SLO checks, and, when the controller names shadow replicas, sends a copy of each answered act
request to one of them after the answer went out (with the caller's own Authorization header,
never stored): the fraction of requests where the shadow chose the same actions and its latency are
counted here; the shadow's answers go nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import threading
import time
from typing import Any

SHADOW_IN_FLIGHT = 64  # copies waiting for a shadow answer; more are dropped (and counted)
_PROBES = ("/healthz", "/v2/health/live", "/v2/health/ready")


def load_policy_bytes(uri: str, sha256: str, storage_options: dict[str, Any]) -> bytes:
    """The version's ONNX file, or ValueError when its content is not the registered sha256."""
    import hashlib

    from rlfleet.artifacts import filesystem

    fs, path = filesystem(uri, storage_options)
    data = bytes(fs.cat_file(path))
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"refused: {uri} has sha256 {got[:12]}…, the version registered {sha256[:12]}…; "
                         "the policy changed after it was deployed")
    return data


class Recorder:
    """Latency/status of recent requests, and the shadow comparison counters."""

    def __init__(self, keep: int = 50_000) -> None:
        self.rows: collections.deque[tuple[float, float, int]] = collections.deque(maxlen=keep)
        self.total = 0
        self.errors = 0
        self.shadow = {"compared": 0, "agreed": 0, "failed": 0, "dropped": 0}
        self.shadow_lat: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=keep)

    def request(self, latency_s: float, code: int) -> None:
        self.rows.append((time.monotonic(), latency_s, code))
        self.total += 1
        self.errors += code >= 500

    def window(self, seconds: float) -> dict[str, Any]:
        since = time.monotonic() - seconds
        rows = [r for r in list(self.rows) if r[0] >= since]
        lat = sorted(r[1] for r in rows)
        sh = [r for r in list(self.shadow_lat) if r[0] >= since]
        return {"requests": len(rows), "errors": sum(1 for r in rows if r[2] >= 500),
                "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99), "total": self.total,
                "total_errors": self.errors, "shadow": dict(self.shadow),
                "shadow_p50_ms": _pct(sorted(r[2] for r in sh), 0.5),
                "live_p50_ms_compared": _pct(sorted(r[1] for r in sh), 0.5)}


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(1000 * sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 3)


class ReplicaApp:
    """ASGI around PolicyApp: version header, request recording, shadow copies."""

    def __init__(self, app: Any, version: int, recorder: Recorder) -> None:
        self.app = app
        self.version = str(version).encode()
        self.rec = recorder
        self.shadows: list[str] = []
        self.shadow_ssl: Any = True  # the client context for https shadows (set_shadows)
        self._rr = itertools.count()
        self._in_flight = 0
        self._session: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        chunks: list[bytes] = []
        shadow = bool(self.shadows) and scope["method"] == "POST" and scope["path"] == self.app.path

        async def _send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-rlfleet-version", self.version)]}
            elif shadow:
                chunks.append(msg.get("body", b""))
            await send(msg)

        body = b""
        if shadow:
            body = await _read_all(receive)
            receive = _replay(body, receive)
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, _send)
        finally:
            if scope["path"] not in _PROBES:
                self.rec.request(time.perf_counter() - t0, status["code"])
        if shadow and status["code"] == 200:
            live_s = time.perf_counter() - t0
            if self._in_flight >= SHADOW_IN_FLIGHT:
                self.rec.shadow["dropped"] += 1
            else:
                auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                self._in_flight += 1
                asyncio.get_running_loop().create_task(self._shadow(body, auth, b"".join(chunks), live_s))

    async def _shadow(self, body: bytes, auth: bytes, live_answer: bytes, live_s: float) -> None:
        import aiohttp

        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            url = self.shadows[next(self._rr) % len(self.shadows)] + self.app.path
            t0 = time.perf_counter()
            async with self._session.post(url, data=body, ssl=self.shadow_ssl,
                                          headers={"authorization": auth.decode("latin-1"),
                                                   "content-type": "application/json"}) as resp:
                answer = await resp.read()
                ok = resp.status == 200
            shadow_s = time.perf_counter() - t0
            if not ok:
                self.rec.shadow["failed"] += 1
                return
            self.rec.shadow["compared"] += 1
            self.rec.shadow["agreed"] += _same_actions(json.loads(live_answer), json.loads(answer))
            self.rec.shadow_lat.append((time.monotonic(), live_s, shadow_s))
        except Exception:
            self.rec.shadow["failed"] += 1
        finally:
            self._in_flight -= 1


def _same_actions(live: Any, shadow: Any) -> bool:
    a, b = live.get("actions"), shadow.get("actions")
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        return False
    flat = zip(_flatten(a), _flatten(b), strict=False)
    return all(abs(float(x) - float(y)) <= 1e-6 for x, y in flat)


def _flatten(v: Any) -> list[Any]:
    return [x for item in v for x in (_flatten(item) if isinstance(item, list) else [item])]


async def _read_all(receive: Any) -> bytes:
    from rlfleet_agents.serve import MAX_BODY

    body = bytearray()
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body") or len(body) > MAX_BODY:
            return bytes(body)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def _receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


class ReplicaFiles:
    """Where a replica's observer writes (its audit segments, serve_status.json):
    ``deployments/<name>/replicas/<replica>/`` in the artifact store, each file written whole."""

    def __init__(self, registry: Any, replica: str) -> None:
        self.registry = registry
        self.prefix = f"replicas/{replica}/"

    def write_text(self, rel: str, text: str) -> None:
        self.registry.put(self.prefix + rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self.registry.put(self.prefix + rel, json.dumps(obj, sort_keys=True, default=str).encode())


def make_observer(name: str, version: int, replica: str, policy: Any, cfg: dict[str, Any]) -> Any:
    """The serving observer (metrics with deployment/version/replica labels, drift against the
    source run's training statistics, the sampled audit log) of one replica; None if it cannot be
    made (serving goes on without it, and says why)."""
    from rlfleet.artifacts import ArtifactStore, open_run
    from rlfleet.deployments import Registry
    from rlfleet_agents.servemetrics import observer_for_run

    try:
        import ray

        if ray.is_initialized():  # an actor's process has no RAY_ADDRESS: the metrics hook reads it
            os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        store = ArtifactStore(cfg["artifact_root"], storage_options=cfg.get("storage_options") or {}, retries=3)
        src = open_run(cfg["policy_uri"].rsplit("/", 1)[0], storage_options=cfg.get("storage_options") or {})
        labels = {"run_id": src.run_id, "kind": "deploy", "env": str(cfg.get("env") or ""),
                  "target": str(cfg.get("target") or "")}
        return observer_for_run(ReplicaFiles(Registry(store, name), replica), src, policy, run_labels=labels,
                                deployment=name, version=str(version), replica=replica,
                                audit_rate=float(cfg.get("audit_rate", 0.01)))
    except Exception as err:  # the observer is an addition; a replica serves without it
        print(f"replica {replica}: serving without metrics/drift/audit ({type(err).__name__}: {err})", flush=True)
        return None


class Replica:
    """The Ray actor (the controller wraps it with ``ray.remote``). On the controller's node it serves
    plain HTTP on 127.0.0.1 at once; on another node (``controller_node`` names the controller's), or
    as a shadow (``tls``: live replicas anywhere reach it), it serves HTTPS on its node's address with
    mutual TLS once the controller has signed its key (:meth:`serve_tls`, rlfleet_agents.deploytls).
    Every replica makes its own key and certificate request (``info()["csr"]``); the controller
    also signs it as a client certificate for the copies a live replica sends to https shadows."""

    def __init__(self, name: str, version: int, token_sha256: str, policy_uri: str, policy_sha256: str,
                 storage_options: dict[str, Any], observe: dict[str, Any] | None = None,
                 controller_node: str | None = None, tls: bool = False) -> None:
        from rlfleet_agents.policy import OnnxPolicy
        from rlfleet_agents.serve import PolicyApp

        self.label = f"{name} v{version}"
        policy = OnnxPolicy(load_policy_bytes(policy_uri, policy_sha256, storage_options))
        self.node_id, node_ip = _node()
        self.remote = tls or (bool(controller_node) and self.node_id != controller_node)
        self.host = node_ip if self.remote else "127.0.0.1"
        self.recorder = Recorder()
        # pids repeat across machines: a replica elsewhere names its node too
        self.replica_id = (f"v{version}-{node_ip.replace('.', '-').replace(':', '-')}-{os.getpid()}" if self.remote
                           else f"v{version}-{os.getpid()}")
        self.observer = None if observe is None else make_observer(
            name, version, self.replica_id, policy,
            {**observe, "policy_uri": policy_uri, "storage_options": storage_options})
        self.app = ReplicaApp(PolicyApp(policy, name, token_sha256, observer=self.observer), version, self.recorder)
        self.port: int | None = None
        self.thread: threading.Thread | None = None
        # imported before serving: the first shadow copy would import it inside the server's event
        # loop, which then answers nothing (HAProxy's /healthz included) for as long as it takes
        import aiohttp  # noqa: F401

        from rlfleet_agents.deploytls import key_and_csr

        self._key, self._csr = key_and_csr(self.replica_id)  # the key stays in this process
        if not self.remote:
            self._serve(None)

    def _serve(self, ssl_context: Any) -> None:
        from rlfleet_agents.serve import bind_socket, make_server

        self.sock = bind_socket(self.host, None, [])
        self.port = int(self.sock.getsockname()[1])
        self.server = make_server(self.app, ssl_context=ssl_context)
        self.loop: asyncio.AbstractEventLoop | None = None
        started = threading.Event()

        def _run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)

            async def _main() -> None:
                task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
                while not self.server.started and not task.done():
                    await asyncio.sleep(0.01)
                started.set()
                await task

            self.loop.run_until_complete(_main())

        self.thread = threading.Thread(target=_run, name="replica-server", daemon=True)
        self.thread.start()
        if not started.wait(60) or not self.server.started:
            raise RuntimeError(f"replica of {self.label} did not start serving on {self.host}:{self.port}")

    def serve_tls(self, cert_pem: bytes, ca_pem: bytes) -> dict[str, Any]:
        """Serve HTTPS on the node's address with the certificate the controller signed for this
        replica's key; only clients with a certificate of the same CA (its HAProxy) get through."""
        from rlfleet_agents.deploytls import server_context

        if not self.remote or self.thread is not None:
            raise RuntimeError(f"replica {self.replica_id} is not waiting for its certificate")
        self._serve(server_context(self._key, cert_pem, ca_pem))
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "pid": os.getpid(), "replica": self.replica_id,
                "observer": self.observer is not None, "node_id": self.node_id, "host": self.host,
                "tls": self.remote, "csr": self._csr}

    def ping(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stats(self, window_s: float) -> dict[str, Any]:
        return self.recorder.window(window_s)

    def set_shadows(self, urls: list[str], client_cert_pem: bytes | None = None, ca_pem: bytes | None = None) -> None:
        """Copy answered act requests to ``urls``; https shadows with this replica's key and the
        client certificate the controller signed for it, trusting only the deployment's CA."""
        if client_cert_pem is not None and ca_pem is not None:
            from rlfleet_agents.deploytls import client_context

            self.app.shadow_ssl = client_context(ca_pem, client_cert_pem + self._key)
        self.app.shadows = list(urls)

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
        if self.observer is not None:
            self.observer.close()  # the last audit lines and status


def _node() -> tuple[str, str]:
    """(Ray node id, node IP) of this process; ('', '127.0.0.1') outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except Exception:  # noqa: S110 - outside a cluster a replica is local
        pass
    return "", "127.0.0.1"
