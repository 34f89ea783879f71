"""Render the node bootstrap (a bash script) and the monitoring agent configs.

AWS receives it as cloud-init user data (``#cloud-config`` with ``write_files`` + ``runcmd``),
GCP as the ``startup-script`` metadata value (runs on every boot; the script is idempotent).
Every value is shell-quoted; the script carries references (secret ARN/name, bucket URI), never
the token itself. The kit comes from the stack's bucket (``KitRef``: object URIs and sha256): the
node fetches it with its own identity, refuses a file whose sha256 differs, and pip-installs the
wheel by path (``rlfleet[...] @ file://...``), so the name ``rlfleet`` is never looked up on an index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlfleet.stack_outputs import (
    METRIC_ENV_STEPS_TOTAL,
    METRIC_EPISODE_RETURN,
    METRIC_SERVE_ACTION_SHIFT,
    METRIC_SERVE_DRIFT_PSI,
    METRIC_SERVE_DRIFT_SCORE,
    METRIC_SERVE_ERRORS_TOTAL,
    METRIC_SERVE_REQUESTS_TOTAL,
    METRIC_STEPS_PER_SECOND,
    PORT_RAY_METRICS,
    PROM_LABEL_STACK,
    RAY_RESOURCE_SERVE_FRONT,
)

from .kit import KIT_EXTRAS, KitRef
from .settings import ClusterSettings

FILES = Path(__file__).parent / "files"
PROM_SCRAPE_INTERVAL = "15s"
# Ray state lives under the rlfleet user's home, not in world-writable /tmp.
RAY_TEMP_DIR = "/var/lib/rlfleet/ray"
RAY_LOGS = f"{RAY_TEMP_DIR}/session_latest/logs"
# Metrics the agents forward from Ray's Prometheus endpoint (ARCHITECTURE.md names, ray_ prefix).
FORWARDED_METRICS = r"^ray_rlfleet_.*|^ray_node_.*|^ray_cluster_.*"


@dataclass(frozen=True)
class NodeParams:
    role: str  # "head" | "worker"
    region: str
    project: str  # gcp project ("" on aws)
    secret_ref: str  # aws: secret ARN; gcp: secret id
    ca_cert_uri: str
    artifact_root: str
    kit: KitRef
    head_public_ip: str = ""  # head only: the static address clients use
    head_private_ip: str = ""  # workers only
    log_group: str = ""  # aws only


def _sq(value: str) -> str:
    """Single-quote a parameter; quotes and newlines are refused (no value of ours has them)."""
    if "'" in value or "\n" in value or "\r" in value:
        raise ValueError(f"bootstrap parameter {value!r} contains a quote or newline")
    return f"'{value}'"


def _read(name: str) -> str:
    return (FILES / name).read_text()


def _prometheus_scrape(node_ip: str = "__NODE_IP__", stack_id: str = "") -> dict:
    """Ray's metrics port on this node; with ``stack_id``, every series carries it as a label (the
    cloud's Prometheus backend keeps no VM labels, so alerts and charts scope a stack by it)."""
    target: dict = {"targets": [f"{node_ip}:{PORT_RAY_METRICS}"]}
    if stack_id:
        target["labels"] = {PROM_LABEL_STACK: stack_id}
    return {
        "global": {"scrape_interval": PROM_SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [target],
                "metric_relabel_configs": [
                    {"source_labels": ["__name__"], "regex": FORWARDED_METRICS, "action": "keep"}
                ],
            }
        ],
    }


def cloudwatch_agent_config(settings: ClusterSettings, log_group: str, namespace: str) -> dict:
    """CloudWatch agent: GPU (nvidia_gpu), disk and memory metrics, logs, and Ray's Prometheus."""
    return {
        "agent": {"metrics_collection_interval": 60, "run_as_user": "root"},
        "metrics": {
            "namespace": "CWAgent",
            "append_dimensions": {"InstanceId": "${aws:InstanceId}"},
            "aggregation_dimensions": [["InstanceId"]],
            "metrics_collected": {
                "nvidia_gpu": {
                    "measurement": ["utilization_gpu", "utilization_memory", "memory_used", "memory_total"]
                },
                "disk": {"measurement": ["used_percent"], "resources": ["/"], "drop_device": True},
                "mem": {"measurement": ["used_percent"]},
            },
        },
        "logs": {
            "logs_collected": {
                "files": {
                    "collect_list": [
                        {"file_path": "/var/log/rlfleet-bootstrap.log", "log_group_name": log_group,
                         "log_stream_name": "{instance_id}/bootstrap"},
                        {"file_path": f"{RAY_LOGS}/*.log", "log_group_name": log_group,
                         "log_stream_name": "{instance_id}/ray"},
                        {"file_path": f"{RAY_LOGS}/job-driver-*.log",
                         "log_group_name": log_group, "log_stream_name": "{instance_id}/jobs"},
                    ]
                },
                "prometheus": {
                    "log_group_name": log_group,
                    "prometheus_config_path": "/opt/rlfleet/monitoring/prometheus.yaml",
                    "emf_processor": {
                        "metric_namespace": namespace,
                        "metric_declaration": [
                            {"source_labels": ["job"], "label_matcher": "^ray$",
                             "dimensions": [["run_id"]],
                             "metric_selectors": [f"^{METRIC_EPISODE_RETURN}$", f"^{METRIC_STEPS_PER_SECOND}$",
                                                  f"^{METRIC_ENV_STEPS_TOTAL}$"]},
                            {"source_labels": ["job"], "label_matcher": "^ray$",
                             "dimensions": [["InstanceId"]],
                             "metric_selectors": ["^ray_node_.*"]},
                            {"source_labels": ["job"], "label_matcher": "^ray$",  # policy servers
                             "dimensions": [["deployment", "version"], ["deployment", "version", "replica"]],
                             "metric_selectors": [f"^{METRIC_SERVE_REQUESTS_TOTAL}$", f"^{METRIC_SERVE_ERRORS_TOTAL}$",
                                                  f"^{METRIC_SERVE_ACTION_SHIFT}$"]},
                            {"source_labels": ["job"], "label_matcher": "^ray$",
                             "dimensions": [["deployment", "version", "feature"]],
                             "metric_selectors": [f"^{METRIC_SERVE_DRIFT_PSI}$", f"^{METRIC_SERVE_DRIFT_SCORE}$"]},
                        ],
                    },
                },
            },
        },
    }


def ops_agent_config(stack_id: str = "") -> dict:
    """Google Ops Agent: GPU (nvml), host metrics (default), logs, and Ray's Prometheus (each series
    labelled with the stack id)."""
    return {
        "logging": {
            "receivers": {
                "rlfleet_bootstrap": {"type": "files", "include_paths": ["/var/log/rlfleet-bootstrap.log"]},
                "ray": {"type": "files", "include_paths": [f"{RAY_LOGS}/*.log"]},
            },
            "service": {"pipelines": {"rlfleet": {"receivers": ["rlfleet_bootstrap", "ray"]}}},
        },
        "metrics": {
            "receivers": {
                "ray_prometheus": {"type": "prometheus", "config": _prometheus_scrape(stack_id=stack_id)},
                "gpu": {"type": "nvml"},
            },
            "service": {"pipelines": {"rlfleet": {"receivers": ["ray_prometheus", "gpu"]}}},
        },
    }


def _monitoring_function(settings: ClusterSettings, p: NodeParams) -> str:
    if settings.cloud == "aws":
        namespace = f"rlfleet/{settings.stack}"
        agent = json.dumps(cloudwatch_agent_config(settings, p.log_group, namespace), indent=2)
        prom = json.dumps(_prometheus_scrape(), indent=2)
        return f"""setup_monitoring() {{
  local ip="$1" ctl=/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl
  if [ ! -x "$ctl" ]; then
    curl -fsSL -o /tmp/cwagent.deb \\
      https://amazoncloudwatch-agent.s3.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb
    dpkg -i -E /tmp/cwagent.deb
  fi
  install -d -m 0755 /opt/rlfleet/monitoring
  cat >/opt/rlfleet/monitoring/prometheus.yaml <<'CFGEOF'
{prom}
CFGEOF
  sed -i "s/__NODE_IP__/${{ip}}/g" /opt/rlfleet/monitoring/prometheus.yaml
  cat >/opt/rlfleet/monitoring/cwagent.json <<'CFGEOF'
{agent}
CFGEOF
  "$ctl" -a fetch-config -m ec2 -c file:/opt/rlfleet/monitoring/cwagent.json -s
}}"""
    agent = json.dumps(ops_agent_config(settings.stack_id), indent=2)  # JSON is valid YAML
    return f"""setup_monitoring() {{
  local ip="$1"
  if ! dpkg -s google-cloud-ops-agent >/dev/null 2>&1; then
    curl -fsSL -o /tmp/add-ops-agent.sh https://dl.google.com/cloudagents/add-google-cloud-ops-agent-repo.sh
    bash /tmp/add-ops-agent.sh --also-install
  fi
  install -d -m 0755 /etc/google-cloud-ops-agent
  cat >/etc/google-cloud-ops-agent/config.yaml <<'CFGEOF'
{agent}
CFGEOF
  chmod 0644 /etc/google-cloud-ops-agent/config.yaml
  sed -i "s/__NODE_IP__/${{ip}}/g" /etc/google-cloud-ops-agent/config.yaml
  systemctl restart google-cloud-ops-agent
}}"""


def render_bootstrap(settings: ClusterSettings, p: NodeParams) -> str:
    """The bash bootstrap for one node role; pure function of its inputs."""
    if p.role not in ("head", "worker"):
        raise ValueError(f"role must be head or worker, not {p.role!r}")
    params = {
        "CLOUD": settings.cloud,
        "ROLE": p.role,
        "STACK": settings.stack,
        "REGION": p.region,
        "PROJECT": p.project,
        "RAY_VERSION": settings.ray_version,
        "KIT_URI": p.kit.wheel_uri,
        "KIT_WHEEL": p.kit.wheel_name,
        "KIT_SHA256": p.kit.sha256,
        "KIT_CONSTRAINTS_URI": p.kit.constraints_uri,
        "KIT_CONSTRAINTS_SHA256": p.kit.constraints_sha256,
        "KIT_EXTRAS": KIT_EXTRAS[settings.cloud],
        "API_PORT": str(settings.api_port),
        "SERVE_PORTS": ",".join(str(x) for x in settings.serve_ports),
        "SERVE_FRONT_RESOURCE": RAY_RESOURCE_SERVE_FRONT,
        "SECRET_REF": p.secret_ref,
        "CA_CERT_URI": p.ca_cert_uri,
        "ARTIFACT_ROOT": p.artifact_root,
        "HEAD_PUBLIC_IP": p.head_public_ip,
        "HEAD_PRIVATE_IP": p.head_private_ip,
        "GPU_COUNT": str(settings.gpu_count if p.role == "worker" else 0),
        "MAX_LIFETIME_MIN": str(settings.max_lifetime_hours * 60),
    }
    lines = [f"{k}={_sq(v)}" for k, v in params.items()]
    lines.append("export " + " ".join(params))
    out = _read("bootstrap.sh")
    out = out.replace("@@PARAMS@@", "\n".join(lines))
    out = out.replace("@@GEN_HEAD_CERT@@", _read("gen_head_cert.sh").replace("# shellcheck shell=bash\n", ""))
    out = out.replace("@@SETUP_MONITORING@@", _monitoring_function(settings, p))
    assert "@@" not in out, "unrendered placeholder in bootstrap"
    return out


def aws_cloud_config(script: str) -> str:
    """Wrap the bootstrap as #cloud-config user data: written to disk (0700) and run once."""
    doc = {
        "write_files": [
            {"path": "/opt/rlfleet/bootstrap.sh", "permissions": "0700", "owner": "root:root",
             "content": script}
        ],
        "runcmd": [["/opt/rlfleet/bootstrap.sh"]],
    }
    return "#cloud-config\n" + json.dumps(doc, indent=1) + "\n"  # JSON is valid YAML
