"""rlfleet on AWS: a secure, monitored, self-stopping Ray GPU cluster. See docs/runbook-aws.md."""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path.insert(0, str(_here.parent / "shared"))  # rlfleet_cloud: settings + bootstrap
try:
    import rlfleet.stack_outputs  # noqa: F401 - installed with `pip install rlfleet`
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(_here.parent.parent / "sdk"))

import pulumi  # noqa: E402
from rlfleet_aws.cluster import RayGpuCluster  # noqa: E402
from rlfleet_aws.config import load_settings  # noqa: E402

settings = load_settings()
cluster = RayGpuCluster(f"rlfleet-{settings.stack}", settings)
for key, value in cluster.outputs.items():
    pulumi.export(key, value)
