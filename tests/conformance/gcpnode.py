"""The ``gcp-node`` conformance target: throwaway Debian hosts started from exactly the
``startup-script`` metadata the GCP Pulumi program renders (captured through tests/cloud's Pulumi
mocks), run as the GCE guest agent runs it (a oneshot systemd service that reads the attribute from
the metadata server and executes it), with the cloud played by real local servers on the cluster's
own /24 of the cloud LAN (cloudnode.py):

- Cloud Storage: the GCS emulator (gcp-storage-emulator) bound to this machine's address in the
  subnet, holding the stack bucket with the kit objects (``rlfleet.kit.build_kit`` +
  ``rlfleet_cloud.kit.kit_keys``), the head's published CA and every run's artifacts;
- Secret Manager: no emulator exists, so :class:`SecretManager` serves the one REST call the
  bootstrap makes (``gcloud secrets versions access`` = ``GET v1/projects/P/secrets/S/versions/
  latest:access``), answering only bearer tokens the metadata server issued to this cluster's nodes;
- the GCE metadata server, registered per node ip on the LAN's 169.254.169.254:80
  (:class:`GceMetadata`): ``Metadata-Flavor: Google`` required (403 without, as GCE), instance
  attributes (the rendered metadata items, ``startup-script`` among them), network ip, project id,
  and the node service account's email and access tokens.

The subnet comes from the stack config (``subnet_cidr`` 10.43.1.0/24; the mocks give the head the
subnet's .2), so an aws-node cluster (10.42.1.0/24) and a gcp-node cluster share the LAN.

What stands for the Deep Learning VM image (minbase Debian lacks it): python3-venv (the machine
image cloudnode.ensure_image builds once and caches in CACHE_DIR), the Google Cloud CLI (this machine's
/usr/lib/google-cloud-sdk, bind-mounted read-only), ``metadata.google.internal`` in /etc/hosts,
apt and pip through the host's test proxy, and in the systemd default environment gcloud's
properties naming the local endpoints (``CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE`` /
``_SECRETMANAGER``) and STORAGE_EMULATOR_HOST, so the runs' gcsfs reach the emulator. The Ops
Agent cannot be downloaded here: the bootstrap logs that and continues; :class:`OpsAgentScraper`
plays its part (a real Prometheus on this machine's loopback scraping exactly the
``ray_prometheus`` receiver of the config the bootstrap wrote; Managed Service for Prometheus
answers the same PromQL).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .cloudnode import CloudHost, CloudLan, CloudNodeCluster, MetadataRequest, MetadataResponse, ensure_image, wait_tcp
from .targets import CloudNodeConformance, prometheus_monitored, wait_jobs_api

if TYPE_CHECKING:
    from rlfleet.kit import Kit

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.43.1"  # subnet_cidr given to the stack below: its own /24 of the cloud LAN
REGION = "us-central1"
STACK_CONFIG = {"rlfleet-gcp:admin_cidrs": '["203.0.113.0/24"]', "rlfleet-gcp:network_cidr": "10.43.0.0/16",
                "rlfleet-gcp:subnet_cidr": f"{SUBNET}.0/24"}
GCLOUD_SDK = Path("/usr/lib/google-cloud-sdk")
IMAGE_APT = ("python3-venv",)  # what the image has and minbase lacks (besides gcloud, bind-mounted)
PY = sys.executable


# -- the rendered stack -----------------------------------------------------------------------

@dataclass
class Instance:
    name: str
    role: str  # head | worker
    metadata: dict[str, str]  # the instance's metadata items, startup-script among them
    network_ip: str  # the reserved internal address, or "" (GCP picks one in the subnet)
    nat_ip: str  # the static external address, or ""


@dataclass
class Rendered:
    outputs: dict[str, Any]
    instances: list[Instance]
    project: str
    project_number: str
    bucket: str
    secret_id: str
    service_account: str
    stack: str

    @property
    def head(self) -> Instance:
        return next(i for i in self.instances if i.role == "head")

    @property
    def workers(self) -> list[Instance]:
        return [i for i in self.instances if i.role == "worker"]


def render_stack(kit: Kit, worker_count: int = 1) -> Rendered:
    """Run the GCP program under tests/cloud's Pulumi mocks; return what it renders. The program
    ships ``kit`` (what it builds itself from the checkout at 'pulumi up': given here, so the
    objects the test uploads are the ones the script names even if the working tree changes)."""
    from cloud.conftest import GCP_PROJECT, GCP_PROJECT_NUMBER, build  # sets the process's mocks (once)

    def program() -> dict:
        from rlfleet_gcp.cluster import RayGpuCluster
        from rlfleet_gcp.config import load_settings

        s = load_settings()
        return RayGpuCluster(f"rlfleet-{s.stack}", s, region=REGION, kit=kit).outputs

    built = build(program, {**STACK_CONFIG, "rlfleet-gcp:worker_count": str(worker_count)})
    insts = []
    for vm in built.of("gcp:compute/instance:Instance"):
        nic = vm.inputs["networkInterfaces"][0]
        insts.append(Instance(name=vm.inputs["name"], role=vm.inputs["labels"]["rlfleet-role"],
                              metadata=dict(vm.inputs["metadata"]), network_ip=nic.get("networkIp", ""),
                              nat_ip=(nic.get("accessConfigs") or [{}])[0].get("natIp", "")))
    secret = built.one("gcp:secretmanager/secret:Secret")
    return Rendered(
        outputs=built.outputs, instances=insts, project=GCP_PROJECT, project_number=GCP_PROJECT_NUMBER,
        bucket=built.one("gcp:storage/bucket:Bucket").state["name"], secret_id=secret.inputs["secretId"],
        service_account=built.of("gcp:compute/instance:Instance")[0].inputs["serviceAccount"]["email"],
        stack=re.search(r"^STACK='([^']*)'", insts[0].metadata["startup-script"], re.M).group(1),  # type: ignore[union-attr]
    )


# -- the cloud APIs ---------------------------------------------------------------------------

# gcloud uploads small objects as multipart and the emulator cannot parse gcloud's multipart body;
# resumable uploads work, but gcloud sends them to /resumable/upload/storage/v1/..., a path the
# emulator does not route. The image sets storage/resumable_threshold=0, and the emulator gets
# that path as an alias of its /upload/storage/v1 route (same handlers).
_EMULATOR = """
import sys
import gcp_storage_emulator.server as s
from gcp_storage_emulator.handlers import objects
s.HANDLERS = ((r"^/resumable/upload/storage/v1/b/(?P<bucket_name>[-.\\w]+)/o$",
               {s.POST: objects.insert, s.PUT: objects.upload_partial}), *s.HANDLERS)
s.create_server(sys.argv[1], int(sys.argv[2]), in_memory=True).run()
"""


class GceMetadata:
    """The GCE metadata server of this cluster's instances (registered per node ip)."""

    def __init__(self, rendered: Rendered) -> None:
        self.rendered = rendered
        self.instances: dict[str, Instance] = {}  # node ip -> instance
        self.tokens: dict[str, str] = {}  # access token -> node ip it was issued to
        self.lock = threading.Lock()

    def __call__(self, req: MetadataRequest) -> MetadataResponse:
        if req.method != "GET":
            return MetadataResponse(405)
        if req.headers.get("metadata-flavor") != "Google" or "x-forwarded-for" in req.headers:
            return MetadataResponse(403, "Missing required header: Metadata-Flavor: Google")
        inst = self.instances.get(req.client_ip)
        if inst is None:
            return MetadataResponse(404)
        path, _, query = req.path.partition("?")
        body = self.lookup(req.client_ip, inst, path.removeprefix("/computeMetadata/v1"), query)
        if body is None:
            return MetadataResponse(404, "not found", {"Metadata-Flavor": "Google"})
        ctype = "application/json" if body.startswith("{") else "application/text"
        return MetadataResponse(200, body, {"Metadata-Flavor": "Google", "Content-Type": ctype})

    def lookup(self, ip: str, inst: Instance, path: str, query: str) -> str | None:
        r = self.rendered
        sa = r.service_account
        if path in ("", "/"):
            return "instance/\nproject/\n"
        if path == "/instance/attributes/":
            return "".join(f"{k}\n" for k in inst.metadata)
        if path.startswith("/instance/attributes/"):
            return inst.metadata.get(path.removeprefix("/instance/attributes/"))
        m = re.fullmatch(r"/instance/service-accounts/(default|[^/]+)(/.*)?", path)
        if m and m.group(1) in ("default", sa):
            rest = (m.group(2) or "/").rstrip("/")
            if rest == "" and "recursive=true" in query:
                return json.dumps({"aliases": ["default"], "email": sa,
                                   "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})
            if rest == "/token":
                tok = "ya29.test-" + secrets.token_urlsafe(24)
                with self.lock:
                    self.tokens[tok] = ip
                return json.dumps({"access_token": tok, "expires_in": 3599, "token_type": "Bearer"})
            return {"/email": sa, "/scopes": "https://www.googleapis.com/auth/cloud-platform",
                    "": "aliases\nemail\nscopes\ntoken\n"}.get(rest)
        return {"/instance/service-accounts/": f"default/\n{sa}/\n",
                "/instance/network-interfaces/0/ip": ip,
                "/instance/name": inst.name, "/instance/hostname": f"{inst.name}.{REGION}-a.c.{r.project}.internal",
                "/instance/id": str(abs(hash(inst.name)) % 10**18),
                "/instance/zone": f"projects/{r.project_number}/zones/{REGION}-a",
                "/project/project-id": r.project, "/project/numeric-project-id": r.project_number,
                "/universe/universe-domain": "googleapis.com"}.get(path)


class SecretManager:
    """Secret Manager's ``versions/*:access`` REST call (no emulator exists for it): the stack's
    secret, readable only with an access token the metadata server issued to a node of the cluster
    (the node service account holds secretAccessor on it)."""

    def __init__(self, host: str, metadata: GceMetadata, secrets_: dict[str, str]) -> None:
        self.secrets = secrets_  # "projects/<project>/secrets/<id>" -> value
        self.requests: list[tuple[str, str, int]] = []  # (client ip, path, status)
        sm = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                auth = self.headers.get("Authorization", "")
                m = re.fullmatch(r"/v1/(projects/[^/]+/secrets/[^/]+)/versions/(latest|1):access", path)
                if not auth.startswith("Bearer ") or auth[7:] not in metadata.tokens:
                    status, body = 401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}}
                elif m is None or m.group(1) not in sm.secrets:
                    status, body = 404, {"error": {"code": 404, "status": "NOT_FOUND"}}
                else:
                    status = 200
                    body = {"name": f"{m.group(1)}/versions/1",
                            "payload": {"data": base64.b64encode(sm.secrets[m.group(1)].encode()).decode()}}
                sm.requests.append((self.client_address[0], path, status))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer((host, 0), _Handler)
        self.endpoint = f"http://{host}:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Cloud:
    """The GCS emulator and Secret Manager on the subnet's host address, the GCE metadata on the
    LAN's metadata server."""

    def __init__(self, workdir: Path, lan: CloudLan, rendered: Rendered) -> None:
        self.workdir = workdir
        self.lan = lan
        self.host = lan.add_subnet(SUBNET)
        self.metadata = GceMetadata(rendered)
        self.emulator: subprocess.Popen | None = None
        self.storage_endpoint = ""
        self.secret_manager: SecretManager | None = None

    def start(self, token: str, secret_name: str) -> None:
        with socket.socket() as s:
            s.bind((self.host, 0))
            port = s.getsockname()[1]
        log = (self.workdir / "gcs-emulator.log").open("w")
        self.emulator = subprocess.Popen([PY, "-c", _EMULATOR, self.host, str(port)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.storage_endpoint = f"http://{self.host}:{port}"
        wait_tcp(self.host, port, 60)
        self.secret_manager = SecretManager(self.host, self.metadata, {secret_name: token})

    def storage_client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=self.metadata.rendered.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.storage_endpoint})

    def add_instance(self, ip: str, inst: Instance) -> None:
        assert self.lan.metadata is not None
        self.metadata.instances[ip] = inst
        self.lan.metadata.register(ip, self.metadata)

    def metadata_requests(self, ip: str) -> list[tuple[str, str, int]]:
        assert self.lan.metadata is not None
        return self.lan.metadata.requests_from(ip)

    def stop(self) -> None:
        if self.lan.metadata is not None:
            for ip in self.metadata.instances:
                self.lan.metadata.unregister(ip)
        if self.secret_manager is not None:
            self.secret_manager.stop()
        if self.emulator is not None and self.emulator.poll() is None:
            self.emulator.terminate()
            self.emulator.wait(10)


# -- the hosts --------------------------------------------------------------------------------

class GcpNodeHost(CloudHost):
    """A node of the GCP stack, with what the Deep Learning VM image has and minbase lacks."""

    binds_ro = (str(GCLOUD_SDK),)

    def __init__(self, workdir: Path, *, lan: CloudLan, ip: str, image: Path, storage_endpoint: str,
                 secretmanager_endpoint: str, extra_ips: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, lan=lan, ip=ip, extra_ips=extra_ips, image=image, default_env={
            # the runs' gcsfs (and google-cloud-storage) reach the emulator
            "STORAGE_EMULATOR_HOST": storage_endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # gcloud's own properties, as environment (the SDK is mounted read-only): the local
            # endpoints, and resumable uploads (see _EMULATOR)
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": storage_endpoint + "/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER": secretmanager_endpoint,
            "CLOUDSDK_STORAGE_RESUMABLE_THRESHOLD": "0", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"})

    def _prepare_root(self) -> None:
        super()._prepare_root()
        with (self.root / "etc/hosts").open("a") as f:  # as on every GCE image
            f.write("169.254.169.254 metadata.google.internal metadata\n")
        # the Google Cloud CLI: this machine's installation, bind-mounted read-only (binds_ro)
        (self.root / "usr/bin/gcloud").symlink_to("../lib/google-cloud-sdk/bin/gcloud")

    def write_image_config(self) -> None:
        self.write_pip_conf()
        self.write_apt_conf()  # the bootstrap installs nginx on the head

def image_inputs() -> dict[str, Any]:
    """What the gcp-node machine image is made of (its cache key in cloudnode.ensure_image)."""
    return {"v": 1, "apt": IMAGE_APT}


def build_image(host: CloudHost) -> None:
    host.apt_install(*IMAGE_APT)


# The GCE guest agent's part: google-startup-scripts.service runs google_metadata_script_runner,
# which reads the startup-script attribute from the metadata server and executes it.
GUEST_AGENT = """#!/bin/sh
set -e
install -d -m 0700 /var/lib/google
curl -fsS -H 'Metadata-Flavor: Google' -o /var/lib/google/startup-script \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/startup-script
chmod 0700 /var/lib/google/startup-script
exec /var/lib/google/startup-script
"""


# -- the cluster ------------------------------------------------------------------------------

class GcpNodeCluster(CloudNodeCluster):
    subnet = SUBNET
    head: GcpNodeHost
    workers: list[GcpNodeHost]

    @property
    def public_ip(self) -> str:
        return str(self.rendered.head.nat_ip)


def _provision(cl: GcpNodeCluster, h: GcpNodeHost) -> None:
    t0 = time.monotonic()
    r = h.run_as_cloud_final(GUEST_AGENT, unit="google-startup-scripts")
    cl.timings[f"{h.ip} startup-script"] = round(time.monotonic() - t0, 1)
    if r.returncode != 0:
        raise RuntimeError(f"the startup script on {h.ip} failed ({r.returncode}): {r.stdout[-500:]} "
                           f"{r.stderr[-500:]}\n{cl.bootstrap_log(h)[-4000:]}")


def start_cluster(workdir: Path, *, workers: int = 1, log=print) -> GcpNodeCluster:
    """Render the stack, start the cloud, boot head (+ workers) and run their startup scripts."""
    from rlfleet.kit import build_kit

    if not (GCLOUD_SDK / "bin/gcloud").exists():
        raise RuntimeError(f"the gcp-node image copies the Google Cloud CLI from {GCLOUD_SDK}; install "
                           "google-cloud-cli on this machine (apt) first")
    t_all = time.monotonic()
    kit = build_kit(REPO)
    rendered = render_stack(kit, worker_count=workers)
    from rlfleet_cloud.kit import kit_keys  # on sys.path once tests/cloud's harness is imported

    timings = {"render": round(time.monotonic() - t_all, 1)}
    head_ip = rendered.head.network_ip
    assert head_ip.startswith(SUBNET + "."), f"the mocks gave the head {head_ip}, outside {SUBNET}.0/24"
    lan = CloudLan.acquire()
    cloud = Cloud(workdir, lan, rendered)  # adds the subnet: waits while another session uses it
    try:
        t0 = time.monotonic()
        timings["subnet wait"] = round(t0 - t_all - timings["render"], 1)
        image, built = ensure_image("gcp-node", image_inputs(), build_image, lan=lan, ip=f"{SUBNET}.9",
                                    workdir=workdir, log=log)
        timings["image (built)" if built else "image (cached)"] = round(time.monotonic() - t0, 1)
        token = secrets.token_urlsafe(32)
        cloud.start(token, f"projects/{rendered.project}/secrets/{rendered.secret_id}")
        assert cloud.secret_manager is not None
        node = {"image": image, "storage_endpoint": cloud.storage_endpoint,
                "secretmanager_endpoint": cloud.secret_manager.endpoint}
        head = GcpNodeHost(workdir / "head", lan=lan, ip=head_ip, extra_ips=(rendered.head.nat_ip,), **node)
        wk = [GcpNodeHost(workdir / f"worker{i}", lan=lan, ip=f"{SUBNET}.{3 + i}", **node) for i in range(workers)]
    except BaseException:
        cloud.stop()
        lan.drop_subnet(SUBNET)
        lan.release()
        raise
    cl = GcpNodeCluster(workdir, rendered, cloud, lan, head, wk, timings=timings, token=token)
    try:
        # the stack's bucket and kit objects, as 'pulumi up' leaves them (names from the mocks)
        bucket = cloud.storage_client().create_bucket(rendered.bucket)
        for key, path in zip(kit_keys(kit), (kit.wheel, kit.constraints), strict=True):
            bucket.blob(key).upload_from_filename(str(path))
        for h, inst in zip(cl.hosts, [rendered.head, *rendered.workers], strict=True):
            cloud.add_instance(h.ip, inst)
        for h in cl.hosts:
            t0 = time.monotonic()
            h.start(log=log)
            h.write_image_config()
            cl.timings[f"{h.ip} boot"] = round(time.monotonic() - t0, 1)
        lan.add_route(f"{rendered.head.nat_ip}/32", head_ip)
        # the instances start together, as 'pulumi up' creates them; a worker's Ray retries
        # joining until the head serves (its unit restarts)
        with concurrent.futures.ThreadPoolExecutor(len(cl.hosts)) as pool:
            for fut in [pool.submit(_provision, cl, h) for h in cl.hosts]:
                fut.result()
        cl.timings["total"] = round(time.monotonic() - t_all, 1)
        return cl
    except BaseException:
        cl.stop()
        raise


# -- the Ops Agent's part, played here ----------------------------------------------------------

class OpsAgentScraper:
    """What the Ops Agent does with the config the bootstrap wrote (it cannot be installed here):
    its ``ray_prometheus`` receiver is a Prometheus scrape config; a real Prometheus on this
    machine's loopback runs exactly those scrape configs (targets: the nodes' Ray metrics endpoints
    over the LAN), and answers PromQL as Managed Service for Prometheus would."""

    def __init__(self, cluster: GcpNodeCluster) -> None:
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="rlfleet-gcp-prom-"))
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def config(self) -> dict[str, Any]:
        scrape: list[dict[str, Any]] = []
        interval = "15s"
        for h in self.cluster.hosts:
            p = h.path("/etc/google-cloud-ops-agent/config.yaml")
            assert p.exists(), f"the bootstrap wrote no Ops Agent config on {h.ip}"
            rec = yaml.safe_load(p.read_text())["metrics"]["receivers"]["ray_prometheus"]
            assert rec["type"] == "prometheus"
            interval = rec["config"]["global"]["scrape_interval"]
            for sc in rec["config"]["scrape_configs"]:
                scrape.append({**sc, "job_name": f"{sc['job_name']}-{h.ip}"})
        return {"global": {"scrape_interval": interval}, "scrape_configs": scrape}

    def start(self) -> OpsAgentScraper:
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = (self.dir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_tcp("127.0.0.1", port, 60)
        return self

    def query(self, promql: str) -> list[dict[str, Any]]:
        q = urllib.parse.quote(promql, safe="")
        with urllib.request.urlopen(f"{self.url}/api/v1/query?query={q}", timeout=10) as r:  # noqa: S310 - http on loopback
            return list(json.loads(r.read())["data"]["result"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the conformance target ----------------------------------------------------------------------

class GcpNodeConformance(CloudNodeConformance):
    monitoring: Any = None

    def monitored(self, run_id: str) -> dict[str, Any]:
        return prometheus_monitored(self.monitoring.query, run_id, "the Ops Agent's Prometheus")

    def release(self) -> None:
        """The session moved on to the next target: the hosts go (idempotent)."""
        self.monitoring.stop()
        self.cluster.stop()

    @contextlib.contextmanager
    def head_down(self) -> Iterator[None]:
        head = self.cluster.head
        head.nsexec("systemctl", "stop", "rlfleet-ray", timeout=180)
        try:
            yield
        finally:
            head.nsexec("systemctl", "start", "rlfleet-ray", timeout=120)
            wait_jobs_api(self.target)
