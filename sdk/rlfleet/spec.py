"""RunSpec: what to run. Validated and immutable; YAML/JSON round trip.

Bad input fails here, before anything leaves the machine, with a message that
names the field and the allowed values.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlfleet._yaml import yaml_problem
from rlfleet.agent_catalog import AGENTS
from rlfleet.agent_config import validate_agent_config
from rlfleet.constants import run_label
from rlfleet.errors import SpecError
from rlfleet.tracking import Tracking

if TYPE_CHECKING:
    AgentName = str
else:  # the built-in agents, from the catalog rlfleet_agents ships (rlfleet/data/agents.json)
    AgentName = Literal[AGENTS]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _slug_or_none(v: str | None) -> str | None:
    if v is not None and not _SLUG.match(v):
        raise ValueError("must be 1-63 lowercase letters, digits and '-', starting with a letter or digit")
    return v


# a run's or a deploy's name (a Ray job id part, a URL path segment)
_SlugName = Annotated[str | None, AfterValidator(_slug_or_none)]

# Gymnasium ids: "CartPole-v1", "ALE/Pong-v5", or "my_pkg.envs:GridWorld-v0" (module:EnvName form).
_ENV_ID = re.compile(r"^(?:[A-Za-z_][\w.]*:)?(?:[\w.-]+/)?[A-Za-z_][\w.-]*(?:-v\d+)?$")


class Kind(str, Enum):
    TRAIN = "train"
    EVAL = "eval"
    DEPLOY = "deploy"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Budget(_Frozen):
    """How long a train run may go on. Whichever limit is hit first ends it."""

    steps: int | None = Field(default=None, gt=0, description="environment steps")
    minutes: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="wall-clock minutes")


class Resources(_Frozen):
    """What the run reserves on the cluster (maps to Ray entrypoint resources)."""

    cpus: float = Field(default=1.0, ge=0, le=1024)
    gpus: float = Field(default=0.0, ge=0, le=64)


class EvalOptions(_Frozen):
    episodes: int = Field(default=10, ge=1, le=100_000)
    policy_format: Literal["onnx", "torch"] = "onnx"
    compare_to: str | None = Field(default=None, description="run id of another eval to compare with")


class DeployOptions(_Frozen):
    name: _SlugName = Field(default=None, description="policy name in the URL; default: the run's name")
    port: int | None = Field(default=None, ge=1024, le=65535, description="default: a free port")
    host: str = Field(default="127.0.0.1", description="address the policy server binds on its node")
    audit_rate: float = Field(default=0.01, ge=0.0, le=1.0,
                              description="fraction of answered requests kept in the audit log (audit/*.jsonl "
                              "in the deploy run's artifacts); 0 turns it off")


# The text formats a spec is read from: loader, the error it raises, that error on one line.
_TEXT_FORMATS: dict[str, tuple[Callable[[str], Any], type[Exception], Callable[[Any], str]]] = {
    "JSON": (json.loads, json.JSONDecodeError, str),
    "YAML": (yaml.safe_load, yaml.YAMLError, yaml_problem),
}


def _load_text(text: str, fmt: str) -> Any:
    load, error, describe = _TEXT_FORMATS[fmt]
    try:
        return load(text)
    except error as err:
        raise SpecError(f"run spec is not valid {fmt}: {describe(err)}") from None


class RunSpec(_Frozen):
    """One RL run: train, evaluate or deploy an agent."""

    kind: Kind
    name: _SlugName = Field(default=None, description="a label for the run (lowercase, digits, '-')")
    env: str = Field(default="CartPole-v1", description="Gymnasium env id, or 'module:EnvName-v0'")
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    agent: AgentName = "ppo"
    config: dict[str, Any] = Field(default_factory=dict, description="agent hyperparameter overrides")
    seed: int = Field(default=0, ge=0, lt=2**31)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    source: str | None = Field(default=None, description="eval/deploy: the run id (or run URI) to use")
    resume_from: str | None = Field(default=None, description="train: run id whose checkpoint to resume")
    code: str | None = Field(default=None, description="local project directory shipped with the run")
    requirements: list[str] | str | None = Field(
        default=None,
        description="extra Python packages for this run: pip requirement strings, or the name of a "
        "requirements file inside `code` (e.g. 'requirements.txt'); './path' entries name files inside `code`",
    )
    eval: EvalOptions = Field(default_factory=EvalOptions)
    deploy: DeployOptions = Field(default_factory=DeployOptions)
    tags: dict[str, str] = Field(default_factory=dict)
    tracking: Tracking = Field(default_factory=Tracking, description="train: an MLflow server to log to "
                               "(overrides the target's tracking)")
    priority: int = Field(
        default=0, ge=0, le=1000,
        description="queue order on a supervised target: higher goes first, then submission time",
    )
    max_restarts: int = Field(
        default=0, ge=0, le=100,
        description="train: times the supervisor resubmits the run from its last checkpoint after an "
        "infrastructure failure (node lost, trainer killed); user errors never restart",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise SpecError(format_validation_error(err)) from None

    # -- field checks -------------------------------------------------------------------------
    @field_validator("env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not _ENV_ID.match(v):
            raise ValueError("is not a Gymnasium env id: use e.g. 'CartPole-v1' or 'my_module:MyEnv-v0'")
        return v

    @field_validator("requirements")
    @classmethod
    def _requirements(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, str):
            _check_inside_code(v, "a file name inside the code directory, e.g. 'requirements.txt'")
        elif v is not None:
            for i, req in enumerate(v):
                if not req.strip() or "\n" in req or req.strip().startswith("-"):
                    raise ValueError(
                        f"entry {i} ({req!r}) is not a requirement: give one package per entry, e.g. "
                        "'gymnasium-robotics==1.4.0' or './wheels/my_sim-1.0-py3-none-any.whl' (no pip options)"
                    )
                if req.startswith("./"):
                    _check_inside_code(req[2:], "a './path' inside the code directory")
        return v

    @field_validator("env_kwargs", "config")
    @classmethod
    def _jsonable(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"must be plain JSON values (str, numbers, lists, dicts): {err}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        if self.kind in (Kind.EVAL, Kind.DEPLOY):
            if not self.source:
                raise ValueError(
                    f"source: a {self.kind.value} run needs the run to use: give source=<run id> (CLI: --from RUN_ID)"
                )
            if self.resume_from:
                raise ValueError("resume_from: only train runs can resume")
        elif self.source:
            raise ValueError("source: train runs start from scratch; to continue one use resume_from=<run id>")
        if self.max_restarts and self.kind is not Kind.TRAIN:
            raise ValueError(f"max_restarts: only train runs restart from a checkpoint, not {self.kind.value} runs")
        local_reqs = isinstance(self.requirements, list) and any(r.startswith("./") for r in self.requirements)
        if (isinstance(self.requirements, str) or local_reqs) and self.code is None:
            raise ValueError("requirements: a requirements file is read from the run's code directory; give code=<dir>")
        if self.config:
            validate_agent_config(self.agent, self.config)  # raises ValueError naming config.<key>
        return self

    # -- helpers ------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return run_label(self.name, self.agent, self.env)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON form; identical specs hash alike."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def with_changes(self, **changes: Any) -> RunSpec:
        data = self.to_dict()
        data.update(changes)
        return RunSpec.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> RunSpec:
        if not isinstance(data, dict):
            raise SpecError(f"a run spec must be a mapping of fields, got {type(data).__name__}")
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise SpecError(f"run spec field names must be strings, got {odd[0]!r} ({type(odd[0]).__name__})")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(_load_text(text, "JSON"))

    @classmethod
    def from_yaml(cls, text: str) -> RunSpec:
        return cls.from_dict(_load_text(text, "YAML"))

    @classmethod
    def from_file(cls, path: str | Path) -> RunSpec:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as err:
            raise SpecError(f"cannot read spec file {str(p)!r}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise SpecError(f"cannot read spec file {str(p)!r}: it is not UTF-8 text") from None
        if p.suffix == ".json":
            return cls.from_json(text)
        return cls.from_yaml(text)


def _check_inside_code(rel: str, what: str) -> None:
    parts = Path(rel).parts
    if not rel or rel.startswith(("/", "~")) or ".." in parts or "\\" in rel:
        raise ValueError(f"{rel!r} must be {what} (a relative path, no '..')")


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "spec"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(e["loc"])
            hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            msg = "unknown field" + (f"; did you mean '{hint[0]}'?" if hint else "")
            msg += f" (allowed: {', '.join(allowed)})"
        elif e["type"] == "literal_error" or e["type"] == "enum":
            msg = f"{msg} (got {e.get('input')!r})"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        # model-level checks already name their field ("source: ..."); field errors get their path
        parts.append(msg if loc == "spec" else f"{loc}: {msg}")
    return "invalid run spec: " + "; ".join(parts)


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = RunSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return list(model.model_fields)
