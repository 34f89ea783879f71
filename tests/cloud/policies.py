"""Policy checks as plain functions over the resources the Pulumi mocks captured
(pulumi-policy cannot run here). Each returns a list of violations; empty means compliant."""

from __future__ import annotations

import importlib
import inspect
import json
from functools import cache
from typing import Any

from rlfleet.stack_outputs import (
    AWS_TAG_MANAGED,
    AWS_TAG_STACK,
    CONTROL_PORTS,
    GCP_LABEL_MANAGED,
    GCP_LABEL_STACK,
    SERVE_PORTS_DEFAULT,
)
from rlfleet_cloud.settings import world_open_reason


@cache
def accepts(typ: str, param: str) -> bool:
    """Does the provider's resource class for a type token take this argument (tags/labels)?"""
    pkg, mod, _ = typ.split(":")
    module_name, cls_name = mod.split("/")
    base = {"aws": "pulumi_aws", "gcp": "pulumi_gcp", "random": "pulumi_random"}.get(pkg)
    if base is None:
        return False
    module = importlib.import_module(base if module_name == "index" else f"{base}.{module_name}")
    cls = getattr(module, cls_name[0].upper() + cls_name[1:], None)
    if cls is None:
        return False
    return param in inspect.signature(cls._internal_init).parameters


def _ports(rule: dict) -> range:
    lo, hi = int(rule.get("fromPort", 0)), int(rule.get("toPort", 0))
    if rule.get("protocol") == "-1":
        return range(0, 65536)
    return range(lo, hi + 1)


def _gcp_ports(spec: str) -> range:
    """A GCP firewall port spec: "22" or a range "8600-8607"."""
    lo, _, hi = spec.partition("-")
    return range(int(lo), int(hi or lo) + 1)


# ports that must never be open to the world: Ray's control ports and the deploy ports (TLS front)
ADMIN_PORTS = (*CONTROL_PORTS, *SERVE_PORTS_DEFAULT)


def aws_violations(resources: list[Any], stack: str, *, allow_world: bool = False) -> list[str]:
    bad: list[str] = []
    for r in resources:
        i = r.inputs
        where = f"{r.typ} {r.name}"
        if r.typ.startswith("aws:") and accepts(r.typ, "tags"):
            tags = i.get("tags") or {}
            if tags.get(AWS_TAG_STACK) != stack or tags.get(AWS_TAG_MANAGED) != "true":
                bad.append(f"{where}: missing rlfleet tags")
        if r.typ == "aws:ec2/securityGroup:SecurityGroup":
            for rule in i.get("ingress", []):
                cidrs = set(rule.get("cidrBlocks", [])) | set(rule.get("ipv6CidrBlocks", []))
                world = bool(cidrs) and world_open_reason(cidrs) is not None
                if world and not allow_world and any(p in _ports(rule) for p in ADMIN_PORTS):
                    bad.append(f"{where}: world-open ingress on a control port")
                if not cidrs and not rule.get("self") and not rule.get("securityGroups"):
                    bad.append(f"{where}: ingress rule without a source")
        if r.typ == "aws:ec2/instance:Instance":
            if (i.get("metadataOptions") or {}).get("httpTokens") != "required":
                bad.append(f"{where}: IMDSv2 not required")
            root = i.get("rootBlockDevice") or {}
            if not root.get("encrypted") or not root.get("kmsKeyId"):
                bad.append(f"{where}: root disk not encrypted with the stack key")
        if r.typ == "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration":
            d = i["rules"][0]["applyServerSideEncryptionByDefault"]
            if d.get("sseAlgorithm") != "aws:kms" or not d.get("kmsMasterKeyId"):
                bad.append(f"{where}: bucket not encrypted with the stack key")
        if r.typ == "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock":
            keys = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
            if not all(i.get(k) is True for k in keys):
                bad.append(f"{where}: public access not fully blocked")
        if r.typ in ("aws:cloudwatch/logGroup:LogGroup", "aws:secretsmanager/secret:Secret") and not i.get("kmsKeyId"):
            bad.append(f"{where}: not encrypted with the stack key")
        if r.typ == "aws:sns/topic:Topic" and not i.get("kmsMasterKeyId"):
            bad.append(f"{where}: not encrypted with the stack key")
        if r.typ == "aws:iam/rolePolicy:RolePolicy":
            for st in json.loads(i["policy"])["Statement"]:
                actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
                if any(a.endswith(":*") or a == "*" for a in actions):
                    bad.append(f"{where}: wildcard action {actions}")
                if st.get("Resource") == "*" and not st.get("Condition"):
                    bad.append(f"{where}: unconditioned Resource '*' for {actions}")
    return bad


def gcp_violations(resources: list[Any], stack: str, *, allow_world: bool = False) -> list[str]:
    bad: list[str] = []
    for r in resources:
        i = r.inputs
        where = f"{r.typ} {r.name}"
        if r.typ.startswith("gcp:"):
            for param, key in (("labels", "labels"), ("user_labels", "userLabels")):
                if accepts(r.typ, param) and not (r.typ.endswith("NotificationChannel") and param == "labels"):
                    labels = i.get(key) or {}
                    if labels.get(GCP_LABEL_STACK) != stack or labels.get(GCP_LABEL_MANAGED) != "true":
                        bad.append(f"{where}: missing rlfleet labels ({key})")
        if r.typ == "gcp:compute/firewall:Firewall":
            ranges = set(i.get("sourceRanges") or [])
            ports = {n for a in i.get("allows", []) for p in a.get("ports", []) for n in _gcp_ports(p)} or set(
                ADMIN_PORTS)
            if ranges and world_open_reason(ranges) and not allow_world and ports & set(ADMIN_PORTS):
                bad.append(f"{where}: world-open ingress on a control port")
            if not ranges and not i.get("sourceTags"):
                bad.append(f"{where}: ingress rule without a source")
        if r.typ == "gcp:compute/instance:Instance":
            sh = i.get("shieldedInstanceConfig") or {}
            if not (sh.get("enableVtpm") and sh.get("enableIntegrityMonitoring")):
                bad.append(f"{where}: not a Shielded VM")
            md = i.get("metadata") or {}
            if md.get("enable-oslogin") != "TRUE" or md.get("block-project-ssh-keys") != "TRUE":
                bad.append(f"{where}: OS Login not enforced")
            if not (i.get("bootDisk") or {}).get("kmsKeySelfLink"):
                bad.append(f"{where}: boot disk not encrypted with the stack key")
            for nic in i.get("networkInterfaces", []):
                for ac in nic.get("accessConfigs", []) or []:
                    if not ac.get("natIp"):
                        bad.append(f"{where}: ephemeral external IP")
        if r.typ == "gcp:storage/bucket:Bucket":
            if not (i.get("encryption") or {}).get("defaultKmsKeyName"):
                bad.append(f"{where}: bucket not encrypted with the stack key")
            if i.get("publicAccessPrevention") != "enforced" or not i.get("uniformBucketLevelAccess"):
                bad.append(f"{where}: public access not prevented")
        if r.typ == "gcp:projects/iAMMember:IAMMember":
            role = i["role"]
            if role.startswith("roles/") and role not in ("roles/logging.logWriter", "roles/monitoring.metricWriter"):
                bad.append(f"{where}: project-wide role {role}")
            if not role.startswith("roles/") and not i.get("condition"):
                bad.append(f"{where}: custom role bound without a condition")
    return bad
