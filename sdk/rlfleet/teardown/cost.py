"""``rlfleet cost``: an hourly and monthly ESTIMATE of a cloud stack from its config.

Reads ``Pulumi.<stack>.yaml`` in the target's Pulumi project directory (keys
``<project>:head_instance_type``, ``worker_instance_type``, ``worker_count``, ``disk_size_gb``,
``gpu_type``, ``gpu_count``, ``spot``, ``idle_minutes`` and ``aws:region`` / ``gcp:region``;
unset keys take the programs' defaults) and prices from ``rlfleet/data/prices.yaml`` (dated,
labelled an estimate). The figure assumes every node runs all hour at on-demand prices: spot
and idle auto-stop make the real bill lower; artifact storage and traffic are billed by use and
are not in the hourly figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlfleet.constants import cloud_defaults
from rlfleet.errors import ConfigError
from rlfleet.provisioners.registry import cost_inputs
from rlfleet.targets import Target

PRICES_FILE = Path(__file__).resolve().parent.parent / "data" / "prices.yaml"


@dataclass
class Estimate:
    cloud: str
    stack: str
    region: str
    lines: list[tuple[str, float]] = field(default_factory=list)  # (item, USD per hour)
    notes: list[str] = field(default_factory=list)
    as_of: str = ""
    currency: str = "USD"
    hours_per_month: float = 730.0

    @property
    def hourly(self) -> float:
        return sum(v for _, v in self.lines)

    @property
    def monthly(self) -> float:
        return self.hourly * self.hours_per_month

    def to_dict(self) -> dict[str, Any]:
        doc = {key: getattr(self, key) for key in ("cloud", "stack", "region", "currency", "notes")}
        doc.update(prices_as_of=self.as_of, label="estimate", hourly=round(self.hourly, 4),
                   monthly=round(self.monthly, 2), lines=[{"item": k, "hourly": round(v, 4)} for k, v in self.lines])
        return doc

    def format(self) -> str:
        out = [f"Cost ESTIMATE for {self.cloud} stack {self.stack!r} ({self.region}), "
               f"prices as of {self.as_of}, {self.currency}:"]
        width = max((len(k) for k, _ in self.lines), default=10)
        for item, hourly in self.lines:
            out.append(f"  {item:<{width}}  {hourly:9.4f} /h")
        out.append(f"  {'total':<{width}}  {self.hourly:9.4f} /h  ~ {self.monthly:,.0f} /month "
                   f"({self.hours_per_month:.0f} h)")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


def load_prices(path: Path | None = None) -> dict[str, Any]:
    return dict(yaml.safe_load((path or PRICES_FILE).read_text()))


def read_stack_config(project_dir: str | Path, stack: str) -> tuple[str, dict[str, str]]:
    """(project name, {key: value}) with the project prefix stripped; provider keys keep theirs."""
    pdir = Path(project_dir).expanduser()
    try:
        project = yaml.safe_load((pdir / "Pulumi.yaml").read_text())["name"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise ConfigError(f"{pdir}/Pulumi.yaml: cannot read the project name ({err})") from None
    path = pdir / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist: create the stack config (copy Pulumi.dev.yaml) before estimating its cost"
        )
    try:
        raw = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    cfg: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and "secure" in value:
            continue  # secrets are never needed for a cost estimate
        name = key[len(project) + 1:] if key.startswith(project + ":") else key
        if isinstance(value, (list, dict)):
            cfg[name] = json.dumps(value)
        elif isinstance(value, bool):
            cfg[name] = "true" if value else "false"
        else:
            cfg[name] = str(value)
    return project, cfg


def _num(cfg: dict[str, str], key: str, default: str) -> int:
    raw = cfg.get(key, default)
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"stack config {key}: {raw!r} is not a whole number") from None


def estimate(cloud: str, cfg: dict[str, str], *, stack: str, prices: dict[str, Any] | None = None) -> Estimate:
    """Estimate from a stack's config values (project prefix stripped)."""
    prices = prices or load_prices()
    if cloud not in ("aws", "gcp"):
        raise ConfigError(f"cost estimates cover aws and gcp stacks, not {cloud!r}")
    table = prices[cloud]
    d = cloud_defaults(cloud)  # what the programs use for keys the stack config leaves unset
    head = cfg.get("head_instance_type", d["head_instance_type"])
    worker = cfg.get("worker_instance_type", d["worker_instance_type"])
    workers = _num(cfg, "worker_count", d["worker_count"])
    disk = _num(cfg, "disk_size_gb", d["disk_size_gb"])
    region = cfg.get(f"{cloud}:region") or cfg.get("region") or table["region"]
    est = Estimate(cloud=cloud, stack=stack, region=region, as_of=str(prices.get("as_of", "?")),
                   currency=str(prices.get("currency", "USD")),
                   hours_per_month=float(prices.get("hours_per_month", 730)))
    per_hour = table["instances_per_hour"] if cloud == "aws" else table["machines_per_hour"]

    def price(kind: str, what: str) -> float:
        if kind not in per_hour:
            raise ConfigError(
                f"no price for {cloud} {what} {kind!r} in {PRICES_FILE.name} "
                f"(known: {', '.join(sorted(per_hour))}); add it there to estimate this stack"
            )
        return float(per_hour[kind])

    est.lines.append((f"head {head} x1", price(head, "head_instance_type")))
    if workers:
        est.lines.append((f"workers {worker} x{workers}", price(worker, "worker_instance_type") * workers))
        if cloud == "gcp" and worker.startswith("n1-"):
            gpu = cfg.get("gpu_type", "nvidia-tesla-t4")
            count = _num(cfg, "gpu_count", "1")
            gpus = table.get("gpus_per_hour", {})
            if gpu not in gpus:
                raise ConfigError(f"no price for GCP GPU {gpu!r} in {PRICES_FILE.name}; add it there")
            est.lines.append((f"gpus {gpu} x{count * workers}", float(gpus[gpu]) * count * workers))
    nodes = 1 + workers
    hours = est.hours_per_month
    est.lines.append((f"disks {disk} GB x{nodes}", float(table["disk_gb_month"]) * disk * nodes / hours))
    if region != table["region"]:
        est.notes.append(f"prices are for {table['region']}; {region} may differ")
    if cfg.get("spot", d["spot"]) == "true":
        est.notes.append("spot workers: the real price is usually well below this on-demand figure")
    idle = cfg.get("idle_minutes", d["idle_minutes"])
    est.notes.append(f"upper bound: all nodes running all month; idle auto-stop after {idle} min lowers it")
    est.notes.append(f"artifact storage billed by use: {table['storage_gb_month']} {est.currency}/GB-month")
    est.notes.append(f"an estimate from {PRICES_FILE.name} (as of {est.as_of}), not a quote")
    return est


def estimate_target(target: Target, *, prices: dict[str, Any] | None = None) -> Estimate:
    inputs = cost_inputs(target)  # ConfigError for targets with no cloud stack to price
    _, cfg = read_stack_config(inputs.project_dir, inputs.stack)
    return estimate(inputs.cloud, cfg, stack=inputs.stack, prices=prices)
