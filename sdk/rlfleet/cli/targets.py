"""rlfleet target list | add | show | remove."""

from __future__ import annotations

from typing import Any

import click

from rlfleet.cli._common import json_option, print_json, table


@click.group("target")
def target_grp() -> None:
    """Targets: where runs go (kept in ./rlfleet.yaml or ~/.config/rlfleet/targets.yaml)."""


@target_grp.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List configured targets (local is always there)."""
    from rlfleet.targets import config_path, list_targets

    targets = list_targets()
    if as_json:
        print_json([t.model_dump(mode="json") for t in targets])
        return
    table(
        ["name", "kind", "ray_address", "artifact_root", "provisioner"],
        [[t.name, t.kind, t.ray_address, t.artifact_root, t.provisioner.get("type", "")] for t in targets],
        title=f"targets ({config_path()})",
    )


@target_grp.command("show")
@click.argument("name")
@json_option
def show_cmd(name: str, as_json: bool) -> None:
    """Show target NAME (the token itself is never printed)."""
    from rlfleet.targets import get_target

    t = get_target(name)
    if as_json:
        print_json(t.model_dump(mode="json"))
    else:
        table(["field", "value"], [[k, v] for k, v in t.model_dump(mode="json").items()])


@target_grp.command("add")
@click.argument("kind", type=click.Choice(["aws", "gcp", "onprem", "ray"]))
@click.option("--name", help="Target name (default: the kind).")
@click.option("--stack", help="aws/gcp: <Pulumi project dir>/<stack name>.")
@click.option(
    "--outputs-file",
    type=click.Path(exists=True, dir_okay=False),
    help="aws/gcp: saved 'pulumi stack output --json --show-secrets'.",
)
@click.option("--inventory", type=click.Path(exists=True), help="onprem: Ansible inventory (dir or file).")
@click.option("--vault-password-file", type=click.Path(exists=True, dir_okay=False),
              help="onprem: ansible-vault password file (default: $ANSIBLE_VAULT_PASSWORD_FILE).")
@click.option("--address", help="ray: the Ray dashboard / Jobs API URL.")
@click.option("--token-file", type=click.Path(), help="ray/onprem: file holding the Ray token (mode 0600).")
@click.option("--artifact-root", help="ray: artifact root URI as the cluster sees it.")
@click.option("--client-artifact-root", help="The same root as this machine reaches it, if different.")
@click.option("--ca-cert", type=click.Path(), help="PEM CA that signed the head's TLS certificate.")
@json_option
def add_cmd(
    kind: str,
    name: str | None,
    stack: str | None,
    outputs_file: str | None,
    inventory: str | None,
    vault_password_file: str | None,
    address: str | None,
    token_file: str | None,
    artifact_root: str | None,
    client_artifact_root: str | None,
    ca_cert: str | None,
    as_json: bool,
) -> None:
    """Add (or update) a target of KIND from a Pulumi stack, an inventory, or by hand."""
    from pydantic import ValidationError

    from rlfleet.errors import ConfigError
    from rlfleet.targets import save_target, validation_line

    name = name or kind
    try:
        target = _new_target(kind, name, stack, outputs_file, inventory, vault_password_file, address, token_file,
                             artifact_root, client_artifact_root, ca_cert)
    except ValidationError as err:  # nothing was written: the target is checked before it is saved
        raise ConfigError(f"target {name!r}: {validation_line(err)}") from None
    path = save_target(target)
    if as_json:
        print_json(target.model_dump(mode="json"))
    else:
        click.echo(f"target {target.name!r} ({target.kind}) saved to {path}: {target.ray_address}")


def _new_target(kind: str, name: str, stack: str | None, outputs_file: str | None, inventory: str | None,
                vault_password_file: str | None, address: str | None, token_file: str | None,
                artifact_root: str | None, client_artifact_root: str | None, ca_cert: str | None) -> Any:
    from rlfleet.provisioners import registry
    from rlfleet.targets import check_target_name

    check_target_name(name)
    options: dict[str, Any] = {
        k: v
        for k, v in {
            "stack": stack,
            "outputs_file": outputs_file,
            "inventory": inventory,
            "token_file": token_file,
            "vault_password_file": vault_password_file,
            "address": address,
            "artifact_root": artifact_root,
            "client_artifact_root": client_artifact_root,
            "ca_cert": ca_cert,
        }.items()
        if v is not None
    }
    return registry.new_target(kind, name, **options)


@target_grp.command("remove")
@click.argument("name")
def remove_cmd(name: str) -> None:
    """Forget target NAME (its infrastructure is untouched: use 'rlfleet down' for that)."""
    from rlfleet.errors import TargetNotFound
    from rlfleet.targets import config_path, remove_target

    if not remove_target(name):
        raise TargetNotFound(f"no target named {name!r} in {config_path()}")
    click.echo(f"target {name!r} removed from {config_path()}")
