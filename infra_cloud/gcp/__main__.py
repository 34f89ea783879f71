"""rlfleet on GCP: a secure, monitored, self-stopping Ray GPU cluster. See docs/runbook-gcp.md."""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path.insert(0, str(_here.parent / "shared"))  # rlfleet_cloud: settings + bootstrap
try:
    import rlfleet.stack_outputs  # noqa: F401 - installed with `pip install rlfleet`
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(_here.parent.parent / "sdk"))

import pulumi  # noqa: E402
from rlfleet_gcp.cluster import RayGpuCluster  # noqa: E402
from rlfleet_gcp.config import load_settings  # noqa: E402

settings = load_settings()
region = pulumi.Config("gcp").require("region")
cluster = RayGpuCluster(f"rlfleet-{settings.stack}", settings, region=region)
for key, value in cluster.outputs.items():
    pulumi.export(key, value)
