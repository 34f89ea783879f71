"""Names shared by the cloud Pulumi programs, the SDK and the tests.

The programs in ``infra_cloud/aws`` and ``infra_cloud/gcp`` export their stack outputs under
these keys; :mod:`rlfleet.provisioners.pulumi_stack` reads them back to build a Target. This
module imports nothing but the standard library so a Pulumi program can import it cheaply.
Tag and label keys and ports are :mod:`rlfleet.constants`' (re-exported here for the programs).
"""

from __future__ import annotations

import hashlib
import re

from rlfleet.constants import (  # noqa: F401 - re-exported: the programs and tests import them from here
    AWS_TAG_MANAGED,
    AWS_TAG_STACK,
    CONTROL_PORTS,
    GCP_LABEL_MANAGED,
    GCP_LABEL_STACK,
    PORT_API_DEFAULT,
    PORT_RAY_CLIENT,
    PORT_RAY_DASHBOARD,
    PORT_RAY_GCS,
    PORT_RAY_METRICS,
    PORT_SSH,
    PROM_LABEL_STACK,
    SERVE_PORTS_DEFAULT,
    slug,
)

# -- stack output keys ------------------------------------------------------------------------
OUTPUT_RAY_ADDRESS = "ray_address"  # https://<head static ip>:<api port> (TLS, pinned CA)
OUTPUT_ARTIFACT_ROOT = "artifact_root"  # s3://<bucket>/rlfleet | gs://<bucket>/rlfleet
OUTPUT_TOKEN_SECRET = "token_secret"  # noqa: S105 - aws-secret:<arn> | gcp-secret:projects/<p>/secrets/<s>
OUTPUT_RAY_TOKEN = "ray_token"  # noqa: S105 - the token itself; always a Pulumi secret output
OUTPUT_CA_CERT_URI = "ca_cert_uri"  # object the head publishes its TLS CA certificate to
OUTPUT_DASHBOARD_URL = "dashboard_url"  # cloud console dashboard
OUTPUT_REGION = "region"
OUTPUT_HEAD_INSTANCE = "head_instance"  # instance id (aws) / name (gcp)
OUTPUT_WORKER_INSTANCES = "worker_instances"
OUTPUT_STACK_TAG = "stack_tag"  # the stack id (make_stack_id): value of rlfleet:stack / rlfleet-stack
OUTPUT_SERVE_PORTS = "serve_ports"  # deploy ports the head's TLS front (nginx) serves: Target.serve_ports

ALL_OUTPUTS = (
    OUTPUT_RAY_ADDRESS,
    OUTPUT_ARTIFACT_ROOT,
    OUTPUT_TOKEN_SECRET,
    OUTPUT_RAY_TOKEN,
    OUTPUT_CA_CERT_URI,
    OUTPUT_DASHBOARD_URL,
    OUTPUT_REGION,
    OUTPUT_HEAD_INSTANCE,
    OUTPUT_WORKER_INSTANCES,
    OUTPUT_STACK_TAG,
    OUTPUT_SERVE_PORTS,
)
REQUIRED_OUTPUTS = (OUTPUT_RAY_ADDRESS, OUTPUT_ARTIFACT_ROOT, OUTPUT_TOKEN_SECRET, OUTPUT_REGION)
SECRET_OUTPUTS = (OUTPUT_RAY_TOKEN,)

# The Ray resource the head offers once per deploy port; a deploy run on a cloud target asks for
# one, so Ray places it on the node with the TLS front and its certificate (workers have neither).
RAY_RESOURCE_SERVE_FRONT = "rlfleet_serve_front"

# -- metric names (ARCHITECTURE.md; Ray prefixes ray_) -----------------------------------------
METRIC_EPISODE_RETURN = "ray_rlfleet_episode_return"
METRIC_STEPS_PER_SECOND = "ray_rlfleet_steps_per_second"
METRIC_ENV_STEPS_TOTAL = "ray_rlfleet_env_steps_total"
METRIC_SERVE_REQUESTS_TOTAL = "ray_rlfleet_serve_requests_total"
METRIC_SERVE_ERRORS_TOTAL = "ray_rlfleet_serve_errors_total"
METRIC_SERVE_LATENCY = "ray_rlfleet_serve_latency_seconds"
METRIC_SERVE_DRIFT_PSI = "ray_rlfleet_serve_drift_psi"
METRIC_SERVE_ACTION_SHIFT = "ray_rlfleet_serve_action_shift"
METRIC_SERVE_DRIFT_SCORE = "ray_rlfleet_serve_drift_score"
# PSI over a policy server's sliding window: the floor of every feature's alert level (its level is
# calibrated at export from the run's own episodes, rlfleet_agents.drift.calibrate) and the action
# shift's alarm threshold; rlfleet_agents.drift.PSI_ALERT is this value (measured: docs/serving.md).
SERVE_DRIFT_PSI_ALERT = 0.2
# The feature drift alarm's threshold on the drift score (a feature's PSI / its alert level).
SERVE_DRIFT_SCORE_ALERT = 1.0

# Where the head publishes its CA certificate, relative to the artifact bucket.
CA_CERT_OBJECT = "rlfleet/cluster/head-ca.pem"
ARTIFACT_PREFIX = "rlfleet"


# -- stack id ---------------------------------------------------------------------------------
# The value of the rlfleet:stack tag / rlfleet-stack label. A bare stack name ("dev") is not
# unique: the same name exists in other regions, accounts and Pulumi projects, and IAM is global.
# The programs derive the id deterministically (the same inputs give the same id on every
# `pulumi up`, also after a destroy, so data kept by `down` stays findable by the next target of
# that stack) and export it as OUTPUT_STACK_TAG; teardown scans only for it.
_ID_HASH_LEN = 12
_ID_RE = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,39}}-[0-9a-f]{{{_ID_HASH_LEN}}}")


def make_stack_id(*, cloud: str, account: str, region: str, organization: str, project: str, stack: str) -> str:
    """``<stack slug>-<12 hex>``: a GCP-label-safe value, unique per (cloud, account / GCP project,
    region, Pulumi organization, Pulumi project, stack)."""
    parts = [cloud, account, region, organization, project, stack]
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:_ID_HASH_LEN]
    return f"{slug(stack, max_len=40, fallback='stack')}-{digest}"


def is_stack_id(value: str) -> bool:
    """True for an id made by make_stack_id; False for a bare stack name (stacks made before ids)."""
    return bool(_ID_RE.fullmatch(value or ""))
