"""Provisioner for ``aws`` and ``gcp`` targets: the Pulumi projects in ``infra_cloud/<cloud>``.

A target is built from the stack's outputs (keys in :mod:`rlfleet.stack_outputs`), read either
through the Pulumi Automation API (``stack="<project dir>/<stack name>"``) or from a saved
``pulumi stack output --json --show-secrets > outputs.json`` file (``outputs_file=...``). The
token never enters the targets file: the target's token source is the stack's secret reference
(``aws-secret:<arn>`` / ``gcp-secret:projects/<p>/secrets/<s>``). The head's TLS CA
certificate (published by the head to the artifact bucket) is fetched with the caller's cloud
credentials and pinned in ``~/.rlfleet/ca/<target>.pem``.

``up`` / ``destroy`` / ``plan_destroy`` need the Pulumi CLI; without it they raise
:class:`ProvisionerError` saying how to install it. pulumi is imported only inside them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlfleet import stack_outputs as so
from rlfleet.errors import ConfigError, ProvisionerError, RlfleetError
from rlfleet.provisioners.refs import PulumiRef
from rlfleet.provisioners.registry import CostInputs, ref_of, teardown_module
from rlfleet.targets import Target, rlfleet_home
from rlfleet.teardown import Leftover
from rlfleet.teardown.sweep import StackScope, StackSweep

Echo = Callable[[str], None]
CA_WAIT_SECONDS = 900.0


def _noop(_: str) -> None:
    pass


# -- outputs -> Target -------------------------------------------------------------------------

def _kind_of(outputs: dict[str, Any], kind: str | None) -> str:
    ref = str(outputs.get(so.OUTPUT_TOKEN_SECRET, ""))
    found = "aws" if ref.startswith("aws-secret:") else "gcp" if ref.startswith("gcp-secret:") else None
    if kind and found and kind != found:
        raise ConfigError(f"these stack outputs belong to a {found} stack, not {kind}")
    if not (kind or found):
        raise ConfigError("cannot tell whether these outputs are from an aws or a gcp stack; pass kind=")
    return str(kind or found)


def read_outputs_file(path: str | Path) -> dict[str, Any]:
    """Outputs saved with ``pulumi stack output --json --show-secrets > FILE``."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"outputs file {p} does not exist; create it in the project folder with: "
            "pulumi stack output --json --show-secrets > outputs.json"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"outputs file {p} is not JSON ({err}); write it with 'pulumi stack output --json'") from None
    if not isinstance(data, dict):
        raise ConfigError(f"outputs file {p}: expected a JSON object of stack outputs")
    return data


def _check_outputs(outputs: dict[str, Any], where: str) -> None:
    missing = [k for k in so.REQUIRED_OUTPUTS if not outputs.get(k)]
    if missing:
        raise ConfigError(
            f"{where} lacks the output(s) {', '.join(missing)}; is this an rlfleet stack, and did "
            "'pulumi up' finish?"
        )
    addr = str(outputs[so.OUTPUT_RAY_ADDRESS])
    if not addr.startswith("https://"):
        raise ConfigError(f"{where}: ray_address {addr!r} is not https://; the kit only reaches cloud heads over TLS")


def fetch_ca_cert(uri: str, dest: Path, *, storage_options: dict[str, Any] | None = None,
                  wait: float = 0.0, echo: Echo = _noop) -> Path:
    """Copy the head's CA certificate from the bucket (read with the caller's credentials) to dest."""
    from rlfleet.artifacts import filesystem

    fs, path = filesystem(uri, storage_options or {})
    deadline = time.monotonic() + wait
    while True:
        try:
            pem = fs.cat_file(path)
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the head has not published its CA certificate at {uri} yet (it does so a few "
                    "minutes after 'pulumi up' while it boots); retry later, or pass ca_cert=PATH"
                ) from None
            echo(f"waiting for the head to publish its CA certificate at {uri} ...")
            time.sleep(10)
        except Exception as err:
            raise ConfigError(f"cannot read the head's CA certificate {uri}: {err}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"{uri} is not a PEM certificate")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(pem)
    tmp.chmod(0o644)
    tmp.replace(dest)
    return dest


def target_from_outputs(name: str, outputs: dict[str, Any], *, kind: str | None = None,
                        provisioner: dict[str, str] | None = None, ca_cert: str | None = None,
                        storage_options: dict[str, Any] | None = None, wait_for_ca: float = 0.0,
                        echo: Echo = _noop, where: str = "stack outputs") -> Target:
    _check_outputs(outputs, where)
    kind = _kind_of(outputs, kind)
    if ca_cert is None:
        uri = outputs.get(so.OUTPUT_CA_CERT_URI)
        if not uri:
            raise ConfigError(f"{where} has no {so.OUTPUT_CA_CERT_URI}; pass ca_cert=PATH to the head's CA certificate")
        ca_cert = str(fetch_ca_cert(str(uri), rlfleet_home() / "ca" / f"{name}.pem",
                                    storage_options=storage_options, wait=wait_for_ca, echo=echo))
    elif not Path(ca_cert).expanduser().is_file():
        raise ConfigError(f"ca_cert {ca_cert} is not a file")
    prov: dict[str, str] = {
        "stack_tag": str(outputs.get(so.OUTPUT_STACK_TAG, "")),
        "region": str(outputs.get(so.OUTPUT_REGION, "")),
        **(provisioner or {}),
    }
    token_ref = str(outputs.get(so.OUTPUT_TOKEN_SECRET, ""))
    if token_ref.startswith("gcp-secret:projects/"):
        prov.setdefault("project", token_ref.split("/")[1])  # teardown scans this project
    if outputs.get(so.OUTPUT_DASHBOARD_URL):
        prov.setdefault("dashboard_url", str(outputs[so.OUTPUT_DASHBOARD_URL]))
    try:
        return Target(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            ray_address=str(outputs[so.OUTPUT_RAY_ADDRESS]),
            token_source=str(outputs[so.OUTPUT_TOKEN_SECRET]),
            artifact_root=str(outputs[so.OUTPUT_ARTIFACT_ROOT]),
            storage_options=dict(storage_options or {}),
            ca_cert=str(Path(ca_cert).expanduser()),
            provisioner=PulumiRef(type="pulumi", **prov),
            serve_ports=tuple(int(p) for p in outputs.get(so.OUTPUT_SERVE_PORTS) or ()),
        )
    except ValueError as err:  # pydantic ValidationError is a ValueError
        raise ConfigError(f"{where}: cannot build target {name!r}: {err}") from None


# -- Automation API ---------------------------------------------------------------------------

def split_stack(stack: str) -> tuple[Path, str]:
    """``<project dir>/<stack name>`` -> (project dir, stack name)."""
    project_dir, sep, name = str(stack).rstrip("/").rpartition("/")
    path = Path(project_dir or ".").expanduser().resolve()
    if not sep or not name:
        raise ConfigError(f"stack {stack!r}: write it as <project dir>/<stack>, e.g. infra_cloud/aws/dev")
    if not (path / "Pulumi.yaml").is_file():
        raise ConfigError(f"stack {stack!r}: {path} has no Pulumi.yaml; point at infra_cloud/aws or infra_cloud/gcp")
    return path, name


def _require_cli() -> None:
    if shutil.which("pulumi") is None:
        raise ProvisionerError(
            "the Pulumi CLI is not installed (rlfleet drives 'pulumi up/destroy' for aws and gcp "
            "targets through it): install it from https://www.pulumi.com/docs/iac/download-install/ "
            "and run 'pulumi login'; or add the target from a saved outputs file "
            "(rlfleet target add aws --outputs-file outputs.json)"
        )


def _stack(project_dir: Path, name: str, *, create: bool) -> Any:
    _require_cli()
    try:
        from pulumi import automation as auto
    except ImportError:
        raise ProvisionerError(
            "cloud targets need the Pulumi SDK: pip install -e '.[aws]' (or '.[gcp]') in your rlfleet checkout"
        ) from None
    try:
        if create:
            return auto.create_or_select_stack(stack_name=name, work_dir=str(project_dir))
        return auto.select_stack(stack_name=name, work_dir=str(project_dir))
    except Exception as err:
        raise ProvisionerError(f"pulumi stack {name} in {project_dir}: {err}") from None


def _plain(outputs: dict[str, Any]) -> dict[str, Any]:
    """Automation API OutputValue -> plain values (secrets included, kept in memory only)."""
    return {k: getattr(v, "value", v) for k, v in outputs.items()}


def _stack_opts(target: Target) -> tuple[Path, str]:
    ref = ref_of(target, PulumiRef)
    if not ref.project_dir or not ref.stack:
        raise ConfigError(
            f"target {target.name!r} was added from an outputs file, so rlfleet does not know its Pulumi "
            "project; re-add it with --stack <project dir>/<stack> or run pulumi in the project folder"
        )
    return Path(ref.project_dir), ref.stack


def target_from(name: str, *, stack: str | None = None, outputs_file: str | None = None,
                kind: str | None = None, ca_cert: str | None = None, wait_for_ca: float = 0.0,
                echo: Echo = _noop, **_: Any) -> Target:
    if bool(stack) == bool(outputs_file):
        raise ConfigError("give exactly one of --stack <project dir>/<stack> or --outputs-file FILE")
    if outputs_file:
        outputs = read_outputs_file(outputs_file)
        return target_from_outputs(name, outputs, kind=kind, ca_cert=ca_cert, wait_for_ca=wait_for_ca,
                                   echo=echo, where=f"outputs file {outputs_file}")
    project_dir, stack_name = split_stack(str(stack))
    st = _stack(project_dir, stack_name, create=False)
    outputs = _plain(st.outputs())
    return target_from_outputs(
        name, outputs, kind=kind, ca_cert=ca_cert, wait_for_ca=wait_for_ca, echo=echo,
        provisioner={"project_dir": str(project_dir), "stack": stack_name}, where=f"stack {stack}")


def up(target: Target, *, echo: Echo = print) -> Target:
    project_dir, stack_name = _stack_opts(target)
    st = _stack(project_dir, stack_name, create=True)
    try:
        result = st.up(on_output=echo)
    except Exception as err:
        raise ProvisionerError(f"pulumi up for {target.name!r} failed: {err}") from None
    return target_from_outputs(
        target.name, _plain(result.outputs), kind=target.kind, ca_cert=target.ca_cert,
        storage_options=target.storage_options, wait_for_ca=CA_WAIT_SECONDS, echo=echo,
        provisioner={"project_dir": str(project_dir), "stack": stack_name}, where=f"stack {stack_name}")


def describe_resources(deployment: dict[str, Any]) -> list[str]:
    """What ``pulumi destroy`` removes, from an exported deployment (retained resources excluded)."""
    out = []
    for res in deployment.get("resources", []):
        typ = res.get("type", "")
        if typ.startswith("pulumi:") or typ.startswith("rlfleet:") or res.get("retainOnDelete"):
            continue
        name = res.get("urn", "").rsplit("::", 1)[-1]
        out.append(f"{typ} {name} ({res.get('id', '?')})")
    return out


def retained_resources(deployment: dict[str, Any]) -> list[str]:
    return [f"{r.get('type')} {r.get('id', '?')}" for r in deployment.get("resources", []) if r.get("retainOnDelete")]


def _refuse_delete_data(target: Target) -> None:
    raise ProvisionerError(
        f"deleting the artifact bucket of {target.name!r} is not automated for cloud targets: the stack "
        "keeps the bucket and its key on destroy; run down without --delete-data, then delete the bucket "
        "in the cloud console (see docs/runbook-aws.md / runbook-gcp.md, 'Teardown')"
    )


def plan_destroy(target: Target, *, delete_data: bool = False) -> list[str]:
    if delete_data:
        _refuse_delete_data(target)
    project_dir, stack_name = _stack_opts(target)
    st = _stack(project_dir, stack_name, create=False)
    deployment = st.export_stack().deployment or {}
    kept = [f"kept (data): {r}" for r in retained_resources(deployment)]
    return describe_resources(deployment) + kept


def destroy(target: Target, *, delete_data: bool = False, echo: Echo = print) -> None:
    if delete_data:
        _refuse_delete_data(target)
    project_dir, stack_name = _stack_opts(target)
    try:
        st = _stack(project_dir, stack_name, create=False)
    except ProvisionerError as err:
        if "no stack named" in str(err).lower() or "not found" in str(err).lower():
            echo(f"stack {stack_name} does not exist; nothing to destroy")
            return
        raise
    try:
        st.destroy(on_output=echo)
    except Exception as err:
        raise ProvisionerError(f"pulumi destroy for {target.name!r} failed: {err}") from None


def ready(target: Target) -> Target:
    return target  # the stack's head runs whenever the stack is up


def stack_of(target: Target) -> str:
    """The value the stack's resources are tagged with: its stack id (older targets: the bare name)."""
    ref = ref_of(target, PulumiRef)
    stack = ref.stack_tag or ref.stack
    if not stack:
        raise RlfleetError(
            f"target {target.name!r} has no provisioner.stack: rlfleet cannot tell which "
            "tagged resources belong to it; re-create it with 'rlfleet target add'"
        )
    return stack


def _region(target: Target, ref: PulumiRef) -> str | None:
    """The stack's region (gcp: else its project): recorded on the target, else from its stack config."""
    if ref.region:
        return ref.region
    if ref.project_dir and ref.stack:
        from rlfleet.teardown.cost import read_stack_config

        try:
            _, cfg = read_stack_config(ref.project_dir, ref.stack)
        except RlfleetError:
            return None
        return cfg.get(f"{target.kind}:region") or cfg.get(f"{target.kind}:project")
    return None


def sweep(target: Target) -> StackSweep:
    """The tag sweep of this target's stack (rlfleet.teardown.<cloud>.stack_sweep)."""
    ref = ref_of(target, PulumiRef)
    scope = StackScope(target=target.name, stack=stack_of(target), region=_region(target, ref), project=ref.project)
    result: StackSweep = teardown_module(target).stack_sweep(scope)
    return result


def scan_leftovers(target: Target) -> list[Leftover]:
    """Everything still tagged for the stack: the sweep's scan (the one leftover scanner)."""
    return sweep(target).scan()


def cost_inputs(target: Target) -> CostInputs:
    ref = ref_of(target, PulumiRef)
    if not ref.project_dir or not ref.stack:
        raise ConfigError(f"target {target.name!r}: provisioner.project_dir and provisioner.stack are required")
    return CostInputs(cloud=target.kind, project_dir=ref.project_dir, stack=ref.stack)
