"""The node's side of the cloud kit delivery, for real: the install functions cut from the rendered
AWS bootstrap (not a re-implementation) run with bash and the real AWS CLI against a moto server.
The wheel of this checkout sits in a bucket encrypted with a KMS key; the node fetches it with
credentials, checks the sha256 the stack rendered into the script and pip-installs the file by path
with pip's index switched off, so nothing is resolved by name. A replaced object is refused with
one log line and nothing installed."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import boto3
import pytest

from rlfleet.kit import build_kit
from rlfleet_cloud.bootstrap import NodeParams, render_bootstrap
from rlfleet_cloud.kit import kit_keys, kit_ref
from rlfleet_cloud.settings import parse_settings

from .conftest import ROOT

pytestmark = pytest.mark.integration
FUNCTIONS = ("log", "fetch_object", "fetch_verified", "install_kit")


def shell_function(script: str, name: str) -> str:
    """One function definition, verbatim, from the rendered script (`name() {` .. `}` or `name() (` .. `)`)."""
    m = re.search(rf"^{name}\(\) ([{{(]).*?^[}})]$", script, re.M | re.S)
    assert m, f"function {name} not found in the rendered bootstrap"
    return m.group(0)


def node_script(script: str) -> str:
    """The rendered script's parameters and kit functions, run the way the bootstrap runs them."""
    params = script[script.index("CLOUD="):script.index("\nexport ") + 1]
    header = "set -euo pipefail\numask 077\n"  # as the bootstrap starts
    assert header.splitlines()[0] in script and "umask 077" in script
    export = re.search(r"^export .*$", script, re.M).group(0)
    body = "\n\n".join(shell_function(script, f) for f in FUNCTIONS)
    return f"{header}{params}{export}\n{body}\ninstall_kit \"$1\"\n"


@pytest.fixture(scope="module")
def kit():
    return build_kit(ROOT)


@pytest.fixture
def shipped(moto_server: str, monkeypatch: pytest.MonkeyPatch, kit):
    """A stack bucket of its own (no server reset needed) with the kit objects, SSE-KMS with the
    stack key, as the program uploads them; AWS credentials in the environment, as a node has."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3 = boto3.client("s3", region_name="us-east-1")
    key_arn = boto3.client("kms", region_name="us-east-1").create_key(Description="rlfleet dev")["KeyMetadata"]["Arn"]
    bucket = f"rlfleet-dev-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    for key, path in zip(kit_keys(kit), (kit.wheel, kit.constraints), strict=True):
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ServerSideEncryption="aws:kms",
                      SSEKMSKeyId=key_arn)
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key_arn
    return s3, bucket


def _aws_cli() -> str:
    aws = shutil.which("aws")
    if not aws or subprocess.run([aws, "--version"], capture_output=True, timeout=60).returncode != 0:
        pytest.fail("the AWS CLI (the nodes' downloader) is needed: pip install awscli (outside the venv) "
                    "or apt-get install awscli", pytrace=False)
    return aws


def _venv_over_the_project_env(prefix: Path) -> Path:
    """<prefix>/venv whose Python also sees this project's installed dependencies (a .pth), so the
    bootstrap's own pip command finds ray, torch... installed and needs no index; pip leaves what is
    outside the venv alone, and installs rlfleet into it."""
    subprocess.run([sys.executable, "-m", "venv", str(prefix / "venv")], check=True, timeout=120)
    site = Path(subprocess.check_output([str(prefix / "venv/bin/python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "project-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the venv's own old setuptools would shadow the project's (torch asks for >= 77)
    subprocess.run([str(prefix / "venv/bin/pip"), "uninstall", "-q", "-y", "setuptools"], check=True, timeout=120,
                   capture_output=True)
    (prefix / "venv/bin/ray").symlink_to(Path(sys.executable).parent / "ray")  # as pip would have made it
    return prefix / "venv"


def _run(script: str, prefix: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "node.sh"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull,  # no index: a lookup by name would fail
               PATH=f"{Path(_aws_cli()).parent}:/usr/local/bin:/usr/bin:/bin")
    return subprocess.run(["bash", str(path), str(prefix)], capture_output=True, text=True, timeout=600, env=env)


def _render(bucket: str, kit) -> str:
    s = parse_settings("aws", {"admin_cidrs": "203.0.113.0/24"}.get, stack="dev")
    return render_bootstrap(s, NodeParams(
        role="worker", region="us-east-1", project="", secret_ref="arn:aws:secretsmanager:us-east-1:1:secret:x",
        ca_cert_uri=f"s3://{bucket}/rlfleet/cluster/head-ca.pem", artifact_root=f"s3://{bucket}/rlfleet",
        kit=kit_ref(kit, "s3", bucket), head_private_ip="10.42.1.10", log_group="/rlfleet/dev"))


def _record(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as zf:
        rec = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        return {p: h for p, h, *_ in csv.reader(io.StringIO(zf.read(rec).decode())) if h}


@pytest.mark.slow
def test_node_fetches_verifies_and_installs_the_shipped_wheel(shipped, kit, tmp_path: Path) -> None:
    _, bucket = shipped
    prefix = tmp_path / "opt-rlfleet"
    venv = _venv_over_the_project_env(prefix)
    r = _run(node_script(_render(bucket, kit)), prefix, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"installing the kit {kit.wheel_name} (sha256 {kit.sha256})" in r.stdout
    local = prefix / "kit" / kit.wheel_name
    assert local.read_bytes() == kit.wheel.read_bytes()
    assert (prefix / "kit" / "constraints.txt").read_bytes() == kit.constraints.read_bytes()
    assert (prefix / "kit" / "installed.sha256").read_text().strip() == kit.sha256
    assert not list((prefix / "kit").glob("*.part.*"))
    # the rlfleet in the node's venv is that file, by direct reference, byte for byte
    probe = ("import importlib.metadata as m, json; d = m.distribution('rlfleet'); "
             "print(json.dumps({'v': d.version, 'at': str(d.locate_file('')), "
             "'direct': json.loads(d.read_text('direct_url.json'))}))")
    got = json.loads(subprocess.check_output([str(venv / "bin/python"), "-c", probe], text=True, cwd=tmp_path))
    assert got["v"] == kit.version and got["direct"]["url"] == f"file://{local}"
    assert got["direct"]["archive_info"]["hashes"] == {"sha256": kit.sha256}  # what pip itself installed
    site = Path(got["at"])
    assert str(site).startswith(str(venv))
    record = _record(kit.wheel)
    code = {p: h for p, h in record.items() if p.startswith(("rlfleet/", "rlfleet_agents/"))}
    for rel, digest in code.items():
        data = (site / rel).read_bytes()
        assert "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode() == digest
    # readable by the Ray user although the bootstrap runs with umask 077
    assert (site / "rlfleet" / "kit.py").stat().st_mode & 0o004 and (prefix / "kit").stat().st_mode & 0o005
    # a second boot with the same kit does nothing
    again = _run(node_script(_render(bucket, kit)), prefix, tmp_path)
    assert again.returncode == 0 and "installing the kit" not in again.stdout


def test_a_replaced_object_is_refused_and_nothing_installed(shipped, kit, tmp_path: Path) -> None:
    s3, bucket = shipped
    wheel_key = kit_keys(kit)[0]
    s3.put_object(Bucket=bucket, Key=wheel_key, Body=kit.wheel.read_bytes() + b"tampered")
    prefix = tmp_path / "opt-rlfleet"
    r = _run(node_script(_render(bucket, kit)), prefix, tmp_path)
    assert r.returncode != 0
    bad = hashlib.sha256(kit.wheel.read_bytes() + b"tampered").hexdigest()
    refusal = [ln for ln in r.stdout.splitlines() if "REFUSED" in ln]
    assert len(refusal) == 1 and f"s3://{bucket}/{wheel_key}: its sha256 {bad} is not the {kit.sha256}" in refusal[0]
    assert sorted(p.name for p in (prefix / "kit").iterdir()) == []  # no partial file, nothing installed
    assert not (prefix / "venv").exists()


def test_a_missing_object_says_so(shipped, kit, tmp_path: Path) -> None:
    s3, bucket = shipped
    s3.delete_object(Bucket=bucket, Key=kit_keys(kit)[1])
    r = _run(node_script(_render(bucket, kit)), tmp_path / "p", tmp_path)
    assert r.returncode != 0
    assert f"cannot fetch s3://{bucket}/{kit_keys(kit)[1]} with this node's identity" in r.stdout
    assert not (tmp_path / "p" / "venv").exists()
