"""rlfleet deploy NAME / deployments / undeploy: named deployments (rlfleet.deployments)."""

from __future__ import annotations

from typing import Any

import click

from rlfleet.cli._common import json_option, print_json, table, target_option


def _deployments() -> Any:
    """rlfleet.deployments, imported when a command runs (it pulls the targets and the store)."""
    import rlfleet.deployments as d

    return d


@click.command("deploy")
@click.argument("name")
@target_option
@click.option("--from", "source", metavar="RUN_ID", help="The finished train run to deploy (a new version).")
@click.option("--replicas", type=int, help="Replicas of the live version (default 1).")
@click.option("--canary", type=int, metavar="PCT", help="With --from: the new version takes PCT % of the traffic; "
              "alone: change the canary's weight.")
@click.option("--promote", is_flag=True, help="The canary takes all traffic.")
@click.option("--rollback", is_flag=True, help="Drop the canary, or go back to the version before the live one.")
@click.option("--shadow", metavar="RUN_ID", help="A version that sees a copy of live traffic (answers go nowhere).")
@click.option("--autoscale", metavar="MIN:MAX", help="Scale the live version between MIN and MAX replicas on "
              "in-flight requests ('off' to stop).")
@click.option("--status", "show_status", is_flag=True, help="Versions, weights, replicas, p50/p99, error rates.")
@json_option
def deploy_cmd(name: str, target: str | None, source: str | None, replicas: int | None, canary: int | None,
               promote: bool, rollback: bool, shadow: str | None, autoscale: str | None, show_status: bool,
               as_json: bool) -> None:
    """Deploy, change or inspect the named deployment NAME (its URL never changes across versions)."""
    d = _deployments()
    actions = [f for f, on in (("--promote", promote), ("--rollback", rollback), ("--shadow", shadow),
                               ("--status", show_status), ("--from", source), ("--autoscale", autoscale)) if on]
    if len(actions) > 1:
        raise d.DeploymentError(f"{' and '.join(actions)} cannot be combined; give one change at a time")
    d.check_name(name)
    if show_status:
        return _print_status(d.get_deployment(name, target).status(), as_json)
    if source:
        dep = d.deploy(name, source, replicas=replicas, canary=canary, target=target)
    elif canary is not None:
        dep = d.get_deployment(name, target)
        dep.set_weight(canary)
    elif promote:
        dep = d.get_deployment(name, target)
        dep.promote()
    elif rollback:
        dep = d.get_deployment(name, target)
        dep.rollback()
    elif shadow:
        dep = d.get_deployment(name, target)
        dep.shadow(shadow)
    elif autoscale:
        lo, sep, hi = autoscale.partition(":")
        if autoscale != "off" and not (sep and lo.isdigit() and hi.isdigit()):
            raise d.DeploymentError(f"--autoscale {autoscale!r}: give MIN:MAX replicas (e.g. 1:4) or 'off'")
        dep = d.get_deployment(name, target)
        if autoscale == "off":
            dep.autoscale(None)
        else:
            dep.autoscale(int(lo), int(hi))
    elif replicas is not None:
        dep = d.get_deployment(name, target)
        dep.scale(replicas)
    else:
        raise d.DeploymentError(f"say what to do with {name!r}: --from RUN_ID [--replicas N] [--canary PCT], "
                                "--canary PCT, --promote, --rollback, --shadow RUN_ID, --replicas N, "
                                "--autoscale MIN:MAX "
                                "or --status")
    st = dep.state()
    ep = dep.registry.endpoint() or {}
    doc = {"deployment": name, "seq": st["seq"], "why": st["why"], "url": ep.get("url"), "path": ep.get("path")}
    if as_json:
        print_json(doc)
    else:
        click.echo(f"{name}: {st['why']}; serving at {ep.get('url', '?')}{ep.get('path', '')} "
                   "(bearer token: rlfleet.deployments.get_deployment(NAME).endpoint().token)")


def _print_status(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        return print_json(doc)
    st, obs, ep = doc["state"], doc.get("observed") or {}, doc.get("endpoint") or {}
    click.echo(f"{doc['deployment']} on {doc['target']}: {'active' if st.get('active') else 'undeployed'}, "
               f"{ep.get('url', 'no endpoint yet')}{ep.get('path', '')}; state {st['seq']} by {st['by']} at "
               f"{st['at']}: {st['why']}")
    seen = obs.get("versions") or {}
    rows = []
    for v in doc["versions"]:
        o = seen.get(str(v["version"]), {})
        rows.append([v["version"], o.get("role", ""), v["source_run"], v["policy_sha256"][:12], o.get("weight"),
                     o.get("replicas"), o.get("p50_ms"), o.get("p99_ms"), o.get("error_rate"), o.get("inflight")])
    table(["version", "role", "run", "sha256", "weight", "replicas", "p50 ms", "p99 ms", "errors", "in flight"], rows)
    reps = obs.get("replicas") or []
    if reps:  # where Ray placed each replica (a replica on another node than the balancer's is reached over TLS)
        table(["replica", "version", "role", "node", "address", "tls", "balancer", "avg ms"],
              [[r.get("replica"), r.get("version"), r.get("role"), r.get("node", ""), r.get("address", ""),
                "yes" if r.get("tls") else "no", r.get("balancer") or ("draining" if r.get("draining") else ""),
                r.get("rtime_ms")] for r in reps], title="replicas")
    if obs.get("shadow"):
        click.echo(f"shadow: {obs['shadow']}")
    if obs.get("error"):
        click.echo(f"controller error: {obs['error']}")


@click.command("deployments")
@target_option
@json_option
def deployments_cmd(target: str | None, as_json: bool) -> None:
    """List the named deployments of a target."""
    rows = _deployments().list_deployments(target)
    if as_json:
        return print_json(rows)
    table(["deployment", "active", "live", "canary", "weight", "shadow", "url", "changed"],
          [[r["deployment"], r["state"].get("active"), r["state"].get("live"), r["state"].get("canary"),
            r["state"].get("canary_weight"), r["state"].get("shadow"), (r.get("endpoint") or {}).get("url"),
            r["state"].get("at")] for r in rows])


@click.command("undeploy")
@click.argument("name")
@target_option
def undeploy_cmd(name: str, target: str | None) -> None:
    """Stop serving NAME: replicas, balancer and token go; its versions and history stay in the store."""
    d = _deployments()
    d.get_deployment(name, target).undeploy()
    click.echo(f"{name}: undeployed")
