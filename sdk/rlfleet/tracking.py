"""Where a train run also logs its experiment: an MLflow tracking server named by the run spec
(``tracking: {mlflow_uri: ...}``) or by the target (the same block in the targets file); the spec's
wins. The run on the cluster does the logging (``rlfleet_agents.mlflowlog``).

Credentials never go here, nor on a command line, nor in a target's ``env_vars`` (Ray shows a job's
environment to anyone who can list jobs): MLflow reads ``MLFLOW_TRACKING_TOKEN`` (or
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``) from the environment of the cluster's
nodes (on-prem: the Ray unit's environment file; cloud: the node's bootstrap).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


class Tracking(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mlflow_uri: str | None = Field(default=None, description="MLflow tracking server, http(s)://host:port")
    mlflow_experiment: str = Field(default="rlfleet", min_length=1, max_length=500,
                                   description="MLflow experiment of the runs (created if missing)")
    log_policy: bool = Field(default=True, description="store policy.onnx as an MLflow artifact")

    @model_validator(mode="before")
    @classmethod
    def _uri(cls, data: Any) -> Any:
        # checked on the raw mapping: a field error would echo the URL (and a password in it) back
        v = data.get("mlflow_uri") if isinstance(data, dict) else None
        if not isinstance(v, str):
            return data
        parts = urlsplit(v)
        if "@" in parts.netloc or parts.query:
            raise ValueError("mlflow_uri must not carry credentials; set MLFLOW_TRACKING_TOKEN (or _USERNAME/"
                             "_PASSWORD) in the environment of the cluster's nodes instead")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"mlflow_uri must be the http(s)://host:port URL of an MLflow tracking server, "
                             f"got {v!r}")
        return {**data, "mlflow_uri": v.rstrip("/")}


def effective_tracking(spec: Tracking, target: Tracking | None) -> Tracking | None:
    """The tracking a run uses: the spec's when it names a server, else the target's, else none."""
    if spec.mlflow_uri:
        return spec
    return target if target is not None and target.mlflow_uri else None
