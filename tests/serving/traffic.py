"""Bounded traffic through a named deployment's URL, shared by tests/serving (local) and
tests/conformance/test_serving_targets.py (local + on-prem): sequential requests counted per
version and status, and the replica-loss check."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

OBS = {"observations": [[0.01, -0.02, 0.03, 0.04]]}


class Traffic:
    """Sequential requests through the deployment's URL (its front's CA, the deployment's token)."""

    def __init__(self, dep: Any) -> None:
        ep = dep.endpoint()
        self.url = ep.act_url
        self.client = httpx.Client(timeout=10, verify=ep.verify, headers={"authorization": f"Bearer {ep.token}"})

    def send(self, n: int, budget_s: float = 60.0, rows: Any = None) -> tuple[Counter, Counter]:
        """``n`` requests (at most ``budget_s`` seconds): OBS, or ``rows[i]`` as the i-th batch."""
        versions: Counter = Counter()
        codes: Counter = Counter()
        deadline = time.monotonic() + budget_s
        for i in range(n):
            if time.monotonic() > deadline:
                break
            body = OBS if rows is None else {"observations": rows[i].tolist()}
            try:
                r = self.client.post(self.url, json=body)
                codes[r.status_code] += 1
                versions[r.headers.get("x-rlfleet-version")] += 1
            except httpx.HTTPError as err:
                codes[type(err).__name__] += 1
        return versions, codes


def replica_loss(dep: Any, kill: Callable[[int], None], load_s: float = 40.0,
                 pick: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[str, Any]:
    """SIGKILL (``kill(pid)``) one of the live v1 replicas (the first that ``pick`` accepts) under
    sequential load: no request fails once the balancer has seen it down (at most the one in flight
    at the kill), and the controller replaces it. Returns the figures."""
    v1 = [r for r in dep.registry.status()["replicas"] if r["version"] == 1]
    victim = next(r for r in v1 if pick(r))
    traffic = Traffic(dep)
    results: list[tuple[float, Any]] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + load_s
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 20_000:
            _, codes = traffic.send(1)
            results.append((time.monotonic(), next(iter(codes))))

    th = threading.Thread(target=load)
    th.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    kill(victim["pid"])
    # the balancer's health check marks it down; the controller replaces it
    deadline = time.monotonic() + 60
    down_at = replaced_at = None
    while time.monotonic() < deadline and replaced_at is None:
        reps = (dep.registry.status() or {}).get("replicas", [])
        if down_at is None and not any(r["pid"] == victim["pid"] and str(r["balancer"]).startswith("UP")
                                       for r in reps):
            down_at = time.monotonic()
        others = [r for r in reps if r["version"] == 1 and r["pid"] != victim["pid"]]
        if len(others) == len(v1) and all(str(r["balancer"]).startswith("UP") for r in others):
            replaced_at = time.monotonic()
        time.sleep(0.2)
    time.sleep(1.0)
    settle = time.monotonic() + 10  # enough requests to judge on a slow front (~25/s through TLS here)
    while len(results) < 200 and time.monotonic() < settle and th.is_alive():
        time.sleep(0.2)
    stop.set()
    th.join()
    failed = [(t, c) for t, c in results if c != 200]
    after = [c for t, c in failed if t >= (down_at or killed_at)]
    figures = {"victim": victim.get("address"), "requests": len(results), "failed": len(failed),
               "failed_after_down": len(after),
               "down_s": round((down_at or 0) - killed_at, 2), "replaced_s": round((replaced_at or 0) - killed_at, 2)}
    print(f"replica loss: {figures}")
    assert replaced_at is not None, f"the controller did not replace the killed replica: {figures}"
    assert len(results) > 100 and after == [] and len(failed) <= 1, (figures, failed)
    return figures
