"""rlfleet drift NAME|RUN_ID: the drift policy servers measure (per-feature PSI and KS, action shift).

For a named deployment (rlfleet deploy NAME) it shows each current replica (the controller's last
observed set), from what the replica publishes every few seconds under
``deployments/<name>/replicas/<replica>/serve_status.json``; for a deploy run, what the run
publishes next to its artifacts. Either way it needs the artifact store only, not the cluster.
"""

from __future__ import annotations

import json
from typing import Any

import click

from rlfleet.cli._common import console, json_option, print_json, table, target_option
from rlfleet.errors import ArtifactError, RlfleetError


def read_status(store: Any, run_id: str) -> dict[str, Any]:
    """The published status of deploy run ``run_id`` (one clear error when there is none)."""
    from rlfleet.artifacts import SERVE_STATUS

    arts = store.run(run_id)
    try:
        raw = arts.read_live(SERVE_STATUS)
    except ArtifactError:
        if not arts.list_files():
            raise RlfleetError(f"no run {run_id!r} under {store.root_uri}: give the id of a deploy run "
                               "(rlfleet runs lists them)") from None
        raise RlfleetError(f"run {run_id} has published no drift status ({SERVE_STATUS}): it is not a deploy run, "
                           "or its server has not started yet (it publishes every 5 s)") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise RlfleetError(f"run {run_id}: {SERVE_STATUS} is not valid JSON") from None
    return doc if isinstance(doc, dict) else {}


def read_deployment(store: Any, name: str) -> list[dict[str, Any]] | None:
    """The published status of every current replica of deployment ``name``; None if there is no
    such deployment (then the argument is taken as a run id)."""
    from rlfleet.artifacts import SERVE_STATUS
    from rlfleet.deployments import NAME_RE, Registry

    if not NAME_RE.match(name):
        return None
    reg = Registry(store, name)
    if not reg.exists():
        return None
    current = [r.get("replica") for r in (reg.status() or {}).get("replicas", []) if r.get("replica")]
    docs = [d for rid in current if (d := reg.read(f"replicas/{rid}/{SERVE_STATUS}"))]
    if not docs:
        raise RlfleetError(f"deployment {name!r} has no replica that published its drift status yet "
                           "(each publishes every 5 s once it serves; rlfleet deploy NAME --status shows them)")
    return docs


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _print(doc: dict[str, Any]) -> None:
    who = f"{doc.get('deployment')} version {doc.get('version')} (replica {doc.get('replica')})"
    d = doc.get("drift") or {}
    console().print(f"{who}: {doc.get('requests', 0)} requests, {doc.get('errors', 0)} errors; "
                  f"status of {doc.get('updated')}")
    if not d.get("available"):
        console().print(f"drift unavailable: {d.get('reason', 'unknown')}")
        return
    if d.get("psi") is None:
        console().print(f"drift: window not full yet ({d.get('filled', 0)} of {d.get('window')} observations)")
        return
    thr = d.get("threshold")
    # each feature's alert level, calibrated at export (older servers: the one threshold)
    levels = d.get("psi_alert") or [thr] * len(d["psi"])
    rows = [[j, _fmt(p), _fmt(lv), _fmt(k), "DRIFT" if lv is not None and p > lv else ""]
            for j, (p, lv, k) in enumerate(zip(d["psi"], levels, d["ks"], strict=True))]
    table(["feature", "PSI", "alert level", "KS", "PSI > level"], rows,
          title=f"last {d['window']} observations ({d['seen']} seen)")
    shift = d.get("action_shift")
    console().print(f"action shift (PSI): {_fmt(shift)}{'  DRIFT' if thr is not None and shift > thr else ''}"
                    f" (alert above {thr})")
    console().print("ALERT: the served traffic drifted from the training statistics" if d.get("alert")
                    else "no drift (every PSI at most its feature's alert level)")


@click.command("drift")
@click.argument("name_or_run_id", metavar="NAME|RUN_ID")
@target_option
@json_option
def drift_cmd(name_or_run_id: str, target: str | None, as_json: bool) -> None:
    """Show the drift a deployment's replicas (or deploy run RUN_ID) measure: PSI and KS per
    observation feature, action shift."""
    from rlfleet.targets import get_target

    store = get_target(target).store()
    replicas = read_deployment(store, name_or_run_id)
    if replicas is not None:
        if as_json:
            print_json({"deployment": name_or_run_id, "replicas": replicas})
        else:
            for doc in replicas:
                _print(doc)
        return
    doc = read_status(store, name_or_run_id)
    if as_json:
        print_json(doc)
    else:
        _print(doc)
