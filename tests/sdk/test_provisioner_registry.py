"""The provisioner registry and the typed provisioner references (rlfleet.provisioners.registry,
.refs): every kind has a provisioner that implements the protocol, targets files written by
rlfleet before the references were typed still load (and save back the same), and a reference
that does not fit its kind is one clear line."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from rlfleet.errors import ConfigError
from rlfleet.provisioners import registry
from rlfleet.provisioners.refs import AnsibleRef, LocalRef, NoRef, PulumiRef
from rlfleet.targets import Target, get_target, load_targets, save_target

# A targets file as rlfleet wrote it before the references were typed (save_target of the old
# untyped dicts: pulumi_stack.target_from_outputs / ansible_site.target_from / 'target add ray'),
# plus the hand-written shapes the old code also read ({} and a mapping without a type).
OLD_FILE = """\
targets:
  prod:
    kind: aws
    ray_address: https://203.0.113.5:8443
    token_source: aws-secret:arn:aws:secretsmanager:us-east-1:1:secret:rlfleet-prod
    artifact_root: s3://rlf-prod-artifacts/rlfleet
    ca_cert: /home/u/.rlfleet/ca/prod.pem
    provisioner:
      type: pulumi
      project_dir: /src/rlfleet/infra_cloud/aws
      stack: prod
      stack_tag: prod-0123456789ab
      region: us-east-1
      dashboard_url: https://203.0.113.5:3000
  gcpdev:
    kind: gcp
    ray_address: https://198.51.100.7:8443
    token_source: gcp-secret:projects/p1/secrets/rlfleet-dev
    artifact_root: gs://rlf-dev/rlfleet
    provisioner:
      type: pulumi
      stack_tag: dev-abcdefabcdef
      region: europe-west4
      project: p1
  lab:
    kind: onprem
    ray_address: https://10.1.0.2:8443
    token_source: file:/home/u/.rlfleet/tokens/lab.token
    artifact_root: file:///mnt/rlfleet/rlfleet
    provisioner:
      type: ansible
      inventory: /src/rlfleet/infra_onprem/inventories/lab
      playbook_dir: /src/rlfleet/ansible
    serve_ports: [8600, 8601]
  shared:
    kind: ray
    ray_address: https://ray.example.org:8443
    token_source: env:RAY_TOKEN
    artifact_root: s3://shared/rlfleet
  handmade:
    kind: ray
    ray_address: https://ray2.example.org:8443
    token_source: env:RAY_TOKEN
    artifact_root: s3://shared2/rlfleet
    provisioner: {}
  untyped:
    kind: aws
    ray_address: https://203.0.113.9:8443
    token_source: env:T
    artifact_root: s3://b/rlfleet
    provisioner:
      project_dir: /src/rlfleet/infra_cloud/aws
      stack: old
"""


@pytest.fixture
def old_targets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(OLD_FILE)
    monkeypatch.setenv("RLFLEET_CONFIG", str(path))
    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no ./rlfleet.yaml
    return path


def test_a_targets_file_saved_by_the_old_code_loads_typed(old_targets_file: Path) -> None:
    t = load_targets()
    assert isinstance(t["prod"].provisioner, PulumiRef)
    assert t["prod"].provisioner.stack_tag == "prod-0123456789ab" and t["prod"].provisioner.region == "us-east-1"
    assert isinstance(t["gcpdev"].provisioner, PulumiRef) and t["gcpdev"].provisioner.project == "p1"
    assert isinstance(t["lab"].provisioner, AnsibleRef)
    assert t["lab"].provisioner.inventory == "/src/rlfleet/infra_onprem/inventories/lab"
    assert isinstance(t["shared"].provisioner, NoRef) and isinstance(t["handmade"].provisioner, NoRef)
    assert isinstance(t["untyped"].provisioner, PulumiRef) and t["untyped"].provisioner.stack == "old"
    # code written against the old dict keeps reading it
    assert t["prod"].provisioner["stack"] == "prod" and t["prod"].provisioner.get("project") is None
    assert t["shared"].provisioner.get("type", "") == "" and {**t["shared"].provisioner} == {}
    assert get_target("lab").provisioner["type"] == "ansible"
    # and the registry reads it: the sweep scope of the old aws target
    sweep = registry.sweep_of(t["prod"])
    assert sweep is not None and (sweep.scope.stack, sweep.scope.region) == ("prod-0123456789ab", "us-east-1")


def test_saving_old_targets_again_writes_the_same_mappings(old_targets_file: Path) -> None:
    before = yaml.safe_load(old_targets_file.read_text())["targets"]
    for target in load_targets().values():
        save_target(target)
    after = yaml.safe_load(old_targets_file.read_text())["targets"]
    for name in ("prod", "gcpdev", "lab", "shared"):
        assert after[name] == before[name], name
    assert "provisioner" not in after["handmade"]  # {} is the default: left out, as before
    assert after["untyped"]["provisioner"] == {"type": "pulumi", **before["untyped"]["provisioner"]}


def test_a_reference_that_does_not_fit_the_kind_is_one_clear_line(old_targets_file: Path) -> None:
    data = yaml.safe_load(old_targets_file.read_text())
    data["targets"]["prod"]["provisioner"] = {"type": "ansible", "inventory": "/src/inv"}
    old_targets_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_targets()
    msg = str(err.value)
    assert "target 'prod': provisioner" in msg and "'pulumi', not 'ansible'" in msg and "\n" not in msg
    data["targets"]["prod"]["provisioner"] = {"type": "pulumi", "stack": "prod", "stak_tag": "typo"}
    old_targets_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"target 'prod': provisioner\.pulumi\.stak_tag"):
        load_targets()


def test_every_kind_has_a_row_and_every_provisioner_implements_the_protocol() -> None:
    from typing import get_args

    assert set(registry.KINDS) == set(get_args(registry.TargetKind))
    members = [m for m in dir(registry.Provisioner) if not m.startswith("_")]
    assert set(members) >= {"up", "destroy", "plan_destroy", "scan_leftovers", "sweep", "cost_inputs", "ready"}
    for kind, spec in registry.KINDS.items():
        if not spec.managed:
            with pytest.raises(ConfigError, match=f"targets of kind '{kind}' have no provisioner"):
                registry.for_kind(kind)
            continue
        prov = registry.for_kind(kind)
        for m in members:
            want = inspect.signature(getattr(registry.Provisioner, m))
            got = inspect.signature(getattr(prov, m))
            params = [p for p in want.parameters.values() if p.name != "self"]
            for p in params:
                if p.kind is p.VAR_KEYWORD:
                    assert any(q.kind is q.VAR_KEYWORD for q in got.parameters.values()), (kind, m)
                else:
                    assert p.name in got.parameters, (kind, m, p.name)


def test_rlfleet_local_is_the_local_provisioner_module() -> None:
    import rlfleet.local
    import rlfleet.provisioners.local

    assert rlfleet.local is rlfleet.provisioners.local is registry.for_kind("local")
    assert isinstance(rlfleet.local.local_target().provisioner, LocalRef)


def test_what_differs_between_kinds_is_answered_by_the_registry(tmp_path: Path) -> None:
    from rlfleet.errors import AuthError, ClusterUnreachable

    ray = Target(name="r", kind="ray", ray_address="https://10.0.0.9:8443", token_source="env:T",
                 artifact_root=f"file://{tmp_path}")
    onprem = ray.model_copy(update={"name": "o", "kind": "onprem"})
    aws = Target(name="a", kind="aws", ray_address="https://10.0.0.5:8443", token_source="env:T",
                 artifact_root="s3://b/rlfleet", provisioner={"type": "pulumi", "project_dir": "/p", "stack": "dev"})
    assert registry.ready(ray) is ray and registry.ready(onprem) is onprem  # nothing to start
    assert registry.sweep_of(onprem) is None and registry.sweep_of(aws) is not None
    assert registry.estimate_before_up(aws) and not registry.estimate_before_up(onprem)
    assert registry.saved_after_up(aws) and not registry.saved_after_up(get_target("local"))
    assert registry.head_down_note(ray, AuthError("bad token")) is None  # a wrong token is not 'down'
    assert registry.head_down_note(ray, ClusterUnreachable("refused")) == "refused"
    assert "local Ray head is not running" in (registry.head_down_note(get_target("local"), AuthError("x")) or "")
    assert registry.cost_inputs(aws) == registry.CostInputs(cloud="aws", project_dir="/p", stack="dev")
    with pytest.raises(ConfigError, match="no cloud stack to price"):
        registry.cost_inputs(onprem)
