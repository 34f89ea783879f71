"""A lean ONNX Runtime policy server: a plain ASGI app on uvicorn (no framework routing).

Measured against Ray Serve in bench/bench_serving.py (docs/benchmarks.md): Serve's HTTP proxy
adds milliseconds per request on this hardware; this server answers batch-1 requests in well
under a millisecond, so deploy runs host it as the run's own process on the cluster.

Endpoints:
  POST /v1/policies/<name>/act   {"observations": [[...], ...]} -> {"actions": [...]}
                                 the deployment's own bearer token: 401 without, 403 with any other
  GET  /healthz                  {"status": "ok"} (no policy details; no auth, for probes)
Bad JSON / wrong shape / NaN -> 422 with a message naming the problem. Bodies over 4 MiB -> 413.

The Open Inference Protocol (KServe v2, as tritonclient's and KServe's HTTP clients speak it;
rlfleet_agents.oip), same token, same ONNX session:
  GET  /v2/health/live, /v2/health/ready   {"live": true} / {"ready": true}; no auth (probes), no model details
  GET  /v2                                 server metadata
  GET  /v2/models/<name>[/ready]           model metadata from the ONNX graph / readiness
  POST /v2/models/<name>/infer             tensors in and out, JSON or binary tensor data
Errors are {"error": "..."}: 400 for a bad tensor (naming the field), 404 for an unknown model or
route (only after auth, so no name leaks), 413 over 4 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from rlfleet_agents.oip import OipModel, V2Error
from rlfleet_agents.policy import ObservationError, OnnxPolicy

MAX_BODY = 4 * 1024 * 1024
MAX_BATCH = 4096
_JSON = [(b"content-type", b"application/json")]
_V2_MODEL = re.compile(r"/v2/models/([^/]+)(/versions/[^/]+)?(/ready|/infer)?")
_V2_ROUTES = "GET /v2/health/live|ready, GET /v2, GET /v2/models/<name>[/ready], POST /v2/models/<name>/infer"

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class PolicyApp:
    def __init__(self, policy: OnnxPolicy, name: str, token_sha256: str,
                 on_request: Callable[[float, int], None] | None = None, observer: Any = None) -> None:
        """``token_sha256``: hex sha256 of the deployment's bearer token (the server never holds the token).
        ``observer`` (rlfleet_agents.servemetrics.ServeObserver): ``request(latency_s, code)`` for every
        request and ``answered(obs, actions, latency_s)`` for every answered /act; it never sees headers."""
        if len(token_sha256) != 64:
            raise ValueError("the policy server needs the sha256 (hex) of its deployment token")
        self.policy = policy
        self.name = name
        self.path = f"/v1/policies/{name}/act"
        self._expected = token_sha256.lower().encode()
        self.on_request = on_request
        self.observer = observer
        self.requests = 0
        self.oip = OipModel(policy.session, name, max_batch=MAX_BATCH)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        code = await self._handle(scope, receive, send, t0)
        self.requests += 1
        if self.on_request is not None:
            self.on_request(time.perf_counter() - t0, code)
        if self.observer is not None:
            self.observer.request(time.perf_counter() - t0, code)

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send, t0: float = 0.0) -> int:
        path, method = scope["path"], scope["method"]
        if path in ("/healthz", "/v2/health/live", "/v2/health/ready"):  # probes: no auth, nothing about the model
            if method != "GET":
                return await _reply(send, 405, {"error": f"use GET {path}"})
            return await _reply(send, 200, {"status": "ok"} if path == "/healthz" else {path.rsplit("/", 1)[1]: True})
        v2 = path == "/v2" or path.startswith("/v2/")
        if path != self.path and not v2:
            denied = self._denied(scope)  # where the policy is served is told only to its token's holders
            return await _reply(send, 404, {"error": "not found" if denied else
                                            f"not found; the policy is served at POST {self.path}"})
        denied = self._denied(scope)
        if denied:
            return await _reply(send, *denied)
        if v2:
            return await self._v2(path, method, scope, receive, send)
        if method != "POST":
            return await _reply(send, 405, {"error": f"use POST {self.path}"})
        body = await _read_body(receive)
        if body is None:
            return await _reply(send, 413, {"error": f"request body over {MAX_BODY} bytes"})
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
            return await _reply(send, 422, {"error": "body is not valid JSON; send {\"observations\": [[...]]}"})
        if not isinstance(payload, dict) or "observations" not in payload:
            return await _reply(send, 422, {"error": "body must be a JSON object with an 'observations' list"})
        try:
            obs = self.policy.validate(payload["observations"], max_batch=MAX_BATCH)
        except ObservationError as err:
            return await _reply(send, 422, {"error": str(err)})
        actions = self.policy.act(obs)
        if self.observer is not None:
            self.observer.answered(obs, actions, time.perf_counter() - t0)
        return await _reply(send, 200, {"actions": self.policy.actions_to_json(actions)})

    def _denied(self, scope: dict[str, Any]) -> tuple[int, dict[str, str], list[tuple[bytes, bytes]]] | None:
        """None for the deployment's bearer token, else the 401/403 answer."""
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not auth:
            return 401, {"error": "missing 'Authorization: Bearer <token>' header"}, [(b"www-authenticate", b"Bearer")]
        presented = hashlib.sha256(auth[7:]).hexdigest().encode() if auth.startswith(b"Bearer ") else b""
        if not hmac.compare_digest(presented, self._expected):
            return 403, {"error": "invalid token"}, []
        return None

    async def _v2(self, path: str, method: str, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        """The Open Inference Protocol's authenticated routes."""
        if path == "/v2":
            if method != "GET":
                return await _reply(send, 405, {"error": "use GET /v2"})
            return await _reply(send, 200, {"name": "rlfleet", "version": _kit_version(),
                                            "extensions": ["binary_tensor_data"]})
        m = _V2_MODEL.fullmatch(path)
        if m is None:
            return await _reply(send, 404, {"error": f"no route {path}; the Open Inference Protocol routes here "
                                                     f"are {_V2_ROUTES}"})
        name, version, action = m.group(1), m.group(2), m.group(3) or ""
        if name != self.name:
            return await _reply(send, 404, {"error": f"unknown model {name!r}: this server serves {self.name!r}"})
        if version:
            return await _reply(send, 404, {"error": f"model {name!r} has no versions here; "
                                                     f"drop {version} from the path"})
        want = "POST" if action == "/infer" else "GET"
        if method != want:
            return await _reply(send, 405, {"error": f"use {want} /v2/models/{name}{action}"})
        if action == "":
            return await _reply(send, 200, self.oip.metadata())
        if action == "/ready":
            return await _reply(send, 200, {"name": name, "ready": True})
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding != "identity":
            return await _reply(send, 400, {"error": f"Content-Encoding {encoding!r} is not supported; "
                                                     "send the request uncompressed"})
        raw_len = headers.get(b"inference-header-content-length")
        try:
            header_length = int(raw_len) if raw_len is not None else None
        except ValueError:
            return await _reply(send, 400, {"error": "Inference-Header-Content-Length must be an integer"})
        body = await _read_body(receive)
        if body is None:
            return await _reply(send, 413, {"error": f"request body over {MAX_BODY} bytes"})
        try:
            out = self.oip.infer(body, header_length)
        except V2Error as err:
            return await _reply(send, err.status, {"error": str(err)})
        if out.header_length is None:
            return await _send(send, 200, out.body, _JSON)
        return await _send(send, 200, out.body, [(b"content-type", b"application/octet-stream"),
                                                 (b"inference-header-content-length", str(out.header_length).encode())])


def _kit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlfleet")
    except PackageNotFoundError:
        return "unknown"


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None once it grows over MAX_BODY."""
    body = bytearray()
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if len(body) > MAX_BODY:
            return None
        if not msg.get("more_body"):
            return bytes(body)


async def _reply(send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None) -> int:
    return await _send(send, status, json.dumps(obj, separators=(",", ":")).encode(), [*_JSON, *(extra or [])])


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    return status


def bind_socket(host: str, port: int | None, candidates: list[int]) -> socket.socket:
    """Bind ``port`` if given, else the first free of ``candidates``, else any free port."""
    tries = [port] if port else [*candidates, 0]
    last: OSError | None = None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for p in tries:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, p))
        except OSError as err:
            sock.close()
            last = err
            continue
        sock.listen(1024)
        sock.setblocking(False)
        return sock
    raise OSError(f"cannot bind the policy server on {host} (tried ports {tries}): {last}")


def make_server(app: Callable[[dict[str, Any], Receive, Send], Awaitable[None]],
                ssl_context: ssl.SSLContext | None = None) -> Any:
    """uvicorn for ``app``; with ``ssl_context``, HTTPS only (a named deployment's replica on another
    node than its balancer: rlfleet_agents.deploytls)."""
    import importlib.util

    import uvicorn

    config = uvicorn.Config(
        app,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="off",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        timeout_keep_alive=30,
        limit_concurrency=2048,
    )

    class _Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM after its graceful shutdown (exit status 143); we install our
        # own handlers in serve_forever so the run exits 0 after draining.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    if ssl_context is not None:  # uvicorn loads TLS only from files; the context is made in memory
        config.load()
        config.ssl = ssl_context
    return _Server(config)


def serve_forever(app: PolicyApp, sock: socket.socket, on_started: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn installs the handlers and shuts down gracefully)."""
    server = make_server(app)

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started and on_started is not None:
            on_started()
        await task

    factory = server.config.get_loop_factory() if hasattr(server.config, "get_loop_factory") else None
    if factory is not None and hasattr(asyncio, "Runner"):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_main())
    else:
        asyncio.run(_main())
