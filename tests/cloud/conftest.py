"""Pulumi unit-test harness for infra_cloud/{aws,gcp}: one set_mocks per process (a Pulumi
limitation), resources captured by the mocks, outputs resolved with preview=False so every
assertion really runs. No Pulumi CLI or cloud is involved (neither can run on this machine)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pulumi
import pytest
from pulumi.runtime.sync_await import _sync_await

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT / "infra_cloud" / "shared", ROOT / "infra_cloud" / "aws", ROOT / "infra_cloud" / "gcp", ROOT / "sdk"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

ACCOUNT = "123456789012"
GCP_PROJECT = "rlfleet-test"
GCP_PROJECT_NUMBER = "424242424242"
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker for a secret value


@dataclass
class Captured:
    typ: str
    name: str
    inputs: dict[str, Any]
    state: dict[str, Any]
    retain_on_delete: bool = False  # the resource option, as the engine would receive it


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[Captured] = []
        self.calls: list[tuple[str, dict]] = []
        self.subnets: dict[str, str] = {}  # GCP subnetwork id -> its ip_cidr_range

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        inputs = dict(args.inputs)
        name, typ = args.name, args.typ
        state: dict[str, Any] = dict(inputs)
        if typ.startswith("aws:"):
            service = typ.split(":")[1].split("/")[0]
            state.setdefault("arn", f"arn:aws:{service}:us-east-1:{ACCOUNT}:{name}")
            if typ == "aws:s3/bucket:Bucket":
                state["bucket"] = inputs.get("bucketPrefix", "b-") + "abc123"
                state["arn"] = f"arn:aws:s3:::{state['bucket']}"
            if typ == "aws:ec2/eip:Eip":
                state.update(publicIp="198.51.100.7", allocationId=f"eipalloc-{name}")
            if typ == "aws:ec2/instance:Instance":
                state.update(privateIp="10.42.1.10", publicIp="")
            if typ == "aws:kms/key:Key":
                state["keyId"] = f"key-{name}"
            if typ == "aws:cloudwatch/logGroup:LogGroup":
                state["arn"] = f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:{inputs['name']}"
            if typ == "aws:secretsmanager/secret:Secret":
                state["arn"] = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:{name}-AbCdEf"
            if typ == "aws:iam/role:Role":
                state["name"] = name
        if typ == "random:index/randomPassword:RandomPassword":
            state["result"] = "t" * int(inputs.get("length", 16))
        if typ.startswith("gcp:"):
            state.setdefault("name", inputs.get("name", name))
            state.setdefault("selfLink", f"https://www.googleapis.com/compute/v1/projects/{GCP_PROJECT}/x/{name}")
            state.setdefault("id", f"projects/{GCP_PROJECT}/x/{name}")
            if typ == "gcp:compute/subnetwork:Subnetwork":
                self.subnets[state["id"]] = inputs.get("ipCidrRange", "10.42.1.0/24")
            if typ == "gcp:compute/address:Address":
                # an internal address is the subnet's first free one (.2, as GCP gives it)
                internal = inputs.get("addressType") == "INTERNAL"
                cidr = self.subnets.get(inputs.get("subnetwork", ""), "10.42.1.0/24")
                state["address"] = cidr.rsplit(".", 1)[0] + ".2" if internal else "203.0.113.50"
            if typ == "gcp:serviceaccount/account:Account":
                state["email"] = f"{inputs['accountId']}@{GCP_PROJECT}.iam.gserviceaccount.com"
                state["member"] = f"serviceAccount:{state['email']}"
            if typ == "gcp:secretmanager/secret:Secret":
                state["name"] = f"projects/{GCP_PROJECT_NUMBER}/secrets/{inputs['secretId']}"
            if typ == "gcp:kms/cryptoKey:CryptoKey":
                state["id"] = f"projects/{GCP_PROJECT}/locations/us-central1/keyRings/r/cryptoKeys/{inputs['name']}"
            if typ == "gcp:pubsub/topic:Topic":
                state["id"] = f"projects/{GCP_PROJECT}/topics/{inputs['name']}"
            if typ == "gcp:monitoring/dashboard:Dashboard":
                state["id"] = f"projects/{GCP_PROJECT_NUMBER}/dashboards/{name}"
        self.resources.append(Captured(typ, name, inputs, state))
        return str(state.get("id") or f"{name}-id"), state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        self.calls.append((args.token, dict(args.args)))
        tok = args.token
        if tok == "aws:index/getRegion:getRegion":
            region = pulumi.runtime.get_config("aws:region") or "us-east-1"
            return {"name": region, "region": region, "id": region}
        if tok == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:user/t", "userId": "u", "id": ACCOUNT}
        if tok == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0dlami", "imageId": "ami-0dlami", "name": "Deep Learning Base OSS"}
        if tok == "gcp:compute/getImage:getImage":
            return {"selfLink": "projects/deeplearning-platform-release/global/images/dlvm-1", "name": "dlvm-1"}
        if tok == "gcp:organizations/getProject:getProject":
            return {"projectId": GCP_PROJECT, "number": GCP_PROJECT_NUMBER, "id": GCP_PROJECT}
        if tok == "gcp:storage/getProjectServiceAccount:getProjectServiceAccount":
            email = f"service-{GCP_PROJECT_NUMBER}@gs-project-accounts.iam.gserviceaccount.com"
            return {"emailAddress": email, "member": f"serviceAccount:{email}", "project": GCP_PROJECT}
        if tok == "gcp:compute/getZones:getZones":
            return {"names": ["us-central1-a", "us-central1-b"]}
        raise NotImplementedError(f"mock call {tok} not answered")


class Monitor(pulumi.runtime.mocks.MockMonitor):
    """The mock monitor, also recording each resource's retainOnDelete option (not in MockResourceArgs)."""

    retain: ClassVar[dict[tuple[str, str], bool]] = {}

    def RegisterResource(self, request):
        self.retain[(request.type, request.name)] = bool(request.retainOnDelete)
        return super().RegisterResource(request)


MOCKS = Mocks()
MONITOR = Monitor(MOCKS)
pulumi.runtime.set_mocks(MOCKS, project="rlfleet-test", stack="dev", preview=False, monitor=MONITOR)


@dataclass
class Built:
    resources: list[Captured]
    outputs: dict[str, Any]
    secret: dict[str, bool] = field(default_factory=dict)

    def of(self, typ: str) -> list[Captured]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Captured:
        found = self.of(typ)
        assert len(found) == 1, f"expected one {typ}, got {len(found)}"
        return found[0]


def build(program: Callable[[], dict[str, pulumi.Output]], config: dict[str, str]) -> Built:
    """Run a program under the mocks with this config; return captured resources and outputs."""
    MOCKS.resources = []
    pulumi.runtime.set_all_config(config)
    holder: dict[str, Any] = {}

    @pulumi.runtime.test
    def run() -> pulumi.Output:
        outs = program()
        holder["outs"] = outs
        keys = list(outs)
        return pulumi.Output.all(*[outs[k] for k in keys]).apply(
            lambda vals: holder.__setitem__("values", dict(zip(keys, vals, strict=True))))

    run()
    for r in MOCKS.resources:
        r.retain_on_delete = MONITOR.retain.get((r.typ, r.name), False)
    secret = {k: _sync_await(o.is_secret()) for k, o in holder["outs"].items()}
    return Built(list(MOCKS.resources), holder["values"], secret)


@pytest.fixture(scope="session")
def mocks() -> Mocks:
    return MOCKS


# The programs as infra_cloud/{aws,gcp}/__main__.py run them, and the base config per cloud that
# tests extend; ``aws`` / ``gcp`` build each once per test module.
AWS_BASE = {"rlfleet-aws:admin_cidrs": '["203.0.113.0/24", "2001:db8::/48"]', "rlfleet-aws:worker_count": "2"}
GCP_BASE = {"rlfleet-gcp:admin_cidrs": '["203.0.113.0/24"]', "rlfleet-gcp:worker_count": "2",
            "rlfleet-gcp:max_lifetime_hours": "12"}


def aws_program() -> dict[str, pulumi.Output]:
    from rlfleet_aws.cluster import RayGpuCluster
    from rlfleet_aws.config import load_settings

    s = load_settings()
    return RayGpuCluster(f"rlfleet-{s.stack}", s).outputs


def gcp_program() -> dict[str, pulumi.Output]:
    from rlfleet_gcp.cluster import RayGpuCluster
    from rlfleet_gcp.config import load_settings

    s = load_settings()
    return RayGpuCluster(f"rlfleet-{s.stack}", s, region="us-central1").outputs


@pytest.fixture(scope="module")
def aws() -> Built:
    return build(aws_program, AWS_BASE)


@pytest.fixture(scope="module")
def gcp() -> Built:
    return build(gcp_program, GCP_BASE)
