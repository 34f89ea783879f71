"""GCS part of the GCP leak scan, against the real GCS emulator. (Compute Engine and IAM calls
have no emulator here: validated by code review only, see docs/teardown.md.)"""

from __future__ import annotations

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from rlfleet.teardown import gcp

pytestmark = pytest.mark.integration


def test_bucket_scan_and_removal_only_touch_the_stack(gcs_emulator):
    client = storage.Client(project="rlf-test", credentials=AnonymousCredentials())
    made = {}
    for name, labels in (("rlf-prod-artifacts", {"rlfleet-stack": "prod", "rlfleet-managed": "true"}),
                         ("rlf-prod2-artifacts", {"rlfleet-stack": "prod-2", "rlfleet-managed": "true"}),
                         ("team-data", {"team": "rl"})):
        b = client.create_bucket(name)
        b.labels = labels
        b.patch()  # the emulator drops labels given at creation; a patch keeps them
        for i in range(3):
            b.blob(f"runs/r{i}/spec.json").upload_from_string(b"{}" * (i + 1))
        made[name] = b

    found = gcp.scan_stack("prod", project="rlf-test", kinds=("gcs:bucket",), storage_client=client)
    assert [(x.kind, x.id, x.is_data) for x in found] == [("gcs:bucket", "rlf-prod-artifacts", True)]
    assert gcp.bucket_usage("rlf-prod-artifacts", storage_client=client) == (3, 12)

    kept = gcp.remove_leftovers(found, delete_data=False, storage_client=client)
    assert kept.ok and kept.removed == [] and len(kept.skipped) == 1
    assert client.lookup_bucket("rlf-prod-artifacts") is not None

    gone = gcp.remove_leftovers(found, delete_data=True, storage_client=client)
    assert gone.ok and [x.id for x in gone.removed] == ["rlf-prod-artifacts"]
    assert client.lookup_bucket("rlf-prod-artifacts") is None
    assert gcp.scan_stack("prod", project="rlf-test", kinds=("gcs:bucket",), storage_client=client) == []
    for decoy in ("rlf-prod2-artifacts", "team-data"):
        assert len(list(client.list_blobs(decoy))) == 3
    # removing again is a no-op (404 counts as removed)
    again = gcp.remove_leftovers(found, delete_data=True, storage_client=client)
    assert again.ok
