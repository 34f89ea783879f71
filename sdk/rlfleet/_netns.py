"""Private network namespace for the local Ray head, plus a loopback port forwarder.

Ray moves several internal servers (GCS, raylet, dashboard agent, metrics) onto the machine's
routable address even when told 127.0.0.1 (measured: ../shared/notes/components.md). The local
target therefore runs its Ray head inside a network namespace that has only ``lo``: every Ray
listener stays unreachable from the network. A small forwarder bridges exactly the ports the
SDK needs (the dashboard / Jobs API, and the ports deploy runs may serve on) from the host's
127.0.0.1 into the namespace's 127.0.0.1. Nothing listens on a routable address.

The forwarder binds its host listeners first, then enters the namespace with setns(2) before any
thread exists, so every upstream connection it opens afterwards lands inside the namespace.

It is bounded, so a local process cannot exhaust it (or Ray behind it) with idle connections:
one thread (asyncio), at most ``--max-conns`` client connections at a time (a new connection
evicts the oldest one that has not sent a byte yet, else the least recently active one), the
upstream connection is opened only once the client has sent its first bytes, a connection that
sends nothing within ``--first-byte-timeout`` seconds is closed, and so is any connection with
no traffic in either direction for ``--idle-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import cast

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MAX_CONNS = 1024
IDLE_TIMEOUT_S = 300.0
FIRST_BYTE_TIMEOUT_S = 10.0
_BACKLOG = 1024


def _setns(path: str, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter_netns(pid: int) -> None:
    """Move the calling (single-threaded) process into ``pid``'s network namespace."""
    if os.geteuid() != 0:
        _setns(f"/proc/{pid}/ns/user", CLONE_NEWUSER)
    _setns(f"/proc/{pid}/ns/net", CLONE_NEWNET)


def _quietly(fn: Callable[[], object]) -> None:
    """A transport call that may race with the transport closing (asyncio and uvloop differ)."""
    with contextlib.suppress(Exception):
        fn()


class _Conn:
    """One client connection and, once the client has sent bytes, its upstream connection."""

    __slots__ = ("client", "client_eof", "closed", "fwd", "last", "pending", "port", "started", "upstream")

    def __init__(self, fwd: Forwarder, client: asyncio.Transport, port: int) -> None:
        self.fwd, self.client, self.port = fwd, client, port
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # client bytes that arrived before the upstream connection
        self.started = self.client_eof = self.closed = False
        self.last = time.monotonic()

    def abort(self) -> None:
        """Drop both sides now (timeout, eviction, upstream unreachable)."""
        self.fwd.conns.pop(self, None)
        self.closed = True
        for t in (self.client, self.upstream):
            if t is not None:
                _quietly(t.abort)

    def to_upstream(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.upstream is not None:
            if not self.upstream.is_closing():
                self.upstream.write(data)
            return
        self.pending.append(data)
        if not self.started:  # first bytes: only now is Ray (or the deploy server) involved
            self.started = True
            _quietly(self.client.pause_reading)
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            up, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _UpstreamSide(self), "127.0.0.1", self.port), 10
            )
        except (OSError, asyncio.TimeoutError):
            self.abort()
            return
        if self.closed:
            up.abort()
            return
        self.upstream = up
        up.write(b"".join(self.pending))
        self.pending.clear()
        if self.client_eof:
            _quietly(up.write_eof)
        else:
            _quietly(self.client.resume_reading)


class _ClientSide(asyncio.Protocol):
    def __init__(self, fwd: Forwarder, port: int) -> None:
        self.fwd, self.port = fwd, port
        self.conn: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = _Conn(self.fwd, cast(asyncio.Transport, transport), self.port)  # uvloop's is no subclass
        self.fwd.admit(self.conn)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.to_upstream(data)

    def eof_received(self) -> bool:
        c = self.conn
        if c is None or not c.started:
            return False  # closed before sending anything
        c.client_eof = True
        if c.upstream is not None:
            _quietly(c.upstream.write_eof)
        return True  # half-close: the response may still come

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.conn
        if c is not None:
            self.fwd.conns.pop(c, None)
            c.closed = True
            if c.upstream is not None:
                _quietly(c.upstream.close)

    def pause_writing(self) -> None:  # the client reads slowly: stop reading upstream
        if self.conn is not None and self.conn.upstream is not None:
            _quietly(self.conn.upstream.pause_reading)

    def resume_writing(self) -> None:
        if self.conn is not None and self.conn.upstream is not None:
            _quietly(self.conn.upstream.resume_reading)


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        c = self.conn
        c.last = time.monotonic()
        if not c.client.is_closing():
            c.client.write(data)

    def eof_received(self) -> bool:
        _quietly(self.conn.client.write_eof)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        _quietly(self.conn.client.close)  # graceful: what is buffered for the client still goes out

    def pause_writing(self) -> None:  # upstream reads slowly: stop reading the client
        _quietly(self.conn.client.pause_reading)

    def resume_writing(self) -> None:
        _quietly(self.conn.client.resume_reading)


class Forwarder:
    def __init__(self, max_conns: int, idle_timeout: float, first_byte_timeout: float) -> None:
        self.max_conns = max_conns
        self.idle_timeout = idle_timeout
        self.first_byte_timeout = first_byte_timeout
        self.conns: dict[_Conn, None] = {}  # insertion order: oldest first
        self.evicted = self.timed_out = 0

    def admit(self, conn: _Conn) -> None:
        while len(self.conns) >= self.max_conns:
            victim = next((c for c in self.conns if not c.started), None)
            if victim is None:
                victim = min(self.conns, key=lambda c: c.last)
            victim.abort()
            self.evicted += 1
        self.conns[conn] = None

    async def sweep(self, holder: int) -> None:
        """Close timed-out connections; stop when the namespace holder is gone."""
        step = max(0.05, min(1.0, self.first_byte_timeout / 4, self.idle_timeout / 4))
        gone = _holder_watch(holder)
        reported = 0
        while not gone():
            await asyncio.sleep(step)
            now = time.monotonic()
            for c in list(self.conns):
                limit = self.idle_timeout if c.started else self.first_byte_timeout
                if now - c.last > limit:
                    c.abort()
                    self.timed_out += 1
            if self.evicted != reported:
                print(f"forwarder: {self.evicted} connections evicted so far (limit {self.max_conns})", flush=True)
                reported = self.evicted


def proc_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process.

    With the boot id, (pid, start time) names one process for good: a reused PID has another.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; comm may hold ')'
    except (OSError, IndexError, ValueError):
        return None


def _holder_watch(pid: int) -> Callable[[], bool]:
    """A predicate: has the holder process exited? (its PID may be reused: compare its start time)."""
    start = proc_start_time(pid)
    return lambda: start is None or proc_start_time(pid) != start


def _raise_fd_limit(max_conns: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * max_conns + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def _serve(pid: int, listeners: list[tuple[socket.socket, int]], fwd: Forwarder) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for s, port in listeners:
        servers.append(await loop.create_server(functools.partial(_ClientSide, fwd, port), sock=s, backlog=_BACKLOG))
    print(f"forwarding 127.0.0.1:{[p for _, p in listeners]} into netns of pid {pid}", flush=True)
    await fwd.sweep(pid)  # exit with the namespace holder: the cluster is gone then


def forward(
    pid: int,
    ports: list[int],
    *,
    max_conns: int = MAX_CONNS,
    idle_timeout: float = IDLE_TIMEOUT_S,
    first_byte_timeout: float = FIRST_BYTE_TIMEOUT_S,
) -> None:
    listeners = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(_BACKLOG)
        s.setblocking(False)
        listeners.append((s, port))
    enter_netns(pid)  # before any thread exists: threads inherit the namespace
    _raise_fd_limit(max_conns)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    main = _serve(pid, listeners, Forwarder(max_conns, idle_timeout, first_byte_timeout))
    try:
        import uvloop  # comes with Ray Serve's uvicorn; p50 0.38 ms vs 0.44-0.54 ms per forwarded request here
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlfleet._netns")
    ap.add_argument("--pid", type=int, required=True, help="a process inside the namespace")
    ap.add_argument("--ports", required=True, help="comma-separated loopback ports to forward")
    ap.add_argument("--max-conns", type=int, default=MAX_CONNS, help="client connections held at most")
    ap.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S, help="seconds without traffic")
    ap.add_argument(
        "--first-byte-timeout", type=float, default=FIRST_BYTE_TIMEOUT_S, help="seconds to the first client byte"
    )
    args = ap.parse_args(argv)
    if args.max_conns < 1 or args.idle_timeout <= 0 or args.first_byte_timeout <= 0:
        ap.error("--max-conns, --idle-timeout and --first-byte-timeout must be positive")
    forward(
        args.pid,
        [int(p) for p in args.ports.split(",") if p],
        max_conns=args.max_conns,
        idle_timeout=args.idle_timeout,
        first_byte_timeout=args.first_byte_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
