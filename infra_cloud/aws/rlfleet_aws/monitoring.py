"""Monitoring and cost guard: log group, alert topic, alarms (idle → stop, unhealthy, disk
nearly full) and a CloudWatch dashboard using the metric names of ARCHITECTURE.md."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from rlfleet.stack_outputs import (
    METRIC_EPISODE_RETURN,
    METRIC_SERVE_ACTION_SHIFT,
    METRIC_SERVE_DRIFT_PSI,
    METRIC_SERVE_DRIFT_SCORE,
    METRIC_SERVE_ERRORS_TOTAL,
    METRIC_SERVE_REQUESTS_TOTAL,
    METRIC_STEPS_PER_SECOND,
    SERVE_DRIFT_PSI_ALERT,
    SERVE_DRIFT_SCORE_ALERT,
)
from rlfleet_cloud.settings import ClusterSettings

from .common import tags

PERIOD = 300  # 5-minute datapoints; idle windows are whole multiples of it


@dataclass
class LogsArgs:
    settings: ClusterSettings
    key_arn: pulumi.Input[str]


class ClusterLogs(pulumi.ComponentResource):
    log_group_name: pulumi.Output[str]
    log_group_arn: pulumi.Output[str]
    topic_arn: pulumi.Output[str]

    def __init__(self, name: str, args: LogsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:ClusterLogs", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/rlfleet/{s.stack}",
                                        retention_in_days=s.log_retention_days, kms_key_id=args.key_arn,
                                        tags=tags(s, "logs"), opts=child)
        topic = aws.sns.Topic(f"{name}-alerts", name_prefix=f"rlfleet-{s.stack}-alerts-",
                              kms_master_key_id=args.key_arn, tags=tags(s, "alerts"), opts=child)
        if s.alert_email:
            aws.sns.TopicSubscription(f"{name}-alerts-email", topic=topic.arn, protocol="email",
                                      endpoint=s.alert_email, opts=child)
        self.log_group_name = group.name
        self.log_group_arn = group.arn
        self.topic_arn = topic.arn
        self.register_outputs({"log_group": group.name, "topic_arn": topic.arn})


@dataclass
class MonitoringArgs:
    settings: ClusterSettings
    region: str
    account_id: str
    head_instance_id: pulumi.Input[str]
    worker_instance_ids: list[pulumi.Input[str]]
    topic_arn: pulumi.Input[str]
    metric_namespace: str


def dashboard_body(settings: ClusterSettings, region: str, namespace: str, head_id: str,
                   worker_ids: list[str]) -> str:
    def search(metric: str, stat: str, dims: str = "run_id") -> dict:
        return {"expression": f"SEARCH('{{{namespace},{dims}}} MetricName=\"{metric}\"', '{stat}', 60)",
                "id": "e1", "label": metric}

    def widget(title: str, metrics: list, x: int, y: int) -> dict:
        return {"type": "metric", "x": x, "y": y, "width": 12, "height": 6,
                "properties": {"title": title, "region": region, "metrics": metrics, "view": "timeSeries",
                               "stat": "Average", "period": 60}}

    nodes = [head_id, *worker_ids]
    widgets = [
        widget("Episode return", [[search(METRIC_EPISODE_RETURN, "Average")]], 0, 0),
        widget("Env steps / s", [[search(METRIC_STEPS_PER_SECOND, "Average")]], 12, 0),
        widget("GPU utilization %", [["CWAgent", "nvidia_smi_utilization_gpu", "InstanceId", w] for w in worker_ids]
               or [["CWAgent", "nvidia_smi_utilization_gpu"]], 0, 6),
        widget("GPU memory utilization %",
               [["CWAgent", "nvidia_smi_utilization_memory", "InstanceId", w] for w in worker_ids]
               or [["CWAgent", "nvidia_smi_utilization_memory"]], 12, 6),
        widget("Node health (status checks failed)",
               [["AWS/EC2", "StatusCheckFailed", "InstanceId", n] for n in nodes], 0, 12),
        widget("Disk used % (/)",
               [["CWAgent", "disk_used_percent", "InstanceId", n, "path", "/", "fstype", "ext4"] for n in nodes],
               12, 12),
        # policy servers (the CloudWatch agent forwards them per deployment and version)
        widget("Serving requests / min (by version)",
               [[search(METRIC_SERVE_REQUESTS_TOTAL, "Sum", "deployment,version")]], 0, 18),
        widget("Serving errors / min (by version)",
               [[search(METRIC_SERVE_ERRORS_TOTAL, "Sum", "deployment,version")]], 12, 18),
        widget("Drift: PSI per feature",
               [[search(METRIC_SERVE_DRIFT_PSI, "Maximum", "deployment,version,feature")]], 0, 24),
        widget(f"Drift: action shift (PSI; alarm above {SERVE_DRIFT_PSI_ALERT})",
               [[search(METRIC_SERVE_ACTION_SHIFT, "Maximum", "deployment,version")]], 12, 24),
        widget(f"Drift: score per feature (PSI / its calibrated level; alarm above {SERVE_DRIFT_SCORE_ALERT})",
               [[search(METRIC_SERVE_DRIFT_SCORE, "Maximum", "deployment,version,feature")]], 0, 30),
    ]
    return json.dumps({"widgets": widgets})


def drift_query(namespace: str, metric: str, dims: str) -> str:
    """A Metrics Insights query (alarms cannot use SEARCH): the largest value of ``metric`` over
    every deployment/version(/feature) the stack's policy servers report."""
    return f'SELECT MAX("{metric}") FROM SCHEMA("{namespace}", {dims})'  # noqa: S608 - our constants, no user input


class ClusterMonitoring(pulumi.ComponentResource):
    dashboard_url: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:ClusterMonitoring", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        stop = f"arn:aws:automate:{args.region}:ec2:stop"
        reboot = f"arn:aws:swf:{args.region}:{args.account_id}:action/actions/AWS_EC2.InstanceId.Reboot/1.0"
        idle_periods = max(1, s.idle_minutes * 60 // PERIOD)

        def alarm(suffix: str, desc: str, **kw: object) -> aws.cloudwatch.MetricAlarm:
            return aws.cloudwatch.MetricAlarm(f"{name}-{suffix}", alarm_description=desc,
                                              tags=tags(s, suffix), opts=child, **kw)  # type: ignore[arg-type]

        nodes = [("head", args.head_instance_id)] + [(f"worker-{i}", w) for i, w in enumerate(args.worker_instance_ids)]
        for role, inst in nodes:
            dims = {"InstanceId": inst}
            if role == "head":
                # The head has no GPU: idle means its CPU stayed low for twice the idle window
                # (a run's driver on the head keeps it above the threshold while it works).
                alarm(f"{role}-idle-stop", f"rlfleet {s.stack}: head idle {2 * s.idle_minutes} min -> stop",
                      namespace="AWS/EC2", metric_name="CPUUtilization", dimensions=dims, statistic="Maximum",
                      period=PERIOD, evaluation_periods=2 * idle_periods, threshold=5,
                      comparison_operator="LessThanThreshold", treat_missing_data="notBreaching",
                      alarm_actions=[stop, args.topic_arn])
            else:
                alarm(f"{role}-gpu-idle-stop", f"rlfleet {s.stack}: GPU idle {s.idle_minutes} min -> stop",
                      namespace="CWAgent", metric_name="nvidia_smi_utilization_gpu", dimensions=dims,
                      statistic="Maximum", period=PERIOD, evaluation_periods=idle_periods, threshold=5,
                      comparison_operator="LessThanThreshold", treat_missing_data="notBreaching",
                      alarm_actions=[stop, args.topic_arn])
            alarm(f"{role}-unhealthy", f"rlfleet {s.stack}: {role} failed status checks -> reboot",
                  namespace="AWS/EC2", metric_name="StatusCheckFailed", dimensions=dims, statistic="Maximum",
                  period=60, evaluation_periods=3, threshold=1, comparison_operator="GreaterThanOrEqualToThreshold",
                  treat_missing_data="breaching", alarm_actions=[reboot, args.topic_arn])
            alarm(f"{role}-disk-full", f"rlfleet {s.stack}: {role} root disk over {s.disk_alarm_percent}%",
                  namespace="CWAgent", metric_name="disk_used_percent",
                  dimensions={**dims, "path": "/", "fstype": "ext4"}, statistic="Maximum", period=PERIOD,
                  evaluation_periods=1, threshold=s.disk_alarm_percent,
                  comparison_operator="GreaterThanOrEqualToThreshold", treat_missing_data="notBreaching",
                  alarm_actions=[args.topic_arn])

        # drift of any deployment on this stack (the policy servers' sliding window): a feature's
        # score (PSI / its calibrated level), the action shift's PSI
        for suffix, metric, dims, threshold in (
                ("serve-drift", METRIC_SERVE_DRIFT_SCORE, "deployment, feature, version", SERVE_DRIFT_SCORE_ALERT),
                ("serve-action-shift", METRIC_SERVE_ACTION_SHIFT, "deployment, version", SERVE_DRIFT_PSI_ALERT)):
            alarm(suffix, f"rlfleet {s.stack}: a deployment's {metric.removeprefix('ray_rlfleet_serve_')} "
                  f"above {threshold} (rlfleet drift NAME|RUN_ID shows which)",
                  metric_queries=[{"id": "q1", "expression": drift_query(args.metric_namespace, metric, dims),
                                   "period": 60, "return_data": True, "label": metric}],
                  evaluation_periods=1, threshold=threshold,
                  comparison_operator="GreaterThanThreshold", treat_missing_data="notBreaching",
                  alarm_actions=[args.topic_arn])

        dash_name = f"rlfleet-{s.stack}"
        body = pulumi.Output.all(args.head_instance_id, *args.worker_instance_ids).apply(
            lambda ids: dashboard_body(s, args.region, args.metric_namespace, ids[0], list(ids[1:])))
        aws.cloudwatch.Dashboard(f"{name}-dashboard", dashboard_name=dash_name, dashboard_body=body, opts=child)
        self.dashboard_url = pulumi.Output.from_input(
            f"https://{args.region}.console.aws.amazon.com/cloudwatch/home?region={args.region}"
            f"#dashboards:name={dash_name}")
        self.register_outputs({"dashboard_url": self.dashboard_url})
