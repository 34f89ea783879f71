"""The cloud defaults live once, in rlfleet.constants: the Pulumi programs' settings, the cost
estimates and Pulumi.yaml (what `pulumi config` users read) all say the same, and a drifted
Pulumi.yaml default fails here. Tag/label keys are valid on both clouds; the GCP stop function
(deployed on its own, it cannot import rlfleet) matches the label key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlfleet import constants
from rlfleet.teardown import cost
from rlfleet_cloud.settings import parse_settings

INFRA = Path(__file__).resolve().parents[2] / "infra_cloud"
# keys a program does not have: the constant applies to the other cloud only
NOT_IN_PROGRAM = {"aws": {"secure_boot"}, "gcp": set()}


def _as_config_string(value: Any) -> str:
    """A Pulumi.yaml default the way `pulumi config` hands it to the program (a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def pulumi_yaml_drift(pulumi_yaml: Path, cloud: str) -> list[str]:
    """Every disagreement between a Pulumi.yaml's config defaults and rlfleet.constants."""
    cfg = yaml.safe_load(pulumi_yaml.read_text())["config"]
    ours = constants.cloud_defaults(cloud)
    problems = []
    for key, decl in sorted(cfg.items()):
        if "default" not in decl:
            if ours.get(key):
                problems.append(f"{pulumi_yaml}: {key} has no default; rlfleet.constants says {ours[key]!r}")
            continue
        theirs = _as_config_string(decl["default"])
        if key not in ours:
            problems.append(f"{pulumi_yaml}: {key} default {theirs!r} is not in rlfleet.constants")
        elif theirs != ours[key]:
            problems.append(f"{pulumi_yaml}: {key} default {theirs!r} != rlfleet.constants {ours[key]!r}")
    for key, value in sorted(ours.items()):
        if value and key not in cfg and key not in NOT_IN_PROGRAM[cloud]:
            problems.append(f"{pulumi_yaml}: {key} (default {value!r} in rlfleet.constants) is not declared")
    return problems


@pytest.mark.parametrize("cloud", constants.CLOUDS)
def test_pulumi_yaml_defaults_are_the_constants(cloud: str) -> None:
    assert pulumi_yaml_drift(INFRA / cloud / "Pulumi.yaml", cloud) == []


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("head_instance_type", "m6i.2xlarge", ["head_instance_type default 'm6i.2xlarge' != rlfleet.constants"]),
        ("api_port", 9443, ["api_port default '9443' != rlfleet.constants '8443'"]),
        ("spot", True, ["spot default 'true' != rlfleet.constants 'false'"]),
        ("brand_new", 3, ["brand_new default '3' is not in rlfleet.constants"]),
    ],
)
def test_a_drifted_pulumi_yaml_default_is_caught(tmp_path: Path, key: str, value: Any, words: list[str]) -> None:
    doc = yaml.safe_load((INFRA / "aws" / "Pulumi.yaml").read_text())
    doc["config"].setdefault(key, {"type": "string"})["default"] = value
    drifted = tmp_path / "Pulumi.yaml"
    drifted.write_text(yaml.safe_dump(doc))
    problems = pulumi_yaml_drift(drifted, "aws")
    assert len(problems) == 1 and all(w in problems[0] for w in words), problems


def test_a_default_removed_from_pulumi_yaml_is_caught(tmp_path: Path) -> None:
    doc = yaml.safe_load((INFRA / "gcp" / "Pulumi.yaml").read_text())
    del doc["config"]["idle_minutes"]["default"]
    del doc["config"]["disk_size_gb"]
    drifted = tmp_path / "Pulumi.yaml"
    drifted.write_text(yaml.safe_dump(doc))
    assert pulumi_yaml_drift(drifted, "gcp") == [
        f"{drifted}: idle_minutes has no default; rlfleet.constants says '30'",
        f"{drifted}: disk_size_gb (default '200' in rlfleet.constants) is not declared",
    ]


@pytest.mark.parametrize("cloud", constants.CLOUDS)
def test_programs_and_cost_estimates_take_the_same_defaults(cloud: str) -> None:
    d = constants.cloud_defaults(cloud)
    s = parse_settings(cloud, {"admin_cidrs": "203.0.113.7/32"}.get, stack="dev")
    assert (s.head_instance_type, s.worker_instance_type, s.worker_count, s.disk_size_gb, s.api_port,
            s.idle_minutes, s.ray_version, s.image_family) == (
        d["head_instance_type"], d["worker_instance_type"], int(d["worker_count"]), int(d["disk_size_gb"]),
        int(d["api_port"]), int(d["idle_minutes"]), d["ray_version"], d["image_family"])
    est = cost.estimate(cloud, {}, stack="dev")
    items = [item for item, _ in est.lines]
    assert f"head {d['head_instance_type']} x1" in items
    assert f"workers {d['worker_instance_type']} x{d['worker_count']}" in items
    assert f"disks {d['disk_size_gb']} GB x{1 + int(d['worker_count'])}" in items
    assert any(f"idle auto-stop after {d['idle_minutes']} min" in n for n in est.notes)


def test_tag_and_label_keys_are_valid_on_both_clouds() -> None:
    gcp_key = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # GCP: lowercase, start with a letter, <= 63
    for key in (constants.GCP_LABEL_STACK, constants.GCP_LABEL_MANAGED, constants.GCP_LABEL_ROLE):
        assert gcp_key.fullmatch(key), key
    for key in (constants.AWS_TAG_STACK, constants.AWS_TAG_MANAGED):  # AWS: <= 128, not the aws: prefix
        assert len(key) <= 128 and not key.lower().startswith("aws:") and re.fullmatch(r"[\w.:/=+\-@ ]+", key)
    assert gcp_key.fullmatch(constants.MANAGED_VALUE)


def test_the_gcp_stop_function_matches_the_stack_label() -> None:
    """The stop function is deployed as its own source archive (no rlfleet there): its literal must
    be the label key, or idle VMs of the stack would never be stopped."""
    src = (INFRA / "gcp" / "rlfleet_gcp" / "stopper" / "main.py").read_text()
    keys = re.findall(r'vm\.labels\.get\("([^"]+)"\)', src)
    assert keys == [constants.GCP_LABEL_STACK]


def test_the_ansible_roles_default_to_the_same_deploy_ports() -> None:
    """On-prem, the roles' Jinja defaults repeat the deploy port list (ansible cannot import rlfleet)."""
    roles = INFRA.parent / "ansible" / "roles"
    files = [roles / "tls_front" / "defaults" / "main.yml", roles / "ray_runtime" / "defaults" / "main.yml",
             roles / "firewall" / "defaults" / "main.yml"]
    for f in files:
        lists = re.findall(r"default\(\[([\d,\s]+)\]\)", f.read_text())
        assert lists, f
        for text in lists:
            assert tuple(int(p) for p in text.split(",")) == constants.SERVE_PORTS_DEFAULT, f
