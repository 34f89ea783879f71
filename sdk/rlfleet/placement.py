"""Placement you can read (issue 12): which nodes a run uses, and whether a run can ever fit.

Ray places everything (the run's process by its ``resources``, env runners by ``SPREAD``); this
module only reads Ray's own tables through the Jobs API port (token auth): the nodes, the run's
driver node (``driver_node_id`` of its job) and the run's ``EnvRunner`` actors.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from rlfleet.errors import SpecError

# clusters that do not grow on demand: a run asking for more than their largest node never starts
FIXED_SIZE_KINDS = ("local", "ray", "onprem")
RUNNER_CLASS = "EnvRunner"


def nodes(client: Any) -> list[dict[str, Any]]:
    """Ray's nodes: node_id, node_ip, state, resources_total (alive and dead)."""
    out = client.get_json("/api/v0/nodes?limit=1000&detail=1") or {}
    return list((out.get("data") or {}).get("result", {}).get("result", []))


def check_fits(spec: Any, target: Any, client: Any) -> None:
    """A run asking for more GPUs than any node of a fixed-size cluster has fails here, in one line
    (Ray would keep it PENDING for good)."""
    gpus = float(spec.resources.gpus or 0)
    if gpus <= 0 or target.kind not in FIXED_SIZE_KINDS:
        return
    alive = [n for n in nodes(client) if n.get("state") == "ALIVE"]
    most = max((float((n.get("resources_total") or {}).get("GPU", 0.0)) for n in alive), default=0.0)
    if gpus > most:
        raise SpecError(
            f"resources.gpus: the run asks for {gpus:g} GPUs on one node, but the largest node of target "
            f"{target.name!r} has {most:g} ({len(alive)} nodes); lower resources.gpus or add a GPU node"
        )


def run_nodes(client: Any, job: dict[str, Any], actor_class: str | None = RUNNER_CLASS) -> dict[str, Any]:
    """Where a run ran: its driver's node IP and its env runners' nodes (with each actor's state);
    ``actor_class=None``: all of the job's actors."""
    ip_of = {n["node_id"]: n.get("node_ip") for n in nodes(client)}
    out: dict[str, Any] = {"driver": ip_of.get(job.get("driver_node_id") or "", None), "runners": []}
    job_id = job.get("job_id")
    if job_id:
        q = urllib.parse.urlencode({"limit": 1000, "detail": 1, "filter_keys": "job_id", "filter_predicates": "=",
                                    "filter_values": job_id})
        res = client.get_json(f"/api/v0/actors?{q}") or {}
        for a in (res.get("data") or {}).get("result", {}).get("result", []):
            if actor_class is None or a.get("class_name") == actor_class:
                out["runners"].append({"node_ip": ip_of.get(a.get("node_id"), a.get("node_id")),
                                       "state": a.get("state"), "pid": a.get("pid")})
    return out


def describe(where: dict[str, Any]) -> str:
    """'driver 10.87.0.3; runners 10.87.0.1, 10.87.0.2 x2 (1 replaced)' -- one line for status."""
    text = f"driver {where.get('driver') or '?'}"
    runners = where.get("runners") or []
    if runners:
        live = [r for r in runners if r.get("state") != "DEAD"] or runners
        counts: dict[str, int] = {}
        for r in live:
            counts[str(r["node_ip"])] = counts.get(str(r["node_ip"]), 0) + 1
        text += "; runners " + ", ".join(ip + (f" x{c}" if c > 1 else "") for ip, c in sorted(counts.items()))
        dead = len(runners) - len(live)
        if dead and len(live) != len(runners):
            text += f" ({dead} replaced)"
    return text
