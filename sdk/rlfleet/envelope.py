"""The run envelope: the one typed contract between the SDK and the run runtime.

The SDK decides everything about a run on the submitting machine (run id, where artifacts go,
which run is the source, whether the env comes from the source, the deployment token's hash)
and packs it into one frozen :class:`RunEnvelope`. Ray carries it to the cluster as a single
environment variable; the runtime (``python -m rlfleet_agents.run``) reads it back with
:meth:`RunEnvelope.from_env` and acts on it, never re-deriving what the SDK decided and never
checking facts about the submitting machine (its paths, its files).

Nothing secret travels in the envelope: a deployment's token stays with the submitter and only
its sha256 is sent, so the policy server can check a token it never holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlfleet.errors import RlfleetError, SpecError
from rlfleet.spec import RunSpec
from rlfleet.tracking import Tracking

ENV_VAR = "RLFLEET_ENVELOPE"
SCHEMA = 1


def kit_version() -> str:
    """The version of the rlfleet kit installed in this Python environment."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlfleet")
    except PackageNotFoundError:  # a source tree on PYTHONPATH without an install
        from rlfleet import __version__

        return __version__


def _unknown_fields(model: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the keys in ``data`` that ``model`` (and its nested models) does not declare."""
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(prefix + str(key))
        elif isinstance(value, Mapping):
            nested = [t for t in (field.annotation, *get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)]  # Model or Model | None
            if nested:
                found += _unknown_fields(nested[0], value, f"{prefix}{key}.")
    return found


class EnvelopeError(RlfleetError):
    """The run's envelope is missing, unreadable or from another kit version."""


class RunEnvelope(BaseModel):
    """Everything a run needs to know, decided by the SDK on the submitting machine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(default=SCHEMA, description="envelope layout; bumped on incompatible change")
    kit_version: str = Field(default_factory=kit_version, description="rlfleet version that submitted the run")
    run_id: str
    artifact_root: str = Field(description="fsspec URI of the artifact root as the cluster sees it")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (no secrets)")
    spec: RunSpec
    target: str = "local"
    source_uri: str | None = Field(default=None, description="eval/deploy: <root>/runs/<id> of the run to use")
    resume_uri: str | None = Field(default=None, description="train: <root>/runs/<id> to continue from")
    env_from_source: bool = Field(
        default=False, description="eval/deploy: the submitter could not read the source; take its env on the cluster"
    )
    serve_ports: tuple[int, ...] = Field(default=(), description="deploy: ports the server may bind")
    serve_token_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="deploy: sha256 of the deployment's own bearer token"
    )
    reproduces: str | None = Field(default=None, description="train: id of the run this one re-runs (same spec)")
    tracking: Tracking | None = Field(default=None, description="train: the MLflow server to log to (spec's, else "
                                      "the target's)")

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: self.model_dump_json()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunEnvelope:
        raw = environ.get(ENV_VAR)
        if not raw:
            raise EnvelopeError(f"missing {ENV_VAR}: runs are started by rlfleet's submit_run()")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise EnvelopeError(f"{ENV_VAR} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise EnvelopeError(f"{ENV_VAR} must be a JSON object")
        theirs, mine = str(data.get("kit_version", "?")), kit_version()
        if theirs != mine or data.get("schema_version") != SCHEMA:
            raise EnvelopeError(
                f"this run was submitted by rlfleet {theirs} but the cluster runs rlfleet {mine}; "
                "submit from the kit version the cluster was provisioned with, or re-provision the "
                "cluster from this checkout ('rlfleet up <target>')"
            )
        unknown = _unknown_fields(cls, data)
        if unknown:  # a newer checkout that kept the version string: say so, not "malformed"
            raise EnvelopeError(
                f"this run carries fields the cluster's rlfleet {mine} does not know ({', '.join(unknown)}): "
                "the cluster was provisioned from an older checkout of this version; re-provision it from this "
                "checkout ('rlfleet up <target>') or submit from the checkout it was provisioned with"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in err.errors())
            raise EnvelopeError(f"{ENV_VAR} is malformed ({fields})") from None
        except SpecError as err:
            raise EnvelopeError(f"{ENV_VAR} is malformed ({err})") from None

    @property
    def labels(self) -> dict[str, str]:
        """Metric labels of this run (the contract in ARCHITECTURE.md)."""
        return {"run_id": self.run_id, "kind": self.spec.kind.value, "env": self.spec.env, "target": self.target}
