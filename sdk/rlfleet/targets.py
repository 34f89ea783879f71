"""Targets: where runs go. Data, not a class per cloud.

A target is a name, a Ray address (the dashboard / Jobs API URL), where its auth token comes
from, an artifact root URI, and which provisioner owns it. Targets live in a small YAML file:
``./rlfleet.yaml`` if present (project-local), else ``$RLFLEET_CONFIG``, else
``~/.config/rlfleet/targets.yaml``. The ``local`` target needs no configuration at all.

Token sources (never the token itself in this file):
  ``file:/path/to/token``      a file readable only by its owner (mode 0600)
  ``env:VAR``                  an environment variable
  ``aws-secret:<arn or name>`` AWS Secrets Manager (needs rlfleet[aws] and AWS credentials)
  ``gcp-secret:projects/<p>/secrets/<s>`` GCP Secret Manager (needs rlfleet[gcp] and GCP credentials)
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
)

from rlfleet._yaml import yaml_problem
from rlfleet.errors import AuthError, ConfigError, TargetNotFound
from rlfleet.paths import local_token_path, read_local_state, rlfleet_home
from rlfleet.provisioners.refs import LocalRef, NoRef, ProvisionerRef, upgrade_old_mapping
from rlfleet.provisioners.registry import TargetKind, check_ref
from rlfleet.tracking import SECRET_ENV, Tracking

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_NAME_RULE = "target names are 1-63 lowercase letters, digits, '-' and '_', starting with a letter or digit"


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: TargetKind
    ray_address: str = Field(description="Ray dashboard / Jobs API URL, e.g. https://10.0.0.5:8265")
    token_source: str = Field(description="file:PATH | env:VAR | aws-secret:ID | gcp-secret:NAME")
    artifact_root: str = Field(description="fsspec URI where runs/<run_id>/ live, as the cluster sees it")
    client_artifact_root: str | None = Field(
        default=None,
        description="the same root as this machine reaches it, if different (e.g. a NAS mounted elsewhere)",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (no secrets)")
    ca_cert: str | None = Field(default=None, description="PEM file pinning the head's TLS certificate")
    provisioner: ProvisionerRef = Field(
        default=NoRef(type="none"),
        description="what owns the target (rlfleet.provisioners.refs): {type: pulumi, project_dir, stack, ...} | "
        "{type: ansible, inventory, playbook_dir, ...} | {type: local} | {type: none}; "
        "targets saved without a type (older rlfleet) are read too",
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="extra env for runs (no secrets)")
    serve_ports: tuple[int, ...] = Field(
        default=(), description="ports a deploy run may bind on its node (default: any free port)"
    )
    tracking: Tracking | None = Field(default=None, description="MLflow server the target's train runs log to")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(_NAME_RULE)
        return v

    @field_serializer("provisioner")
    def _provisioner_as_saved(self, v: Any) -> dict[str, Any]:
        return {k: v[k] for k in v.keys()}  # unset fields left out; a target nobody provisions: {}

    @model_serializer(mode="wrap")
    def _without_default_provisioner(self, handler: SerializerFunctionWrapHandler,
                                     info: SerializationInfo) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if info.exclude_defaults and isinstance(self.provisioner, NoRef):  # the default, as before
            data.pop("provisioner", None)
        return data

    @field_validator("provisioner", mode="before")
    @classmethod
    def _provisioner_old_format(cls, v: Any) -> Any:
        return upgrade_old_mapping(v)

    @field_validator("provisioner")
    @classmethod
    def _provisioner_fits_kind(cls, v: Any, info: ValidationInfo) -> Any:
        return check_ref(info.data["kind"], v) if "kind" in info.data else v

    @field_validator("env_vars")
    @classmethod
    def _env_vars(cls, v: dict[str, str]) -> dict[str, str]:
        node_owned = sorted(k for k in v if k.startswith("RLFLEET_SERVE_TLS_"))
        if node_owned:
            raise ValueError(f"{', '.join(node_owned)} is set on the node by its TLS front (ansible tls_front), "
                             "never by the submitting machine; remove it from env_vars")
        secret = sorted(k for k in v if k in SECRET_ENV)
        if secret:
            raise ValueError(f"{', '.join(secret)} is a credential and Ray shows env_vars to anyone who can list "
                             "jobs; set it in the environment of the cluster's nodes instead")
        return v

    @field_validator("token_source")
    @classmethod
    def _token_source(cls, v: str) -> str:
        scheme = v.split(":", 1)[0]
        if scheme not in ("file", "env", "aws-secret", "gcp-secret") or ":" not in v:
            raise ValueError(
                "must be file:PATH, env:VAR, aws-secret:ID or gcp-secret:NAME "
                "(the token itself never goes into the targets file)"
            )
        return v

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.strip("/"):
            raise ValueError("must be an http:// or https:// URL of the Ray dashboard, e.g. https://10.0.0.5:8443")
        return v

    @property
    def reader_artifact_root(self) -> str:
        return self.client_artifact_root or self.artifact_root

    def store(self) -> Any:
        from rlfleet.artifacts import ArtifactStore

        return ArtifactStore(self.reader_artifact_root, storage_options=self.storage_options)

    def token(self) -> str:
        return resolve_token(self.token_source, target=self.name)


def resolve_token(source: str, *, target: str = "?") -> str:
    scheme, _, ref = source.partition(":")
    if scheme == "file":
        path = Path(ref).expanduser()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise AuthError(
                f"target {target!r}: token file {path} does not exist "
                f"(for local, run 'rlfleet local up'; otherwise check the target's token_source)"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise AuthError(f"target {target!r}: token file {path} is not a regular file; check its token_source")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuthError(
                f"target {target!r}: token file {path} is readable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        token = path.read_text().strip()
    elif scheme == "env":
        token = os.environ.get(ref, "").strip()
        if not token:
            raise AuthError(f"target {target!r}: environment variable {ref} (its token source) is empty")
    elif scheme == "aws-secret":
        try:
            import boto3
        except ImportError:
            raise AuthError("aws-secret token sources need: pip install 'rlfleet[aws]'") from None
        try:
            token = boto3.client("secretsmanager").get_secret_value(SecretId=ref)["SecretString"].strip()
        except Exception as err:
            raise AuthError(f"target {target!r}: cannot read secret {ref} from AWS Secrets Manager: {err}") from None
    elif scheme == "gcp-secret":
        try:
            from google.cloud import secretmanager
        except ImportError:
            raise AuthError("gcp-secret token sources need: pip install 'rlfleet[gcp]'") from None
        try:
            name = ref if "/versions/" in ref else f"{ref}/versions/latest"
            resp = secretmanager.SecretManagerServiceClient().access_secret_version(name=name)
            token = resp.payload.data.decode().strip()
        except Exception as err:
            raise AuthError(f"target {target!r}: cannot read {ref} from GCP Secret Manager: {err}") from None
    else:
        raise AuthError(f"target {target!r}: unknown token source {source!r}")
    if not token:
        raise AuthError(f"target {target!r}: the token from {scheme}:… is empty")
    return token


# -- the targets file -------------------------------------------------------------------------


def config_path() -> Path:
    local = Path.cwd() / "rlfleet.yaml"
    if local.exists():
        return local
    env = os.environ.get("RLFLEET_CONFIG")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser()
    return base / "rlfleet" / "targets.yaml"


def _load_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"cannot read the targets file {path}: {why}") from None
    if not isinstance(data, dict) or not isinstance(data.get("targets", {}), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'targets:' mapping of name → target")
    return data


def load_targets(path: Path | None = None) -> dict[str, Target]:
    path = path or config_path()
    out: dict[str, Target] = {}
    for name, raw in (_load_raw(path).get("targets") or {}).items():
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: target {name!r} must be a mapping of fields, got {type(raw).__name__}")
        odd = [k for k in (raw or {}) if not isinstance(k, str)]
        if odd:
            raise ConfigError(f"{path}: target {name!r}: field names must be strings, got {odd[0]!r}")
        try:
            out[name] = Target(name=name, **{k: v for k, v in (raw or {}).items() if k != "name"})
        except ValidationError as err:
            raise ConfigError(f"{path}: target {name!r}: {validation_line(err)}") from None
    return out


def check_target_name(name: str) -> str:
    """A usable target name, checked before anything is written for it (token files, the targets file)."""
    if not _NAME.match(name):
        raise ConfigError(f"target name {name!r}: {_NAME_RULE}")
    return name


def validation_line(err: ValidationError) -> str:
    """The first problem of a Target validation error as ``field: what is wrong``."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    return f"{loc}: {first['msg'].removeprefix('Value error, ')}"


def save_target(target: Target, path: Path | None = None) -> Path:
    path = path or config_path()
    data = _load_raw(path)
    targets = data.setdefault("targets", {}) or {}
    targets[target.name] = target.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
    data["targets"] = targets
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def remove_target(name: str, path: Path | None = None) -> bool:
    path = path or config_path()
    data = _load_raw(path)
    targets = data.get("targets") or {}
    if name not in targets:
        return False
    del targets[name]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return True


def get_target(name: str | Target | None = None) -> Target:
    """Resolve a target by name; ``None`` or ``"local"`` is the embedded local target."""
    if isinstance(name, Target):
        return name
    name = name or os.environ.get("RLFLEET_TARGET") or "local"
    targets = load_targets()
    if name in targets:
        return targets[name]
    if name == "local":
        return local_target()
    known = ", ".join(sorted({"local", *targets})) or "local"
    raise TargetNotFound(f"no target named {name!r} (known: {known}); add one with 'rlfleet target add'")


def list_targets() -> list[Target]:
    targets = load_targets()
    if "local" not in targets:
        targets = {"local": local_target(), **targets}
    return list(targets.values())


def local_target() -> Target:
    """The embedded local target as data. It works with no config; the port comes from the running
    head's state (rlfleet.provisioners.local starts and stops that head)."""
    st = read_local_state()
    return Target(
        name="local",
        kind="local",
        ray_address=f"http://127.0.0.1:{st.get('dashboard_port', 8265)}",
        token_source=f"file:{local_token_path()}",
        artifact_root="file://" + str(rlfleet_home()),
        provisioner=LocalRef(type="local"),
        serve_ports=tuple(st.get("serve_ports", [])),
    )
