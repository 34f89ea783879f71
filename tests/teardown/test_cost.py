"""Cost estimates from a stack's config and the dated price table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlfleet.errors import ConfigError
from rlfleet.targets import Target
from rlfleet.teardown import cost

REPO = Path(__file__).resolve().parents[2]


def _target(project_dir: Path, stack: str, kind: str = "aws") -> Target:
    return Target(name="prod", kind=kind, ray_address="https://10.0.0.5:8443", token_source="env:TOK",
                  artifact_root="s3://b/rlfleet",
                  provisioner={"type": "pulumi", "project_dir": str(project_dir), "stack": stack})


def test_price_table_is_dated_and_labelled_an_estimate():
    prices = cost.load_prices()
    assert prices["label"] == "estimate" and str(prices["as_of"])[:4].isdigit()
    assert prices["aws"]["instances_per_hour"]["g5.xlarge"] > 0


def test_estimate_of_the_committed_example_stack():
    # infra_cloud/aws/Pulumi.dev.yaml: head m6i.xlarge (default), 1 x g5.xlarge, 200 GB disks (default)
    est = cost.estimate_target(_target(REPO / "infra_cloud" / "aws", "dev"))
    p = cost.load_prices()["aws"]
    expected = (p["instances_per_hour"]["m6i.xlarge"] + p["instances_per_hour"]["g5.xlarge"]
                + p["disk_gb_month"] * 200 * 2 / 730)
    assert est.hourly == pytest.approx(expected)
    assert est.monthly == pytest.approx(expected * 730)
    text = est.format()
    assert "ESTIMATE" in text and "g5.xlarge x1" in text and "/month" in text and "as of" in text
    assert est.to_dict()["label"] == "estimate"


def test_pool_size_gpus_and_errors(tmp_path):
    (tmp_path / "Pulumi.yaml").write_text(yaml.safe_dump({"name": "rlfleet-gcp"}))
    (tmp_path / "Pulumi.big.yaml").write_text(yaml.safe_dump({"config": {
        "gcp:region": "europe-west4", "rlfleet-gcp:worker_count": 4,
        "rlfleet-gcp:worker_instance_type": "n1-standard-8", "rlfleet-gcp:gpu_type": "nvidia-tesla-t4",
        "rlfleet-gcp:gpu_count": 2, "rlfleet-gcp:spot": True, "rlfleet-gcp:disk_size_gb": 100,
        "rlfleet-gcp:ray_token": {"secure": "AAAB..."}}}))
    est = cost.estimate_target(_target(tmp_path, "big", kind="gcp"))
    items = dict(est.lines)
    assert items["workers n1-standard-8 x4"] == pytest.approx(4 * 0.38)
    assert items["gpus nvidia-tesla-t4 x8"] == pytest.approx(8 * 0.35)
    assert any("spot" in n for n in est.notes) and any("europe-west4" in n for n in est.notes)

    (tmp_path / "Pulumi.odd.yaml").write_text(yaml.safe_dump({"config": {
        "rlfleet-gcp:worker_instance_type": "z9-mega-1"}}))
    with pytest.raises(ConfigError, match="z9-mega-1"):
        cost.estimate_target(_target(tmp_path, "odd", kind="gcp"))
    with pytest.raises(ConfigError, match=r"Pulumi\.missing\.yaml does not exist"):
        cost.estimate_target(_target(tmp_path, "missing", kind="gcp"))
    local = Target(name="local", kind="local", ray_address="http://127.0.0.1:8265", token_source="env:T",
                   artifact_root="file:///tmp/x")
    with pytest.raises(ConfigError, match="no cloud stack"):
        cost.estimate_target(local)
