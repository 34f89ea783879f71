"""Typed provisioner references: what a target records about the thing that owns it.

One model per provisioner, told apart by ``type`` (saved in the targets file as
``provisioner: {type: pulumi, project_dir: ..., stack: ...}``):

- :class:`PulumiRef`  aws/gcp targets: the Pulumi project and stack, and the stack id the stack
  tags its resources with (``stack_tag``), its region and (gcp) project;
- :class:`AnsibleRef` onprem targets: the site inventory, the playbook dir, the vault password file;
- :class:`LocalRef`   the embedded local Ray head;
- :class:`NoRef`      a Ray cluster rlfleet does not manage (kind ``ray``).

Targets saved before these models existed stored an untyped mapping; :func:`parse_ref` reads
those too (``{}`` is :class:`NoRef`; a mapping without ``type`` is told apart by its keys). The
models also read like that mapping (``ref["stack"]``, ``ref.get("region")``, ``{**ref}``) for
code written against it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Ref(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def keys(self) -> list[str]:
        """The fields that are set (the keys the old mapping would have had)."""
        return list(self.model_dump(exclude_none=True))


class PulumiRef(_Ref):
    type: Literal["pulumi"]
    project_dir: str | None = Field(default=None, description="the Pulumi project folder (infra_cloud/<cloud>)")
    stack: str | None = Field(default=None, description="the stack name in that project")
    stack_tag: str | None = Field(default=None, description="the stack id its resources are tagged with")
    region: str | None = None
    project: str | None = Field(default=None, description="gcp: the project the stack lives in")
    dashboard_url: str | None = None


class AnsibleRef(_Ref):
    type: Literal["ansible"]
    inventory: str | None = Field(default=None, description="the site inventory (dir or file)")
    playbook_dir: str | None = Field(default=None, description="ansible/ (site.yml, teardown.yml, leftovers.yml)")
    vault_password_file: str | None = None


class LocalRef(_Ref):
    type: Literal["local"]


class NoRef(_Ref):
    type: Literal["none"]

    def keys(self) -> list[str]:
        return []  # the old code wrote {} for targets nobody provisions


ProvisionerRef = Annotated[PulumiRef | AnsibleRef | LocalRef | NoRef, Field(discriminator="type")]
_ADAPTER: TypeAdapter[PulumiRef | AnsibleRef | LocalRef | NoRef] = TypeAdapter(ProvisionerRef)


def upgrade_old_mapping(value: Any) -> Any:
    """A provisioner mapping as the old code saved it -> one with a ``type`` (anything else: as is)."""
    if isinstance(value, _Ref) or not isinstance(value, dict) or "type" in value:
        return value
    if not value:
        return {"type": "none"}
    if "inventory" in value or "playbook_dir" in value:
        return {"type": "ansible", **value}
    return {"type": "pulumi", **value}


def parse_ref(value: Any) -> PulumiRef | AnsibleRef | LocalRef | NoRef:
    """The typed reference of a saved mapping (old or new format) or of a reference."""
    if isinstance(value, _Ref):
        return value  # type: ignore[return-value]
    return _ADAPTER.validate_python(upgrade_old_mapping(value))
