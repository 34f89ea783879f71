"""Monitoring and cost guard: alert policies (idle → stop via Pub/Sub + a stop function,
unhealthy, disk nearly full) and a Cloud Monitoring dashboard (ARCHITECTURE.md metric names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_gcp as gcp

from rlfleet.constants import GCP_LABEL_ROLE, GCP_LABEL_STACK
from rlfleet.stack_outputs import (
    METRIC_EPISODE_RETURN,
    METRIC_SERVE_ACTION_SHIFT,
    METRIC_SERVE_DRIFT_PSI,
    METRIC_SERVE_DRIFT_SCORE,
    METRIC_SERVE_ERRORS_TOTAL,
    METRIC_SERVE_LATENCY,
    METRIC_SERVE_REQUESTS_TOTAL,
    METRIC_STEPS_PER_SECOND,
    PROM_LABEL_STACK,
    SERVE_DRIFT_PSI_ALERT,
    SERVE_DRIFT_SCORE_ALERT,
)
from rlfleet_cloud.settings import ClusterSettings

from .common import labels, stack_marker, vm_name, vm_roles

STOPPER_DIR = Path(__file__).parent / "stopper"


USED = ' AND metric.label.state = "used"'
# Ray's Prometheus metrics as the Ops Agent writes them (Managed Service for Prometheus types)
PROM = 'resource.type = "prometheus_target" AND metric.type = "prometheus.googleapis.com/{}/{}"'


def _prom_filter(stack_id: str, metric: str, kind: str = "gauge") -> str:
    """A Managed Prometheus series of this stack's nodes (they label every series with the stack id:
    rlfleet_cloud.bootstrap.ops_agent_config)."""
    return PROM.format(metric, kind) + f' AND metric.label."{PROM_LABEL_STACK}" = "{stack_id}"'


def _vm_filter(stack_id: str, metric: str, role: str | None = None) -> str:
    f = (f'resource.type = "gce_instance" AND metric.type = "{metric}" '
         f'AND metadata.user_labels."{GCP_LABEL_STACK}" = "{stack_id}"')
    if role:
        f += f' AND metadata.user_labels."{GCP_LABEL_ROLE}" = "{role}"'
    return f


def stopper_condition(s: ClusterSettings, project: str, zone: str) -> str:
    """IAM condition: exactly this stack's VMs by full resource name (not a name prefix, which
    would also match the VMs of a stack named e.g. `<stack>-2`)."""
    return " || ".join(f'resource.name == "projects/{project}/zones/{zone}/instances/{vm_name(s, role)}"'
                       for role in vm_roles(s))


def dashboard_json(stack: str, stack_id: str) -> str:
    def chart(title: str, filt: str, reducer: str = "REDUCE_NONE", aligner: str = "ALIGN_MEAN",
              by: tuple[str, ...] = ()) -> dict:
        agg = {"alignmentPeriod": "60s", "perSeriesAligner": aligner, "crossSeriesReducer": reducer,
               **({"groupByFields": [f"metric.label.{b}" for b in by]} if by else {})}
        return {"title": title, "xyChart": {"dataSets": [{"timeSeriesQuery": {"timeSeriesFilter": {
            "filter": filt, "aggregation": agg}}}]}}

    def prom(metric: str, kind: str = "gauge") -> str:
        return _prom_filter(stack_id, metric, kind)

    version = ("deployment", "version")
    tiles = [
        chart("Episode return", prom(METRIC_EPISODE_RETURN)),
        chart("Env steps / s", prom(METRIC_STEPS_PER_SECOND)),
        chart("GPU utilization %", _vm_filter(stack_id, "agent.googleapis.com/gpu/utilization")),
        chart("GPU memory used", _vm_filter(stack_id, "agent.googleapis.com/gpu/memory/bytes_used")),
        chart("Node health (uptime)", _vm_filter(stack_id, "compute.googleapis.com/instance/uptime")),
        chart("Disk used %", _vm_filter(stack_id, "agent.googleapis.com/disk/percent_used") + USED),
        chart("Serving requests / s (by version)", prom(METRIC_SERVE_REQUESTS_TOTAL, "counter"), "REDUCE_SUM",
              "ALIGN_RATE", version),
        chart("Serving errors / s (by version)", prom(METRIC_SERVE_ERRORS_TOTAL, "counter"), "REDUCE_SUM",
              "ALIGN_RATE", version),
        chart("Serving latency p99 (by version)", prom(METRIC_SERVE_LATENCY, "histogram"), "REDUCE_PERCENTILE_99",
              "ALIGN_DELTA", version),
        chart("Drift: PSI per feature", prom(METRIC_SERVE_DRIFT_PSI), "REDUCE_MAX", "ALIGN_MAX", (*version, "feature")),
        chart(f"Drift: score per feature (PSI / its calibrated level; alert above {SERVE_DRIFT_SCORE_ALERT})",
              prom(METRIC_SERVE_DRIFT_SCORE), "REDUCE_MAX", "ALIGN_MAX", (*version, "feature")),
        chart(f"Drift: action shift (PSI; alert above {SERVE_DRIFT_PSI_ALERT})", prom(METRIC_SERVE_ACTION_SHIFT),
              "REDUCE_MAX", "ALIGN_MAX", version),
    ]
    return json.dumps({"displayName": f"rlfleet {stack}",
                       "gridLayout": {"columns": "2", "widgets": tiles}})


@dataclass
class MonitoringArgs:
    settings: ClusterSettings
    region: str
    project: str
    project_number: str
    bucket_name: pulumi.Input[str]
    zone: str


class ClusterMonitoring(pulumi.ComponentResource):
    dashboard_url: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:ClusterMonitoring", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        # idle alert -> Pub/Sub -> stop function (the cloud stops the VM, not the VM itself)
        topic = gcp.pubsub.Topic(f"{name}-idle", name=f"rlfleet-{s.stack}-idle", labels=labels(s), opts=child)
        gcp.pubsub.TopicIAMMember(
            f"{name}-idle-publisher", topic=topic.id, role="roles/pubsub.publisher",
            member=f"serviceAccount:service-{args.project_number}@gcp-sa-monitoring-notification.iam.gserviceaccount.com",
            opts=child)
        idle_channel = gcp.monitoring.NotificationChannel(
            f"{name}-idle-channel", display_name=f"rlfleet {s.stack} idle stop", type="pubsub",
            labels={"topic": topic.id}, user_labels=labels(s), opts=child)
        channels: list[pulumi.Input[str]] = []
        if s.alert_email:
            email = gcp.monitoring.NotificationChannel(
                f"{name}-email", display_name=f"rlfleet {s.stack} alerts", type="email",
                labels={"email_address": s.alert_email}, user_labels=labels(s), opts=child)
            channels.append(email.id)

        stopper_sa = gcp.serviceaccount.Account(f"{name}-stopper-sa", account_id=f"rlfleet-{s.stack}-stop"[:30],
                                                display_name=f"rlfleet {s.stack} idle stopper",
                                                description=stack_marker(s),
                                                opts=child)
        stop_role = gcp.projects.IAMCustomRole(
            f"{name}-stop-role", role_id=f"rlfleet_{s.stack.replace('-', '_')}_stop", project=args.project,
            title=f"rlfleet {s.stack} stop VMs", permissions=["compute.instances.get", "compute.instances.stop"],
            opts=child)
        gcp.projects.IAMMember(
            f"{name}-stop-binding", project=args.project, role=stop_role.name,
            member=pulumi.Output.concat("serviceAccount:", stopper_sa.email),
            condition={"title": "own stack only", "description": "exactly this stack's VMs",
                       "expression": stopper_condition(s, args.project, args.zone)},
            opts=child)
        source = gcp.storage.BucketObject(
            f"{name}-stopper-src", bucket=args.bucket_name, name=f"rlfleet/system/stopper-{s.stack}.zip",
            source=pulumi.AssetArchive({"main.py": pulumi.FileAsset(str(STOPPER_DIR / "main.py")),
                                        "requirements.txt": pulumi.FileAsset(str(STOPPER_DIR / "requirements.txt"))}),
            opts=child)
        gcp.cloudfunctionsv2.Function(
            f"{name}-stopper", name=f"rlfleet-{s.stack}-stopper", location=args.region,
            build_config={"runtime": "python312", "entry_point": "stop_idle",
                          "source": {"storage_source": {"bucket": args.bucket_name, "object": source.name}}},
            service_config={"max_instance_count": 1, "available_memory": "256M",
                            "service_account_email": stopper_sa.email, "ingress_settings": "ALLOW_INTERNAL_ONLY",
                            "environment_variables": {"RLFLEET_STACK": s.stack_id}},
            event_trigger={"trigger_region": args.region,
                           "event_type": "google.cloud.pubsub.topic.v1.messagePublished",
                           "pubsub_topic": topic.id, "retry_policy": "RETRY_POLICY_DO_NOT_RETRY",
                           "service_account_email": stopper_sa.email},
            labels=labels(s), opts=child)

        def policy(suffix: str, title: str, condition: dict, notify: list) -> None:
            gcp.monitoring.AlertPolicy(f"{name}-{suffix}", display_name=f"rlfleet {s.stack}: {title}", combiner="OR",
                                       conditions=[{"display_name": title, **condition}],
                                       notification_channels=notify, user_labels=labels(s),
                                       alert_strategy={"auto_close": "1800s"}, opts=child)

        def below(metric: str, threshold: float, minutes: int, role: str) -> dict:
            return {"condition_threshold": {
                "filter": _vm_filter(s.stack_id, metric, role), "comparison": "COMPARISON_LT",
                "threshold_value": threshold, "duration": f"{minutes * 60}s",
                "aggregations": [{"alignment_period": "300s", "per_series_aligner": "ALIGN_MAX"}]}}

        policy("gpu-idle-stop", f"GPU idle {s.idle_minutes} min -> stop",
               below("agent.googleapis.com/gpu/utilization", 5, s.idle_minutes, "worker"), [idle_channel.id])
        policy("head-idle-stop", f"head idle {2 * s.idle_minutes} min -> stop",
               below("compute.googleapis.com/instance/cpu/utilization", 0.05, 2 * s.idle_minutes, "head"),
               [idle_channel.id])
        policy("unhealthy", "instance unhealthy (no uptime for 10 min)", {"condition_absent": {
            "filter": _vm_filter(s.stack_id, "compute.googleapis.com/instance/uptime"), "duration": "600s",
            "aggregations": [{"alignment_period": "300s", "per_series_aligner": "ALIGN_RATE"}]}}, channels)
        policy("disk-full", f"root disk over {s.disk_alarm_percent}%", {"condition_threshold": {
            "filter": _vm_filter(s.stack_id, "agent.googleapis.com/disk/percent_used") + USED,
            "comparison": "COMPARISON_GT", "threshold_value": s.disk_alarm_percent, "duration": "300s",
            "aggregations": [{"alignment_period": "300s", "per_series_aligner": "ALIGN_MAX"}]}}, channels)

        for suffix, metric, by, threshold in (
                ("serve-drift", METRIC_SERVE_DRIFT_SCORE, ("deployment", "version", "feature"),
                 SERVE_DRIFT_SCORE_ALERT),
                ("serve-action-shift", METRIC_SERVE_ACTION_SHIFT, ("deployment", "version"), SERVE_DRIFT_PSI_ALERT)):
            policy(suffix, f"a deployment's {metric.removeprefix('ray_rlfleet_serve_')} above {threshold}",
                   {"condition_threshold": {
                       "filter": _prom_filter(s.stack_id, metric), "comparison": "COMPARISON_GT",
                       "threshold_value": threshold, "duration": "60s",
                       "aggregations": [{"alignment_period": "60s", "per_series_aligner": "ALIGN_MAX",
                                         "cross_series_reducer": "REDUCE_MAX",
                                         "group_by_fields": [f"metric.label.{b}" for b in by]}]}}, channels)

        dash = gcp.monitoring.Dashboard(f"{name}-dashboard", dashboard_json=dashboard_json(s.stack, s.stack_id),
                                        opts=child)
        self.dashboard_url = dash.id.apply(
            lambda i: f"https://console.cloud.google.com/monitoring/dashboards/custom/{i.rsplit('/', 1)[-1]}"
            f"?project={args.project}")
        self.register_outputs({"dashboard_url": self.dashboard_url, "idle_topic": topic.id})
