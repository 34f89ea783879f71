"""infra_cloud/aws under Pulumi mocks (preview=False): every promise asserted on the resources."""

from __future__ import annotations

import copy
import json

import pulumi
import pytest

from rlfleet import stack_outputs as so

from .conftest import ACCOUNT, AWS_BASE, MOCKS, SECRET_SIG, Built, aws_program, build
from .policies import aws_violations


def test_policy_checks_pass_and_can_fail(aws: Built) -> None:
    assert aws_violations(aws.resources, aws.outputs[so.OUTPUT_STACK_TAG]) == []
    broken = copy.deepcopy(aws.resources)
    inst = next(r for r in broken if r.typ == "aws:ec2/instance:Instance")
    inst.inputs["metadataOptions"]["httpTokens"] = "optional"
    sg = next(r for r in broken if r.typ == "aws:ec2/securityGroup:SecurityGroup")
    sg.inputs["ingress"][0]["cidrBlocks"] = ["0.0.0.0/0"]
    del next(r for r in broken if r.typ == "aws:s3/bucket:Bucket").inputs["tags"]
    found = aws_violations(broken, aws.outputs[so.OUTPUT_STACK_TAG])
    assert any("IMDSv2" in v for v in found)
    assert any("world-open" in v for v in found)
    assert any("missing rlfleet tags" in v for v in found)


def test_network_ingress_only_admin_and_intra_cluster(aws: Built) -> None:
    sg = aws.one("aws:ec2/securityGroup:SecurityGroup")
    rules = sg.inputs["ingress"]
    admin = [r for r in rules if not r.get("self")]
    assert sorted((r["fromPort"], r["toPort"]) for r in admin) == [(22, 22), (8443, 8443), (8600, 8607)]
    for r in admin:  # the deploy ports (8600-8607, the head's nginx): tests/cloud/test_deploy_front.py
        assert r["cidrBlocks"] == ["203.0.113.0/24"] and r["ipv6CidrBlocks"] == ["2001:db8::/48"]
    intra = [r for r in rules if r.get("self")]
    assert len(intra) == 1 and "cidrBlocks" not in intra[0]
    assert aws.one("aws:ec2/vpc:Vpc").inputs["cidrBlock"] == "10.42.0.0/16"
    assert aws.one("aws:ec2/subnet:Subnet").inputs["mapPublicIpOnLaunch"] is False


def test_compute_imdsv2_encrypted_disks_gpu_workers(aws: Built) -> None:
    insts = aws.of("aws:ec2/instance:Instance")
    assert len(insts) == 3
    key_arn = aws.one("aws:kms/key:Key").state["arn"]
    for i in insts:
        assert i.inputs["metadataOptions"] == {"httpEndpoint": "enabled", "httpTokens": "required",
                                               "httpPutResponseHopLimit": 1, "instanceMetadataTags": "disabled"}
        root = i.inputs["rootBlockDevice"]
        assert root["encrypted"] is True and root["kmsKeyId"] == key_arn and root["volumeSize"] == 200
        assert i.inputs["ami"] == "ami-0dlami"
        assert i.inputs["instanceInitiatedShutdownBehavior"] == "stop"
        assert i.inputs["userData"].startswith("#cloud-config\n")
    workers = [i for i in insts if i.inputs["tags"]["rlfleet:role"] == "worker"]
    head = next(i for i in insts if i.inputs["tags"]["rlfleet:role"] == "head")
    assert [w.inputs["instanceType"] for w in workers] == ["g5.xlarge", "g5.xlarge"]
    assert head.inputs["instanceType"] == "m6i.xlarge"
    assert "instanceMarketOptions" not in workers[0].inputs
    ami_call = next(a for t, a in MOCKS.calls if t == "aws:ec2/getAmi:getAmi")
    assert ami_call["owners"] == ["amazon"] and "Deep Learning" in ami_call["filters"][0]["values"][0]


def test_spot_and_existing_network() -> None:
    b = build(aws_program, {**AWS_BASE, "rlfleet-aws:spot": "true", "rlfleet-aws:existing_network": "vpc-123",
                            "rlfleet-aws:existing_subnet": "subnet-456", "rlfleet-aws:worker_count": "1"})
    assert b.of("aws:ec2/vpc:Vpc") == []
    w = next(i for i in b.of("aws:ec2/instance:Instance") if i.inputs["tags"]["rlfleet:role"] == "worker")
    assert w.inputs["instanceMarketOptions"] == {"marketType": "spot", "spotOptions": {
        "instanceInterruptionBehavior": "stop", "spotInstanceType": "persistent"}}
    assert w.inputs["subnetId"] == "subnet-456"
    assert b.one("aws:ec2/securityGroup:SecurityGroup").inputs["vpcId"] == "vpc-123"


def test_storage_encrypted_private_tls_only_versioned_lifecycle(aws: Built) -> None:
    key = aws.one("aws:kms/key:Key")
    assert key.inputs["enableKeyRotation"] is True
    bucket = aws.one("aws:s3/bucket:Bucket")
    sse = aws.one("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
    d = sse.inputs["rules"][0]["applyServerSideEncryptionByDefault"]
    assert d == {"sseAlgorithm": "aws:kms", "kmsMasterKeyId": key.state["arn"]}
    pab = aws.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert all(pab[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                         "restrictPublicBuckets"))
    policy = json.loads(aws.one("aws:s3/bucketPolicy:BucketPolicy").inputs["policy"])
    st = policy["Statement"][0]
    assert st["Effect"] == "Deny" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert st["Resource"] == [bucket.state["arn"], bucket.state["arn"] + "/*"]
    assert aws.one("aws:s3/bucketVersioning:BucketVersioning").inputs["versioningConfiguration"] == {
        "status": "Enabled"}
    rules = aws.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration").inputs["rules"]
    ck = next(r for r in rules if r["id"] == "checkpoints-old-versions")
    assert ck["filter"] == {"prefix": "rlfleet/runs/"}
    assert ck["noncurrentVersionExpiration"] == {"noncurrentDays": 14}


def test_identity_policy_is_least_privilege(aws: Built) -> None:
    bucket_arn = aws.one("aws:s3/bucket:Bucket").state["arn"]
    key_arn = aws.one("aws:kms/key:Key").state["arn"]
    secret_arn = aws.one("aws:secretsmanager/secret:Secret").state["arn"]
    log_arn = aws.one("aws:cloudwatch/logGroup:LogGroup").state["arn"]
    doc = json.loads(aws.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    assert by_sid["ListOwnBucket"]["Resource"] == [bucket_arn]
    assert by_sid["ReadWriteOwnObjects"]["Resource"] == [f"{bucket_arn}/*"]
    assert by_sid["UseOwnKey"]["Resource"] == [key_arn]
    assert by_sid["ReadOwnSecret"] == {"Sid": "ReadOwnSecret", "Effect": "Allow",
                                       "Action": ["secretsmanager:GetSecretValue"], "Resource": [secret_arn]}
    assert by_sid["WriteOwnLogs"]["Resource"] == [log_arn, f"{log_arn}:*"]
    assert by_sid["WriteOwnMetrics"]["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": ["CWAgent", "rlfleet/dev"]}}
    every_resource = [r for s in doc["Statement"] if s["Effect"] == "Allow"
                      for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])]
    assert set(every_resource) <= {bucket_arn, f"{bucket_arn}/*", key_arn, secret_arn, log_arn, f"{log_arn}:*", "*"}
    assume = json.loads(aws.one("aws:iam/role:Role").inputs["assumeRolePolicy"])
    assert assume["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_secret_generated_stored_encrypted_and_output_secret(aws: Built) -> None:
    pw = aws.one("random:index/randomPassword:RandomPassword")
    assert pw.inputs["length"] >= 32
    secret = aws.one("aws:secretsmanager/secret:Secret")
    assert secret.inputs["kmsKeyId"] == aws.one("aws:kms/key:Key").state["arn"]
    version = aws.one("aws:secretsmanager/secretVersion:SecretVersion")
    # passed to the provider as a Pulumi secret (the engine encrypts it in state)
    assert version.inputs["secretString"] == {SECRET_SIG: "1b47061264138c4ac30d75fd1eb44270",
                                              "value": pw.state["result"]}
    assert aws.secret[so.OUTPUT_RAY_TOKEN] is True
    assert [k for k, v in aws.secret.items() if v] == [so.OUTPUT_RAY_TOKEN]
    # the token appears nowhere but in the secret version and the secret output
    for r in aws.resources:
        if r.typ not in ("aws:secretsmanager/secretVersion:SecretVersion",
                         "random:index/randomPassword:RandomPassword"):
            assert pw.state["result"] not in json.dumps(r.inputs, default=str), r.typ


def test_monitoring_alarms_and_dashboard(aws: Built) -> None:
    alarms = {r.name.split("rlfleet-dev-mon-")[1]: r.inputs for r in aws.of("aws:cloudwatch/metricAlarm:MetricAlarm")}
    assert set(alarms) == {f"{n}-{kind}" for n in ("head", "worker-0", "worker-1")
                           for kind in ("unhealthy", "disk-full")} | {"head-idle-stop", "worker-0-gpu-idle-stop",
                                                                      "worker-1-gpu-idle-stop",
                                                                      "serve-drift", "serve-action-shift"}
    gpu = alarms["worker-0-gpu-idle-stop"]
    assert gpu["metricName"] == "nvidia_smi_utilization_gpu" and gpu["namespace"] == "CWAgent"
    assert gpu["period"] * gpu["evaluationPeriods"] == 30 * 60
    assert "arn:aws:automate:us-east-1:ec2:stop" in gpu["alarmActions"]
    assert gpu["dimensions"] == {"InstanceId": "rlfleet-dev-workers-0-id"}
    assert alarms["head-idle-stop"]["alarmActions"][0] == "arn:aws:automate:us-east-1:ec2:stop"
    assert alarms["worker-1-unhealthy"]["metricName"] == "StatusCheckFailed"
    assert f"arn:aws:swf:us-east-1:{ACCOUNT}:action/actions/AWS_EC2.InstanceId.Reboot/1.0" in \
        alarms["worker-1-unhealthy"]["alarmActions"]
    assert alarms["head-disk-full"]["threshold"] == 90
    # drift: any deployment's feature score (PSI / its level calibrated at export: alert above 1, as the
    # server's) and action shift (PSI over the threshold the drift test measured)
    from rlfleet_agents.drift import PSI_ALERT

    topic = aws.one("aws:sns/topic:Topic").state["arn"]
    for suffix, metric, dims, thr in (
            ("serve-drift", "ray_rlfleet_serve_drift_score", "deployment, feature, version", 1.0),
            ("serve-action-shift", "ray_rlfleet_serve_action_shift", "deployment, version", PSI_ALERT)):
        a = alarms[suffix]
        assert a["threshold"] == thr and a["comparisonOperator"] == "GreaterThanThreshold"
        assert a["alarmActions"] == [topic] and a["treatMissingData"] == "notBreaching"
        (q,) = a["metricQueries"]
        assert q["expression"] == 'SELECT MAX("' + metric + '") FROM SCHEMA("rlfleet/dev", ' + dims + ")"  # noqa: S608
        assert q["returnData"] and q["period"] == 60
        assert "metricName" not in a  # a query alarm, not a single-series one
    body = json.loads(aws.one("aws:cloudwatch/dashboard:Dashboard").inputs["dashboardBody"])
    text = json.dumps(body)
    for name in ("ray_rlfleet_episode_return", "ray_rlfleet_steps_per_second", "nvidia_smi_utilization_gpu",
                 "nvidia_smi_utilization_memory", "StatusCheckFailed", "disk_used_percent",
                 "ray_rlfleet_serve_requests_total", "ray_rlfleet_serve_errors_total", "ray_rlfleet_serve_drift_psi",
                 "ray_rlfleet_serve_action_shift", "ray_rlfleet_serve_drift_score"):
        assert name in text, name
    drift_widget = next(w for w in body["widgets"] if w["properties"]["title"].startswith("Drift: PSI"))
    assert "{rlfleet/dev,deployment,version,feature}" in drift_widget["properties"]["metrics"][0][0]["expression"]
    assert aws.one("aws:cloudwatch/logGroup:LogGroup").inputs["name"] == "/rlfleet/dev"
    assert aws.outputs[so.OUTPUT_DASHBOARD_URL].endswith("#dashboards:name=rlfleet-dev")


def test_data_is_retained_and_components_are_typed(aws: Built) -> None:
    types = {r.typ for r in aws.resources if r.typ.startswith("rlfleet:")}
    assert types == {"rlfleet:aws:RayGpuCluster", "rlfleet:aws:Network", "rlfleet:aws:ClusterStorage",
                     "rlfleet:aws:ClusterLogs", "rlfleet:aws:NodeIdentity", "rlfleet:aws:RayHead",
                     "rlfleet:aws:GpuNodePool", "rlfleet:aws:ClusterMonitoring", "rlfleet:aws:KitObjects"}


def test_outputs(aws: Built) -> None:
    o = aws.outputs
    assert set(o) == set(so.ALL_OUTPUTS)
    assert o[so.OUTPUT_RAY_ADDRESS] == "https://198.51.100.7:8443"
    assert o[so.OUTPUT_ARTIFACT_ROOT] == f"s3://{aws.one('aws:s3/bucket:Bucket').state['bucket']}/rlfleet"
    assert o[so.OUTPUT_TOKEN_SECRET] == "aws-secret:" + aws.one("aws:secretsmanager/secret:Secret").state["arn"]
    assert o[so.OUTPUT_REGION] == "us-east-1"
    assert o[so.OUTPUT_CA_CERT_URI].endswith("/rlfleet/cluster/head-ca.pem")
    assert len(o[so.OUTPUT_WORKER_INSTANCES]) == 2


def test_config_errors_stop_the_program() -> None:
    with pytest.raises(pulumi.RunError, match=r"admin_cidrs: 0\.0\.0\.0/0 would open SSH"):
        build(aws_program, {**AWS_BASE, "rlfleet-aws:admin_cidrs": '["0.0.0.0/0"]'})
    with pytest.raises(pulumi.RunError, match="unknown GPU type 'z100'"):
        build(aws_program, {**AWS_BASE, "rlfleet-aws:gpu_type": "z100"})


def test_world_override_is_explicit_and_visible() -> None:
    b = build(aws_program, {**AWS_BASE, "rlfleet-aws:admin_cidrs": '["0.0.0.0/0"]',
                            "rlfleet-aws:allow_world_control_ports": "true"})
    assert any("world-open" in v for v in aws_violations(b.resources, b.outputs[so.OUTPUT_STACK_TAG]))
    assert aws_violations(b.resources, b.outputs[so.OUTPUT_STACK_TAG], allow_world=True) == []
