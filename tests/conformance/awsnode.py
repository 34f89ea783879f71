"""The ``aws-node`` conformance target: throwaway Debian hosts booted from exactly the user data
the AWS Pulumi program renders (captured through tests/cloud's Pulumi mocks), run as cloud-init's
``write_files`` + ``runcmd`` would run it, with the cloud played by real local servers:

- a moto server bound to this machine's address in the cluster's subnet of the cloud LAN
  (cloudnode.py) (S3 with the SSE-KMS stack bucket holding the
  kit objects, KMS, Secrets Manager with the Ray token, STS);
- the EC2 instance metadata on the LAN's 169.254.169.254:80 (registered per node ip): IMDSv2
  tokens, instance id, local-ipv4, region, and the instance role's credentials from moto's STS;
- the hosts on the LAN's private bridge (no forwarding, no NAT) with the addresses the stack outputs
  name: the head at the mocks' private ip 10.42.1.10 and its Elastic IP 198.51.100.7 (a /32 route
  on this machine to the head over the bridge), the worker joining the head's private ip.

What stands for the AWS machine image (a DLAMI has these; minbase Debian does not): python3-venv,
the AWS CLI, a pip configuration reaching PyPI through the test proxy with the CPU torch wheel in
--find-links, and ``AWS_CONFIG_FILE`` naming an endpoint_url (the moto server) for every service.
The CloudWatch agent cannot be downloaded here: the bootstrap logs that and continues.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from onprem.throwaway import VENV_BIN

from .cloudnode import CloudHost, CloudLan, CloudNodeCluster, MetadataRequest, MetadataResponse, ensure_image, wait_tcp
from .targets import CloudNodeConformance, wait_jobs_api

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.42.1"  # the stack's subnet as the mocks give it (head private ip 10.42.1.10), a /24 of the LAN
HEAD_PRIVATE_IP = f"{SUBNET}.10"
REGION = "us-east-1"


# -- the rendered stack -----------------------------------------------------------------------

@dataclass
class Rendered:
    head_user_data: str
    worker_user_data: list[str]
    outputs: dict[str, Any]
    bucket: str
    secret_arn: str
    head_public_ip: str
    head_instance: str
    worker_instances: list[str]

    def param(self, name: str) -> str:
        """A parameter of the rendered bootstrap (e.g. STACK, RAY_VERSION, KIT_EXTRAS)."""
        script = yaml.safe_load(self.head_user_data)["write_files"][0]["content"]
        m = re.search(rf"^{name}='([^']*)'", script, re.M)
        assert m, f"no {name} parameter in the rendered user data"
        return m.group(1)

    @property
    def stack(self) -> str:
        """The stack name the bootstrap carries (its STACK parameter)."""
        return self.param("STACK")


def render_stack(worker_count: int = 1) -> Rendered:
    """Run the AWS program under tests/cloud's Pulumi mocks; return what it renders."""
    from cloud.conftest import build  # importing it sets the process's Pulumi mocks (once)

    def program() -> dict:
        from rlfleet_aws.cluster import RayGpuCluster
        from rlfleet_aws.config import load_settings

        s = load_settings()
        return RayGpuCluster(f"rlfleet-{s.stack}", s).outputs

    built = build(program, {"rlfleet-aws:admin_cidrs": '["203.0.113.0/24"]',
                            "rlfleet-aws:worker_count": str(worker_count)})
    insts = built.of("aws:ec2/instance:Instance")
    head = next(i for i in insts if i.inputs["tags"]["rlfleet:role"] == "head")
    workers = [i for i in insts if i.inputs["tags"]["rlfleet:role"] == "worker"]
    return Rendered(
        head_user_data=head.inputs["userData"],
        worker_user_data=[w.inputs["userData"] for w in workers],
        outputs=built.outputs,
        bucket=built.one("aws:s3/bucket:Bucket").state["bucket"],
        secret_arn=built.one("aws:secretsmanager/secret:Secret").state["arn"],
        head_public_ip=built.one("aws:ec2/eip:Eip").state["publicIp"],
        head_instance=str(built.outputs["head_instance"]),
        worker_instances=[str(w) for w in built.outputs.get("worker_instances") or []],
    )


# -- the cloud APIs ---------------------------------------------------------------------------

class Ec2Metadata:
    """The EC2 instance-metadata service (IMDSv2 only) for this cluster's instances, registered on
    the LAN's metadata server per node ip: session tokens, instance id, local-ipv4, region, and the
    instance role's credentials from moto's STS."""

    ROLE = "rlfleet-node"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.tokens: set[str] = set()
        self.instances: dict[str, dict[str, str]] = {}  # node ip -> {instance-id, ip}

    def __call__(self, req: MetadataRequest) -> MetadataResponse:
        if req.method == "PUT":  # IMDSv2: a session token first
            if req.path != "/latest/api/token" or not req.headers.get("x-aws-ec2-metadata-token-ttl-seconds"):
                return MetadataResponse(400)
            tok = secrets.token_urlsafe(24)
            self.tokens.add(tok)
            return MetadataResponse(200, tok)
        if req.method != "GET":
            return MetadataResponse(405)
        if req.headers.get("x-aws-ec2-metadata-token") not in self.tokens:
            return MetadataResponse(401)  # httpTokens=required: no IMDSv1
        inst = self.instances.get(req.client_ip)
        if inst is None:
            return MetadataResponse(404)
        body = self.metadata(inst, req.path.removeprefix("/latest/meta-data/").rstrip("/"))
        return MetadataResponse(200, body) if body is not None else MetadataResponse(404)

    def metadata(self, inst: dict[str, str], path: str) -> str | None:
        role = self.ROLE
        if path == "iam/security-credentials":
            return role
        if path == f"iam/security-credentials/{role}":
            import boto3

            sts = boto3.client("sts", endpoint_url=self.endpoint, region_name=REGION,
                               aws_access_key_id="testing", aws_secret_access_key="testing")
            c = sts.assume_role(RoleArn=f"arn:aws:iam::123456789012:role/{role}",
                                RoleSessionName=inst["instance-id"])["Credentials"]
            return json.dumps({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": c["AccessKeyId"],
                               "SecretAccessKey": c["SecretAccessKey"], "Token": c["SessionToken"],
                               "Expiration": c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
                               "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return {"instance-id": inst["instance-id"], "local-ipv4": inst["ip"],
                "placement/region": REGION, "placement/availability-zone": REGION + "a",
                "iam/info": json.dumps({"Code": "Success", "InstanceProfileArn":
                                        f"arn:aws:iam::123456789012:instance-profile/{role}"})}.get(path)


class Cloud:
    """moto on the cluster subnet's host address, and the EC2 metadata on the LAN's metadata server."""

    def __init__(self, workdir: Path, lan: CloudLan) -> None:
        self.workdir = workdir
        self.lan = lan
        self.moto: subprocess.Popen | None = None
        self.endpoint = ""
        self.imds: Ec2Metadata | None = None

    def start_moto(self) -> str:
        host_side = self.lan.add_subnet(SUBNET)
        with socket.socket() as s:
            s.bind((host_side, 0))
            port = s.getsockname()[1]
        log = (self.workdir / "moto.log").open("w")
        self.moto = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", host_side, "-p", str(port)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.endpoint = f"http://{host_side}:{port}"
        wait_tcp(host_side, port, 60)
        self.imds = Ec2Metadata(self.endpoint)
        return self.endpoint

    def add_instance(self, ip: str, instance_id: str) -> None:
        assert self.imds is not None and self.lan.metadata is not None
        self.imds.instances[ip] = {"instance-id": instance_id, "ip": ip}
        self.lan.metadata.register(ip, self.imds)

    def imds_requests(self, ip: str) -> list[tuple[str, str, int]]:
        assert self.lan.metadata is not None
        return self.lan.metadata.requests_from(ip)

    def stop(self) -> None:
        if self.imds is not None and self.lan.metadata is not None:
            for ip in self.imds.instances:
                self.lan.metadata.unregister(ip)
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            self.moto.wait(10)


# -- the hosts --------------------------------------------------------------------------------

IMAGE_APT = ("python3-venv",)  # what the DLAMI has and minbase lacks, with the AWS CLI
IMAGE_PIP_AWSCLI = "awscli"


def image_inputs() -> dict[str, Any]:
    """What the aws-node machine image is made of (its cache key): the DLAMI's parts minbase lacks.
    Not pip's cache: this machine's egress answers without Cache-Control, so pip's HTTP cache keeps
    nothing (measured: no /root/.cache/pip after a warm-up install); the bootstrap's pip install of
    the kit and its dependencies runs in full on every boot, as on a fresh DLAMI."""
    return {"v": 2, "apt": IMAGE_APT, "pip": [IMAGE_PIP_AWSCLI]}


def build_image(host: CloudHost) -> None:
    """The machine image: python3-venv and the AWS CLI in its own venv (a DLAMI has both)."""
    host.apt_install(*IMAGE_APT)
    host.nsexec("python3", "-m", "venv", "/usr/local/aws-cli", timeout=300)
    host.nsexec("/usr/local/aws-cli/bin/pip", "install", "-q", "--disable-pip-version-check", IMAGE_PIP_AWSCLI,
                timeout=900)
    host.nsexec("ln", "-sf", "/usr/local/aws-cli/bin/aws", "/usr/local/bin/aws")


class AwsNodeHost(CloudHost):
    """A node of the AWS stack: booted from the machine image, AWS_CONFIG_FILE naming moto."""

    def __init__(self, workdir: Path, *, lan: CloudLan, ip: str, extra_ips: tuple[str, ...] = (),
                 image: Path | None = None) -> None:
        super().__init__(workdir, lan=lan, ip=ip, extra_ips=extra_ips,
                         default_env={"AWS_CONFIG_FILE": "/etc/aws/config"}, image=image)

    def write_image_config(self, endpoint: str) -> None:
        aws = self.path("/etc/aws/config")
        aws.parent.mkdir(parents=True, exist_ok=True)
        aws.write_text(f"[default]\nregion = {REGION}\nendpoint_url = {endpoint}\n")
        aws.chmod(0o644)
        self.write_pip_conf()
        self.write_apt_conf()


# -- the cluster ------------------------------------------------------------------------------

class AwsNodeCluster(CloudNodeCluster):
    subnet = SUBNET
    head: AwsNodeHost
    workers: list[AwsNodeHost]

    @property
    def public_ip(self) -> str:
        return str(self.rendered.head_public_ip)


def _provision(cl: AwsNodeCluster, h: AwsNodeHost, user_data: str) -> None:
    t0 = time.monotonic()
    r = h.cloud_init(user_data)
    cl.timings[f"{h.ip} bootstrap"] = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"the bootstrap on {h.ip} failed ({r.returncode}): {r.stdout[-500:]} "
                           f"{r.stderr[-500:]}\n{cl.bootstrap_log(h)[-4000:]}")


def start_cluster(workdir: Path, *, workers: int = 1, log=print) -> AwsNodeCluster:
    """Render the stack, start the cloud, boot head (+ workers) and run their user data."""
    import boto3

    from rlfleet.kit import build_kit

    t_all = time.monotonic()
    rendered = render_stack(worker_count=workers)
    import rlfleet.envelope
    import rlfleet.runs
    from rlfleet_cloud.kit import kit_keys  # on sys.path once tests/cloud's harness is imported

    # the client's side of the run contract (rlfleet.envelope, .runs) is read above, with the same
    # source the kit is built from below: the work tree may change while the cluster boots
    assert rlfleet.envelope and rlfleet.runs

    t0 = time.monotonic()
    kit = build_kit(REPO)
    timings = {"render": t0 - t_all, "build_kit": time.monotonic() - t0}
    lan = CloudLan.acquire()
    cloud = Cloud(workdir, lan)
    try:
        lan.add_subnet(SUBNET)  # waits while another test session uses this subnet
        t0 = time.monotonic()
        image, built = ensure_image("aws-node", image_inputs(), build_image, lan=lan, ip=f"{SUBNET}.9",
                                    workdir=workdir, log=log)
        timings["image (built)" if built else "image (cached)"] = time.monotonic() - t0
        head = AwsNodeHost(workdir / "head", lan=lan, ip=HEAD_PRIVATE_IP, extra_ips=(rendered.head_public_ip,),
                           image=image)
        wk = [AwsNodeHost(workdir / f"worker{i}", lan=lan, ip=f"{SUBNET}.{11 + i}", image=image)
              for i in range(workers)]
    except BaseException:
        lan.drop_subnet(SUBNET)
        lan.release()
        raise
    cl = AwsNodeCluster(workdir, rendered, cloud, lan, head, wk, timings=timings)
    try:
        t_boot = time.monotonic()
        cloud.start_moto()
        # the stack's resources the nodes use, as 'pulumi up' leaves them (names from the mocks)
        creds = {"endpoint_url": cloud.endpoint, "region_name": REGION,
                 "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        key_arn = boto3.client("kms", **creds).create_key(Description="rlfleet stack key")["KeyMetadata"]["Arn"]
        s3 = boto3.client("s3", **creds)
        s3.create_bucket(Bucket=rendered.bucket)
        for k, path in zip(kit_keys(kit), (kit.wheel, kit.constraints), strict=True):
            s3.put_object(Bucket=rendered.bucket, Key=k, Body=path.read_bytes(), ServerSideEncryption="aws:kms",
                          SSEKMSKeyId=key_arn)
        cl.token = secrets.token_urlsafe(32)
        sm = boto3.client("secretsmanager", **creds)
        sm.create_secret(Name=rendered.secret_arn.split(":secret:")[1], SecretString=cl.token, KmsKeyId=key_arn)
        assert sm.get_secret_value(SecretId=rendered.secret_arn)["SecretString"] == cl.token
        for h, iid in zip(cl.hosts, [rendered.head_instance, *rendered.worker_instances], strict=False):
            cloud.add_instance(h.ip, iid)
        for h in cl.hosts:
            t0 = time.monotonic()
            h.start(log=log)
            h.write_image_config(cloud.endpoint)
            cl.timings[f"{h.ip} boot"] = time.monotonic() - t0
        cl.timings["cloud + boot"] = time.monotonic() - t_boot
        lan.add_route(f"{rendered.head_public_ip}/32", HEAD_PRIVATE_IP)
        # the instances come up together, as 'pulumi up' launches them; a worker's Ray retries
        # joining until the head serves (its unit restarts)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(cl.hosts)) as pool:
            for fut in [pool.submit(_provision, cl, h, ud)
                        for h, ud in zip(cl.hosts, [rendered.head_user_data, *rendered.worker_user_data],
                                         strict=True)]:
                fut.result()
        cl.timings["bootstrap (parallel)"] = time.monotonic() - t0
        cl.timings["total"] = time.monotonic() - t_all
        return cl
    except BaseException:
        cl.stop()
        raise


# -- the CloudWatch agent's part, played here --------------------------------------------------

class MetricsForwarder:
    """What the CloudWatch agent does with the config the bootstrap wrote (it cannot be installed
    here): scrape each node's Ray Prometheus endpoint named in /opt/rlfleet/monitoring/prometheus.yaml,
    keep the series its relabel rule keeps, and put the EMF-declared rlfleet metrics into CloudWatch
    (moto) under the stack's namespace with the run_id dimension."""

    def __init__(self, cluster: AwsNodeCluster, namespace: str, interval: float = 5.0) -> None:
        import boto3

        self.cluster = cluster
        self.namespace = namespace
        self.interval = interval
        self.cw = boto3.client("cloudwatch", endpoint_url=cluster.cloud.endpoint, region_name=REGION,
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> MetricsForwarder:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)

    def _targets(self) -> list[tuple[str, str, list[str]]]:
        out = []
        for h in self.cluster.hosts:
            p = h.path("/opt/rlfleet/monitoring/prometheus.yaml")
            agent = h.path("/opt/rlfleet/monitoring/cwagent.json")
            if not p.exists() or not agent.exists():
                continue
            prom = yaml.safe_load(p.read_text())
            decl = json.loads(agent.read_text())["logs"]["logs_collected"]["prometheus"]["emf_processor"]
            selectors = [s for d in decl["metric_declaration"] if d["dimensions"] == [["run_id"]]
                         for s in d["metric_selectors"]]
            for sc in prom["scrape_configs"]:
                keep = sc["metric_relabel_configs"][0]["regex"]
                for t in (t for c in sc["static_configs"] for t in c["targets"]):
                    out.append((t, keep, selectors))
        return out

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self._forward_once()
            except Exception as err:  # kept for the assertion message, never silent
                self.errors.append(repr(err))

    def _forward_once(self) -> None:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        for target, keep, selectors in self._targets():
            try:
                text = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode()
            except OSError as err:
                self.errors.append(f"{target}: {err}")
                continue
            data = [{"MetricName": s.name, "Value": float(s.value),
                     "Dimensions": [{"Name": "run_id", "Value": s.labels["run_id"]}]}
                    for fam in text_string_to_metric_families(text) for s in fam.samples
                    if "run_id" in s.labels and re.match(keep, s.name)
                    and any(re.match(sel, s.name) for sel in selectors)]
            for i in range(0, len(data), 20):
                self.cw.put_metric_data(Namespace=self.namespace, MetricData=data[i:i + 20])


# -- the conformance target ----------------------------------------------------------------------

class AwsNodeConformance(CloudNodeConformance):
    forwarder: Any = None

    def release(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.cluster is not None:
            self.cluster.stop()  # idempotent: aws_node_cluster's teardown calls it again

    def monitored(self, run_id: str) -> dict[str, Any]:
        # CloudWatch (moto), where the agent's EMF processor puts the run's metrics
        import boto3

        cw = boto3.client("cloudwatch", region_name=REGION)
        got: dict[str, float] = {}
        deadline = time.monotonic() + 90
        for name in ("ray_rlfleet_episode_return", "ray_rlfleet_env_steps_total"):
            while True:
                stats = cw.get_metric_statistics(
                    Namespace=self.forwarder.namespace, MetricName=name,
                    Dimensions=[{"Name": "run_id", "Value": run_id}], Statistics=["Maximum"], Period=60,
                    StartTime=time.time() - 7200, EndTime=time.time() + 60)["Datapoints"]
                if stats:
                    got[name] = max(d["Maximum"] for d in stats)
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"CloudWatch has no {name} for run {run_id} in {self.forwarder.namespace} "
                                         f"(forwarder errors: {self.forwarder.errors[-3:]})")
                time.sleep(3)
        return {"episode_return": got["ray_rlfleet_episode_return"],
                "env_steps": got["ray_rlfleet_env_steps_total"], "labels": {"run_id": run_id}}

    @contextlib.contextmanager
    def head_down(self) -> Iterator[None]:
        head = self.cluster.head
        head.nsexec("systemctl", "stop", "rlfleet-ray", timeout=180)
        try:
            yield
        finally:
            head.nsexec("systemctl", "start", "rlfleet-ray", timeout=120)
            wait_jobs_api(self.target)
