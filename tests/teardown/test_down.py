"""`down` orchestration: real moto resources for the AWS sweep/verify; the provisioner (Pulumi,
which cannot run here) and the cluster's runs are stand-ins injected as parameters."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import boto3
import pytest

from rlfleet.errors import ConfirmationRequired, LeftoversFound
from rlfleet.runs import RunStatus
from rlfleet.targets import Target
from rlfleet.teardown import aws
from rlfleet.teardown.down import down

from .awsfixtures import as_dict, create_set, still_present

TAG = "prod-0123456789ab"  # the stack id the program exports (test_stack_scope.py: bare names)


@dataclass
class FakeRun:
    run_id: str
    state: RunStatus
    cancels: int = 0

    def status(self) -> RunStatus:
        return self.state

    def cancel(self) -> bool:
        self.cancels += 1
        if self.state.is_terminal():
            return False
        self.state = RunStatus.CANCELLED
        return True


class FakePulumi:
    """Destroys what it 'created' except the kinds it leaks (like a partly failed destroy)."""

    def __init__(self, leak: tuple[str, ...] = ()) -> None:
        self.leak = leak
        self.destroyed = 0

    def destroy(self, target, *, delete_data, echo):
        # like pulumi_stack.destroy, which refuses delete_data (the bucket is a retained resource)
        assert not delete_data, "down must delete cloud data through its own sweep"
        self.destroyed += 1
        items = [x for x in aws.scan_stack(TAG, region="us-east-1") if x.kind not in self.leak]
        aws.remove_leftovers(items, delete_data=False, region="us-east-1")

    def plan_destroy(self, target, *, delete_data):
        assert not delete_data
        return [f"pulumi destroy stack prod (delete_data={delete_data})"]

    def scan_leftovers(self, target):  # unused for aws: down scans tags itself
        return []


def aws_target(endpoint: str) -> Target:
    return Target(name="prod", kind="aws", ray_address="https://10.0.0.5:8443", token_source="env:RLF_TOKEN",
                  artifact_root="s3://rlf-prod-artifacts/rlfleet",
                  storage_options={"client_kwargs": {"endpoint_url": endpoint}},
                  provisioner={"type": "pulumi", "project_dir": "/nonexistent", "stack": "prod", "stack_tag": TAG,
                               "region": "us-east-1"})


@pytest.fixture
def world(moto_reset):
    s = boto3.Session(region_name="us-east-1")
    return s, create_set(s, "rlf-prod", TAG), create_set(s, "rlf-other", "other-0123456789ab")


pytestmark = pytest.mark.integration


def test_down_cancels_destroys_sweeps_leaks_keeps_data_and_second_down_is_a_noop(world, moto_reset):
    session, ours, other = world
    untagged = create_set(session, "team", None)
    runs = [FakeRun("r-train", RunStatus.RUNNING), FakeRun("r-deploy", RunStatus.RUNNING),
            FakeRun("r-old", RunStatus.SUCCEEDED)]
    prov = FakePulumi(leak=("ec2:volume", "ec2:security-group", "logs:log-group"))
    lines: list[str] = []
    res = down(aws_target(moto_reset), list_runs=lambda t: runs, provisioner=prov, echo=lines.append,
               backoff_s=0.01)
    assert res.cancelled == ["r-train", "r-deploy"] and runs[2].cancels == 0
    assert prov.destroyed == 1
    assert res.sweep is not None and res.sweep.ok
    assert {x.kind for x in res.sweep.removed} == {"ec2:volume", "ec2:security-group", "logs:log-group"}
    assert res.leftovers == []
    assert sorted(x.id for x in res.kept_data) == sorted(ours.buckets + ours.kms_keys)  # the key of the kept data too
    assert any("kept aws s3:bucket rlf-prod-artifacts" in line for line in lines)
    assert still_present(session, ours) == {"buckets": ours.buckets, "kms_keys": ours.kms_keys}
    assert still_present(session, other) == as_dict(other)
    assert still_present(session, untagged) == as_dict(untagged)

    # second down: nothing to cancel, nothing swept, still succeeds
    lines.clear()
    again = down(aws_target(moto_reset), list_runs=lambda t: [], provisioner=FakePulumi(), echo=lines.append,
                 backoff_s=0.01)
    assert again.cancelled == [] and again.sweep is None and again.leftovers == []
    assert any("is down; verified" in line for line in lines)


def test_down_reports_leftovers_it_cannot_remove_and_exits_nonzero(world, moto_reset, monkeypatch):
    session, ours, other = world
    real_remove = aws.remove_leftovers

    def remove_but_fail_on_volumes(items, *, delete_data=False, region=None, **kw):
        s = boto3.Session(region_name="us-east-1")
        s.events.register("before-call.ec2.DeleteVolume",
                          lambda **_: (_ for _ in ()).throw(RuntimeError("injected: VolumeInUse")))
        return real_remove(items, delete_data=delete_data, region=region, session=s, **kw)

    monkeypatch.setattr(aws, "remove_leftovers", remove_but_fail_on_volumes)
    lines: list[str] = []
    with pytest.raises(LeftoversFound, match="still there after teardown") as err:
        down(aws_target(moto_reset), list_runs=lambda t: [], provisioner=FakePulumi(leak=("ec2:volume",)),
             echo=lines.append, verify_attempts=2, backoff_s=0.01)
    assert err.value.exit_code == 8 and "rlfleet:stack=prod" in str(err.value)
    assert any(line.startswith("LEFTOVERS") for line in lines)
    assert sum(1 for line in lines if line.strip().startswith("aws ec2:volume")) == 2  # the two data volumes
    assert any("FAILED" in line and "injected" in line for line in lines)

    # the failure was transient: a re-run completes
    monkeypatch.setattr(aws, "remove_leftovers", real_remove)
    res = down(aws_target(moto_reset), list_runs=lambda t: [], provisioner=FakePulumi(), echo=lines.append,
               backoff_s=0.01)
    assert res.leftovers == [] and still_present(session, ours) == {"buckets": ours.buckets, "kms_keys": ours.kms_keys}
    assert still_present(session, other) == as_dict(other)


def test_delete_data_without_tty_or_yes_is_refused_before_anything_changes(world, moto_reset):
    session, ours, _ = world
    runs = [FakeRun("r1", RunStatus.RUNNING)]
    prov = FakePulumi()
    with pytest.raises(ConfirmationRequired, match="--yes") as err:
        down(aws_target(moto_reset), delete_data=True, list_runs=lambda t: runs, provisioner=prov,
             echo=lambda s: None, is_tty=lambda: False)
    assert "6 object(s)" in str(err.value) and "s3://rlf-prod-artifacts" in str(err.value)
    assert prov.destroyed == 0 and runs[0].cancels == 0
    assert still_present(session, ours) == as_dict(ours)

    # a TTY and a "no" answer: also nothing changes
    asked: list[str] = []
    with pytest.raises(ConfirmationRequired, match="not confirmed"):
        down(aws_target(moto_reset), delete_data=True, list_runs=lambda t: runs, provisioner=prov,
             echo=lambda s: None, is_tty=lambda: True, confirm=lambda q: asked.append(q) or False)
    assert asked and "6 object(s), 180 B" in asked[0] and prov.destroyed == 0

    # --yes: data goes too, nothing tagged for the stack remains
    res = down(aws_target(moto_reset), delete_data=True, yes=True, list_runs=lambda t: runs, provisioner=prov,
               echo=lambda s: None, backoff_s=0.01)
    assert res.data is not None and (res.data.objects, res.data.bytes) == (6, 180)
    assert res.kept_data == [] and res.leftovers == [] and still_present(session, ours) == {}
    assert aws.scan_stack(TAG, region="us-east-1") == []


def test_dry_run_lists_and_changes_nothing(world, moto_reset):
    session, ours, _ = world
    runs = [FakeRun("r1", RunStatus.RUNNING)]
    prov = FakePulumi()
    lines: list[str] = []
    res = down(aws_target(moto_reset), dry_run=True, delete_data=True, list_runs=lambda t: runs,
               provisioner=prov, echo=lines.append)
    assert prov.destroyed == 0 and runs[0].cancels == 0 and still_present(session, ours) == as_dict(ours)
    assert res.planned[0] == "cancel run r1 (RUNNING)"
    assert any("remove aws s3:bucket rlf-prod-artifacts" in p for p in res.planned)
    assert any("remove aws iam:role rlf-prod-node" in p for p in res.planned)
    assert lines[0].startswith("--delete-data would delete s3://rlf-prod-artifacts: 6 object(s)")


def test_non_cloud_target_verifies_with_backoff(tmp_path):
    """Local/on-prem: the provisioner's own scan; leftovers that go away on a retry are fine."""
    scans = iter([["process 4242"], ["process 4242"], []])
    prov = SimpleNamespace(destroy=lambda t, delete_data, echo: None, plan_destroy=lambda t, delete_data: [],
                           scan_leftovers=lambda t: next(scans))
    t = Target(name="lab", kind="onprem", ray_address="https://10.1.0.2:8443", token_source="env:T",
               artifact_root=f"file://{tmp_path}")
    lines: list[str] = []
    res = down(t, list_runs=lambda t: (_ for _ in ()).throw(ConnectionError("refused")), provisioner=prov,
               echo=lines.append, backoff_s=0.01)
    assert res.leftovers == [] and any("does not answer" in line for line in lines)
    assert sum("checking again" in line for line in lines) == 2

    stuck = SimpleNamespace(destroy=prov.destroy, plan_destroy=prov.plan_destroy,
                            scan_leftovers=lambda t: ["systemd unit ray-head.service"])
    with pytest.raises(LeftoversFound):
        down(t, list_runs=lambda t: [], provisioner=stuck, echo=lines.append, verify_attempts=2, backoff_s=0.01)
