"""infra_cloud/gcp under Pulumi mocks (preview=False): every promise asserted on the resources."""

from __future__ import annotations

import copy
import json

import pulumi
import pytest

from rlfleet import stack_outputs as so

from .conftest import GCP_BASE, GCP_PROJECT, GCP_PROJECT_NUMBER, SECRET_SIG, Built, build, gcp_program
from .policies import gcp_violations


def test_policy_checks_pass_and_can_fail(gcp: Built) -> None:
    assert gcp_violations(gcp.resources, gcp.outputs[so.OUTPUT_STACK_TAG]) == []
    broken = copy.deepcopy(gcp.resources)
    vm = next(r for r in broken if r.typ == "gcp:compute/instance:Instance")
    vm.inputs["metadata"]["enable-oslogin"] = "FALSE"
    fw = next(r for r in broken if r.typ == "gcp:compute/firewall:Firewall" and r.name.endswith("admin"))
    fw.inputs["sourceRanges"] = ["0.0.0.0/0"]
    next(r for r in broken if r.typ == "gcp:storage/bucket:Bucket").inputs["labels"] = {}
    found = gcp_violations(broken, gcp.outputs[so.OUTPUT_STACK_TAG])
    assert any("OS Login" in v for v in found) and any("world-open" in v for v in found)
    assert any("missing rlfleet labels" in v for v in found)


def test_firewall_admin_cidrs_and_intra_cluster_only(gcp: Built) -> None:
    fws = {r.name.rsplit("-", 1)[1]: r.inputs for r in gcp.of("gcp:compute/firewall:Firewall")}
    assert set(fws) == {"admin", "intra"}
    assert fws["admin"]["sourceRanges"] == ["203.0.113.0/24"]
    assert fws["admin"]["allows"] == [{"protocol": "tcp", "ports": ["22", "8443", "8600-8607"]}]
    assert fws["intra"]["sourceTags"] == ["rlfleet-dev"] and "sourceRanges" not in fws["intra"]
    assert gcp.one("gcp:compute/network:Network").inputs["autoCreateSubnetworks"] is False
    assert gcp.one("gcp:compute/routerNat:RouterNat")


def test_vms_shielded_oslogin_cmek_gpu(gcp: Built) -> None:
    vms = {r.inputs["name"]: r.inputs for r in gcp.of("gcp:compute/instance:Instance")}
    assert set(vms) == {"rlfleet-dev-head", "rlfleet-dev-worker-0", "rlfleet-dev-worker-1"}
    key_id = gcp.one("gcp:kms/cryptoKey:CryptoKey").state["id"]
    for vm in vms.values():
        assert vm["shieldedInstanceConfig"] == {"enableSecureBoot": True, "enableVtpm": True,
                                                "enableIntegrityMonitoring": True}
        assert vm["metadata"]["enable-oslogin"] == "TRUE" and vm["metadata"]["block-project-ssh-keys"] == "TRUE"
        assert vm["bootDisk"]["kmsKeySelfLink"] == key_id
        assert vm["bootDisk"]["initializeParams"]["image"].startswith("projects/deeplearning-platform-release/")
        assert vm["scheduling"]["maxRunDuration"] == {"seconds": 12 * 3600}
        assert vm["scheduling"]["instanceTerminationAction"] == "STOP"
        assert vm["metadata"]["startup-script"].startswith("#!/bin/bash")
    w = vms["rlfleet-dev-worker-0"]
    assert w["machineType"] == "g2-standard-8"
    assert w["guestAccelerators"] == [{"type": "nvidia-l4", "count": 1}]
    assert "accessConfigs" not in w["networkInterfaces"][0]
    head = vms["rlfleet-dev-head"]
    assert "guestAccelerators" not in head
    assert head["networkInterfaces"][0]["accessConfigs"] == [{"natIp": "203.0.113.50"}]


def test_spot_workers_stop_on_preemption() -> None:
    b = build(gcp_program, {**GCP_BASE, "rlfleet-gcp:spot": "true", "rlfleet-gcp:worker_count": "1"})
    w = next(r.inputs for r in b.of("gcp:compute/instance:Instance") if r.inputs["name"].endswith("worker-0"))
    assert w["scheduling"]["provisioningModel"] == "SPOT" and w["scheduling"]["instanceTerminationAction"] == "STOP"


def test_bucket_cmek_private_versioned_lifecycle(gcp: Built) -> None:
    b = gcp.one("gcp:storage/bucket:Bucket").inputs
    assert b["encryption"] == {"defaultKmsKeyName": gcp.one("gcp:kms/cryptoKey:CryptoKey").state["id"]}
    assert b["publicAccessPrevention"] == "enforced" and b["uniformBucketLevelAccess"] is True
    assert b["versioning"] == {"enabled": True}
    actions = {r["action"]["type"]: r["condition"] for r in b["lifecycleRules"]}
    assert actions["Delete"] == {"daysSinceNoncurrentTime": 14, "withState": "ARCHIVED"}
    assert actions["SetStorageClass"]["matchesPrefixes"] == ["rlfleet/runs/"]
    grants = {r.inputs["member"] for r in gcp.of("gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember")}
    assert grants == {f"serviceAccount:service-{GCP_PROJECT_NUMBER}@gs-project-accounts.iam.gserviceaccount.com",
                      f"serviceAccount:service-{GCP_PROJECT_NUMBER}@compute-system.iam.gserviceaccount.com"}


def test_identity_scoped_to_own_bucket_secret_logs_metrics(gcp: Built) -> None:
    node_sa = next(r for r in gcp.of("gcp:serviceaccount/account:Account") if r.inputs["accountId"].endswith("node"))
    member = f"serviceAccount:{node_sa.state['email']}"
    mine = [r for r in gcp.resources if r.inputs.get("member") == member]
    got = sorted((r.typ.split("/")[-1], r.inputs["role"]) for r in mine)
    assert got == [("bucketIAMMember:BucketIAMMember", "roles/storage.objectUser"),
                   ("bucketIAMMember:BucketIAMMember", "roles/storage.objectViewer"),  # the kit, read-only
                   ("iAMMember:IAMMember", "roles/logging.logWriter"),
                   ("iAMMember:IAMMember", "roles/monitoring.metricWriter"),
                   ("secretIamMember:SecretIamMember", "roles/secretmanager.secretAccessor")]
    bucket = next(r for r in mine if r.typ.endswith("BucketIAMMember"))
    assert bucket.inputs["bucket"] == gcp.one("gcp:storage/bucket:Bucket").state["name"]
    secret = next(r for r in mine if r.typ.endswith("SecretIamMember"))
    assert secret.inputs["secretId"] == "rlfleet-dev-ray-token"
    role = gcp.one("gcp:projects/iAMCustomRole:IAMCustomRole").inputs
    assert role["permissions"] == ["compute.instances.get", "compute.instances.stop"]
    binding = next(r for r in gcp.of("gcp:projects/iAMMember:IAMMember") if "condition" in r.inputs)
    expr = binding.inputs["condition"]["expression"]  # exact names (test_stack_scope.py)
    assert '/instances/rlfleet-dev-head"' in expr and "startsWith" not in expr


def test_secret_and_outputs(gcp: Built) -> None:
    pw = gcp.one("random:index/randomPassword:RandomPassword")
    v = gcp.one("gcp:secretmanager/secretVersion:SecretVersion").inputs
    assert v["secretData"]["value"] == pw.state["result"] and SECRET_SIG in v["secretData"]
    assert [k for k, s in gcp.secret.items() if s] == [so.OUTPUT_RAY_TOKEN]
    for r in gcp.resources:
        if r.typ not in ("gcp:secretmanager/secretVersion:SecretVersion", "random:index/randomPassword:RandomPassword"):
            assert pw.state["result"] not in json.dumps(r.inputs, default=str), r.typ
    o = gcp.outputs
    assert set(o) == set(so.ALL_OUTPUTS)
    assert o[so.OUTPUT_RAY_ADDRESS] == "https://203.0.113.50:8443"
    assert o[so.OUTPUT_ARTIFACT_ROOT] == f"gs://rlfleet-dev-{GCP_PROJECT}/rlfleet"
    assert o[so.OUTPUT_TOKEN_SECRET] == f"gcp-secret:projects/{GCP_PROJECT_NUMBER}/secrets/rlfleet-dev-ray-token"
    assert o[so.OUTPUT_REGION] == "us-central1"


def test_alerts_idle_stop_function_and_dashboard(gcp: Built) -> None:
    pols = {r.name.split("rlfleet-dev-mon-")[1]: r.inputs for r in gcp.of("gcp:monitoring/alertPolicy:AlertPolicy")}
    assert set(pols) == {"gpu-idle-stop", "head-idle-stop", "unhealthy", "disk-full", "serve-drift",
                         "serve-action-shift"}
    gpu = pols["gpu-idle-stop"]["conditions"][0]["conditionThreshold"]
    assert "agent.googleapis.com/gpu/utilization" in gpu["filter"] and gpu["duration"] == "1800s"
    assert f'metadata.user_labels."rlfleet-stack" = "{gcp.outputs[so.OUTPUT_STACK_TAG]}"' in gpu["filter"]
    channel = next(r for r in gcp.of("gcp:monitoring/notificationChannel:NotificationChannel"))
    assert channel.inputs["type"] == "pubsub"
    assert pols["gpu-idle-stop"]["notificationChannels"] == [channel.state["id"]]
    fn = gcp.one("gcp:cloudfunctionsv2/function:Function").inputs
    assert fn["eventTrigger"]["pubsubTopic"] == gcp.one("gcp:pubsub/topic:Topic").state["id"]
    assert fn["serviceConfig"]["ingressSettings"] == "ALLOW_INTERNAL_ONLY"
    assert "conditionAbsent" in pols["unhealthy"]["conditions"][0]
    assert pols["disk-full"]["conditions"][0]["conditionThreshold"]["thresholdValue"] == 90
    # drift: the servers' gauges (Managed Prometheus): a feature's score (PSI / its level calibrated at
    # export) above 1, as the server's alert; the action shift's PSI over the threshold the drift test measured
    from rlfleet_agents.drift import PSI_ALERT

    for suffix, metric, by, thr in (
            ("serve-drift", "ray_rlfleet_serve_drift_score", ["deployment", "version", "feature"], 1.0),
            ("serve-action-shift", "ray_rlfleet_serve_action_shift", ["deployment", "version"], PSI_ALERT)):
        cond = pols[suffix]["conditions"][0]["conditionThreshold"]
        assert cond["filter"] == ('resource.type = "prometheus_target" AND '
                                  f'metric.type = "prometheus.googleapis.com/{metric}/gauge" AND '
                                  f'metric.label."rlfleet_stack" = "{gcp.outputs[so.OUTPUT_STACK_TAG]}"')
        assert cond["thresholdValue"] == thr and cond["comparison"] == "COMPARISON_GT"
        (agg,) = cond["aggregations"]
        assert agg["crossSeriesReducer"] == "REDUCE_MAX" and agg["groupByFields"] == [f"metric.label.{b}" for b in by]
    dash = gcp.one("gcp:monitoring/dashboard:Dashboard").inputs["dashboardJson"]
    for name in ("ray_rlfleet_episode_return", "ray_rlfleet_steps_per_second", "gpu/utilization",
                 "gpu/memory/bytes_used", "instance/uptime", "disk/percent_used",
                 "ray_rlfleet_serve_requests_total/counter", "ray_rlfleet_serve_errors_total/counter",
                 "ray_rlfleet_serve_latency_seconds/histogram", "ray_rlfleet_serve_drift_psi/gauge",
                 "ray_rlfleet_serve_action_shift/gauge", "ray_rlfleet_serve_drift_score/gauge"):
        assert name in dash, name
    tiles = {t["title"]: t for t in json.loads(dash)["gridLayout"]["widgets"]}
    for title in ("Drift: PSI per feature", "Drift: score per feature (PSI / its calibrated level; alert above 1.0)"):
        agg = tiles[title]["xyChart"]["dataSets"][0]["timeSeriesQuery"]
        assert agg["timeSeriesFilter"]["aggregation"]["groupByFields"][-1] == "metric.label.feature"


def test_typed_components(gcp: Built) -> None:
    assert {r.typ for r in gcp.resources if r.typ.startswith("rlfleet:")} == {
        "rlfleet:gcp:RayGpuCluster", "rlfleet:gcp:Network", "rlfleet:gcp:ClusterStorage", "rlfleet:gcp:NodeIdentity",
        "rlfleet:gcp:RayHead", "rlfleet:gcp:GpuNodePool", "rlfleet:gcp:ClusterMonitoring", "rlfleet:gcp:KitObjects"}


def test_config_errors_stop_the_program() -> None:
    with pytest.raises(pulumi.RunError, match="not a valid CIDR"):
        build(gcp_program, {**GCP_BASE, "rlfleet-gcp:admin_cidrs": '["10.0.0.300/32"]'})
    with pytest.raises(pulumi.RunError, match="unknown GPU type 'nvidia-z100'"):
        build(gcp_program, {**GCP_BASE, "rlfleet-gcp:gpu_type": "nvidia-z100"})


def test_service_accounts_carry_the_stack_marker_teardown_scans_for(gcp: Built) -> None:
    """Service accounts cannot carry labels; teardown's gcp.scan_stack matches this description marker."""
    sas = gcp.of("gcp:serviceaccount/account:Account")
    assert len(sas) >= 2
    for sa in sas:
        assert f"rlfleet-stack={gcp.outputs[so.OUTPUT_STACK_TAG]}" in sa.inputs["description"].split(), sa.name
