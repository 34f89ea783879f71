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


class _Resp:
    def __init__(self, body: dict, status: int = 200) -> None:
        self.body, self.status_code = body, status

    def json(self) -> dict:
        return self.body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}")


class KmsStandIn:
    """The Cloud KMS REST calls teardown makes, answered in memory (there is no KMS emulator).
    It checks the URLs, the label filter and the update mask as the real API would take them."""

    def __init__(self) -> None:
        self.keys: dict[str, dict] = {}  # key name -> {"labels", "rotationPeriod", "versions": {name: state}}
        self.calls: list[tuple[str, str]] = []

    def add_key(self, ring: str, name: str, label: str) -> str:
        key = f"{ring}/cryptoKeys/{name}"
        self.keys[key] = {"labels": {"rlfleet-stack": label}, "rotationPeriod": "7776000s",
                          "versions": {f"{key}/cryptoKeyVersions/{i}": "ENABLED" for i in (1, 2)}}
        return key

    def get(self, url: str, params: dict | None = None, timeout: float = 0) -> _Resp:
        self.calls.append(("GET", url))
        path = url.removeprefix(gcp.KMS + "/")
        if path.endswith("/keyRings"):
            rings = sorted({k.split("/cryptoKeys/")[0] for k in self.keys if k.startswith(path)})
            return _Resp({"keyRings": [{"name": r} for r in rings]})
        if path.endswith("/cryptoKeys"):
            label, _, value = (params or {}).get("filter", "").removeprefix("labels.").partition("=")
            keys = [k for k, v in self.keys.items()
                    if k.startswith(path) and (not label or v["labels"].get(label) == value)]
            return _Resp({"cryptoKeys": [{"name": k} for k in keys]})
        if path.endswith("/cryptoKeyVersions"):
            key = self.keys[path.removesuffix("/cryptoKeyVersions")]
            return _Resp({"cryptoKeyVersions": [{"name": n, "state": s} for n, s in key["versions"].items()]})
        return _Resp({}, 404)

    def patch(self, url: str, params: dict | None = None, json: dict | None = None, timeout: float = 0) -> _Resp:
        self.calls.append(("PATCH", url))
        key = self.keys[url.removeprefix(gcp.KMS + "/")]
        for field in (params or {}).get("updateMask", "").split(","):
            key.pop(field, None)  # a field in the mask but not in the body is cleared
        return _Resp({})

    def post(self, url: str, json: dict | None = None, timeout: float = 0) -> _Resp:
        self.calls.append(("POST", url))
        version = url.removeprefix(gcp.KMS + "/").removesuffix(":destroy")
        key = self.keys[version.split("/cryptoKeyVersions/")[0]]
        key["versions"][version] = "DESTROY_SCHEDULED"
        return _Resp({})


def test_kms_key_is_data_kept_without_delete_data_and_destroyed_with_it():
    ring = "projects/rlf-test/locations/us-central1/keyRings/rlfleet-dev"
    kms = KmsStandIn()
    ours = kms.add_key(ring, "rlfleet-dev", "dev-0123456789ab")
    decoy = kms.add_key(ring, "rlfleet-dev-2", "dev-2-ba9876543210")  # another stack, same ring location
    found = gcp.scan_stack("dev-0123456789ab", project="rlf-test", region="us-central1",
                           kinds=("kms:crypto-key",), session=kms)
    assert [(x.kind, x.id, x.is_data) for x in found] == [("kms:crypto-key", ours, True)]
    assert gcp.scan_stack("dev-0123456789ab", project="rlf-test", kinds=("kms:crypto-key",), session=kms) == []

    kept = gcp.remove_leftovers(found, delete_data=False, project="rlf-test", session=kms)
    assert kept.ok and kept.removed == [] and [x.id for x, _ in kept.skipped] == [ours]
    assert set(kms.keys[ours]["versions"].values()) == {"ENABLED"} and not any(m != "GET" for m, _ in kms.calls)

    gone = gcp.remove_leftovers(found, delete_data=True, project="rlf-test", session=kms)
    assert gone.ok and [x.id for x in gone.removed] == [ours]
    assert set(kms.keys[ours]["versions"].values()) == {"DESTROY_SCHEDULED"}
    assert "rotationPeriod" not in kms.keys[ours]  # no new version appears after the destroy
    assert gcp.scan_stack("dev-0123456789ab", project="rlf-test", region="us-central1",
                          kinds=("kms:crypto-key",), session=kms) == []
    assert set(kms.keys[decoy]["versions"].values()) == {"ENABLED"} and "rotationPeriod" in kms.keys[decoy]


def test_key_is_removed_after_the_bucket():
    order = gcp.REMOVAL_ORDER
    assert order.index("gcs:bucket") < order.index("kms:crypto-key")
