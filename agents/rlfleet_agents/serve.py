"""A lean ONNX Runtime policy server: a plain ASGI app on uvicorn (no framework routing).

Measured against Ray Serve in bench/bench_serving.py (docs/benchmarks.md): Serve's HTTP proxy
adds milliseconds per request on this hardware; this server answers batch-1 requests in well
under a millisecond, so deploy runs host it as the run's own process on the cluster.

Endpoints:
  POST /v1/policies/<name>/act   {"observations": [[...], ...]} -> {"actions": [...]}
                                 the deployment's own bearer token: 401 without, 403 with any other
  GET  /healthz                  {"status": "ok"} (no policy details; no auth, for probes)
Bad JSON / wrong shape / NaN -> 422 with a message naming the problem. Bodies over 4 MiB -> 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from rlfleet_agents.policy import ObservationError, OnnxPolicy

MAX_BODY = 4 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class PolicyApp:
    def __init__(self, policy: OnnxPolicy, name: str, token_sha256: str,
                 on_request: Callable[[float, int], None] | None = None) -> None:
        """``token_sha256``: hex sha256 of the deployment's bearer token (the server never holds the token)."""
        if len(token_sha256) != 64:
            raise ValueError("the policy server needs the sha256 (hex) of its deployment token")
        self.policy = policy
        self.name = name
        self.path = f"/v1/policies/{name}/act"
        self._expected = token_sha256.lower().encode()
        self.on_request = on_request
        self.requests = 0

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
        code = await self._handle(scope, receive, send)
        self.requests += 1
        if self.on_request is not None:
            self.on_request(time.perf_counter() - t0, code)

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            if method != "GET":
                return await _reply(send, 405, {"error": "use GET /healthz"})
            return await _reply(send, 200, {"status": "ok"})
        if path != self.path:
            return await _reply(send, 404, {"error": f"not found; the policy is served at POST {self.path}"})
        if method != "POST":
            return await _reply(send, 405, {"error": f"use POST {self.path}"})
        auth = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
                break
        if not auth:
            return await _reply(send, 401, {"error": "missing 'Authorization: Bearer <token>' header"},
                                extra=[(b"www-authenticate", b"Bearer")])
        presented = hashlib.sha256(auth[7:]).hexdigest().encode() if auth.startswith(b"Bearer ") else b""
        if not hmac.compare_digest(presented, self._expected):
            return await _reply(send, 403, {"error": "invalid token"})
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > MAX_BODY:
                return await _reply(send, 413, {"error": f"request body over {MAX_BODY} bytes"})
            if not msg.get("more_body"):
                break
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
            return await _reply(send, 422, {"error": "body is not valid JSON; send {\"observations\": [[...]]}"})
        if not isinstance(payload, dict) or "observations" not in payload:
            return await _reply(send, 422, {"error": "body must be a JSON object with an 'observations' list"})
        try:
            obs = self.policy.validate(payload["observations"])
        except ObservationError as err:
            return await _reply(send, 422, {"error": str(err)})
        actions = self.policy.act(obs)
        return await _reply(send, 200, {"actions": self.policy.actions_to_json(actions)})


async def _reply(send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None) -> int:
    body = json.dumps(obj, separators=(",", ":")).encode()
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
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


def make_server(app: PolicyApp) -> Any:
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
