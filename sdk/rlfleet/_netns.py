"""Private network namespace for the local Ray head, plus a loopback port forwarder.

Ray moves several internal servers (GCS, raylet, dashboard agent, metrics) onto the machine's
routable address even when told 127.0.0.1 (measured: ../shared/notes/components.md). The local
target therefore runs its Ray head inside a network namespace that has only ``lo``: every Ray
listener stays unreachable from the network. A small forwarder bridges exactly the ports the
SDK needs (the dashboard / Jobs API, and the ports deploy runs may serve on) from the host's
127.0.0.1 into the namespace's 127.0.0.1. Nothing listens on a routable address.

The forwarder binds its host listeners first, then enters the namespace with setns(2) before any
thread exists, so every upstream connection it opens afterwards lands inside the namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000


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


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _bridge(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    t.start()
    _pump(client, upstream)
    t.join()
    client.close()
    upstream.close()


def _accept_loop(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_bridge, args=(client, port), daemon=True).start()


def forward(pid: int, ports: list[int]) -> None:
    listeners = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(256)
        listeners.append((s, port))
    enter_netns(pid)  # before any thread exists: threads inherit the namespace
    for s, port in listeners:
        threading.Thread(target=_accept_loop, args=(s, port), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"forwarding 127.0.0.1:{ports} into netns of pid {pid}", flush=True)
    # Exit with the namespace holder: the cluster is gone then.
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlfleet._netns")
    ap.add_argument("--pid", type=int, required=True, help="a process inside the namespace")
    ap.add_argument("--ports", required=True, help="comma-separated loopback ports to forward")
    args = ap.parse_args(argv)
    forward(args.pid, [int(p) for p in args.ports.split(",") if p])
    return 0


if __name__ == "__main__":
    sys.exit(main())
