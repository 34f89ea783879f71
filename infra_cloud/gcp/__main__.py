"""rlfleet on GCP: a secure, monitored, self-stopping Ray GPU cluster. See docs/runbook-gcp.md."""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path.insert(0, str(_here.parent / "shared"))  # rlfleet_cloud: settings + bootstrap
# rlfleet from this checkout, always (never an installed copy, never an index): the program builds
# and ships this checkout's wheel, and describes the stack with the same code.
sys.path.insert(0, str(_here.parent.parent / "sdk"))

import pulumi  # noqa: E402

from rlfleet_gcp.cluster import RayGpuCluster  # noqa: E402
from rlfleet_gcp.config import load_settings  # noqa: E402

settings = load_settings()
region = pulumi.Config("gcp").require("region")
cluster = RayGpuCluster(f"rlfleet-{settings.stack}", settings, region=region)
for key, value in cluster.outputs.items():
    pulumi.export(key, value)
