"""GCP leak scan and removal, scoped to resources labelled ``rlfleet-stack=<stack id>``.

- buckets: google-cloud-storage (label filter client-side); removal deletes every object
  generation, then the bucket — only with ``delete_data``;
- instances and disks: Compute Engine REST API (``aggregated/instances|disks`` with the filter
  ``labels.rlfleet-stack=<stack>``) through google-auth's AuthorizedSession;
- service accounts cannot carry labels: the kit marks them with ``rlfleet-stack=<stack>`` in
  their description, and that is what the scan matches;
- the stack's Cloud KMS key (labelled; needs the region): it encrypts the artifact bucket, so it
  is data like the bucket. A CryptoKey cannot be deleted: removal (only with ``delete_data``)
  stops its rotation and destroys every version; a key without a live version counts as gone.

What is validated where: the bucket path runs against the real GCS emulator in the tests; the
Compute Engine and IAM REST calls could not run here (no emulator exists for them) and are
validated by code review only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from rlfleet.teardown import GCP_STACK_LABEL, Leftover, RemovalReport
from rlfleet.teardown.sweep import StackScope, StackSweep

COMPUTE = "https://compute.googleapis.com/compute/v1"
IAM = "https://iam.googleapis.com/v1"
KMS = "https://cloudkms.googleapis.com/v1"
ALL_KINDS = ("gcs:bucket", "compute:instance", "compute:disk", "iam:service-account", "kms:crypto-key")
_REST_KINDS = {"compute:instance", "compute:disk", "iam:service-account", "kms:crypto-key"}
# the key after the bucket: if deleting the data fails, the data stays readable for a re-run
REMOVAL_ORDER = ["compute:instance", "compute:disk", "iam:service-account", "gcs:bucket", "kms:crypto-key"]
_LIVE_VERSION = ("ENABLED", "DISABLED", "PENDING_GENERATION", "PENDING_IMPORT")


def _storage_client(project: str | None) -> Any:
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "rlfleet-test", credentials=AnonymousCredentials())
    return storage.Client(project=project)


def _authed_session() -> tuple[Any, str | None]:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return AuthorizedSession(creds), project


def _zone_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def scan_stack(
    stack: str,
    *,
    project: str | None = None,
    region: str | None = None,
    kinds: Iterable[str] = ALL_KINDS,
    storage_client: Any | None = None,
    session: Any | None = None,
) -> list[Leftover]:
    """Everything labelled ``rlfleet-stack=<stack id>`` in the project, in removal order. The KMS
    key is looked for only when ``region`` (the key ring's location) is given."""
    if not stack:
        raise ValueError("scan_stack needs a stack id")
    kinds = set(kinds)
    out: list[Leftover] = []
    if "gcs:bucket" in kinds:
        client = storage_client or _storage_client(project)
        for b in client.list_buckets():
            if (b.labels or {}).get(GCP_STACK_LABEL) == stack:
                out.append(Leftover("gcp", "gcs:bucket", b.name, region=b.location, is_data=True))
    rest = kinds & _REST_KINDS
    if not region:
        rest.discard("kms:crypto-key")
    if rest:
        if session is None:
            session, default_project = _authed_session()
            project = project or default_project
        if not project:
            raise ValueError("the GCP project is unknown: set provisioner.project on the target or gcloud's default")
        filt = {"filter": f"labels.{GCP_STACK_LABEL}={stack}"}
        for kind, coll in (("compute:instance", "instances"), ("compute:disk", "disks")):
            if kind not in rest:
                continue
            for item in _pages(session, f"{COMPUTE}/projects/{project}/aggregated/{coll}", filt):
                for scoped in item.get("items", {}).values():
                    for r in scoped.get(coll, []):
                        zone = _zone_of(r.get("zone", ""))
                        out.append(Leftover("gcp", kind, f"{zone}/{r['name']}", region=zone,
                                            detail=r.get("status", "")))
        if "iam:service-account" in rest:
            marker = f"{GCP_STACK_LABEL}={stack}"
            for page in _pages(session, f"{IAM}/projects/{project}/serviceAccounts", {}):
                for sa in page.get("accounts", []):
                    if marker in (sa.get("description") or "").split():
                        out.append(Leftover("gcp", "iam:service-account", sa["email"]))
        if "kms:crypto-key" in rest:
            out += _scan_keys(session, project, str(region), filt)
    rank = {k: i for i, k in enumerate(REMOVAL_ORDER)}
    return sorted(out, key=lambda x: (rank.get(x.kind, 99), x.id))


def _scan_keys(session: Any, project: str, region: str, filt: dict[str, str]) -> list[Leftover]:
    found = []
    for page in _pages(session, f"{KMS}/projects/{project}/locations/{region}/keyRings", {}):
        for ring in page.get("keyRings", []):
            for kpage in _pages(session, f"{KMS}/{ring['name']}/cryptoKeys", filt):
                for key in kpage.get("cryptoKeys", []):
                    if _live_versions(session, key["name"]):
                        found.append(Leftover("gcp", "kms:crypto-key", key["name"], region=region, is_data=True,
                                              detail="encrypts the artifact bucket"))
    return found


def _live_versions(session: Any, key: str) -> list[str]:
    return [v["name"] for page in _pages(session, f"{KMS}/{key}/cryptoKeyVersions", {})
            for v in page.get("cryptoKeyVersions", []) if v.get("state") in _LIVE_VERSION]


def _pages(session: Any, url: str, params: dict[str, str]) -> Iterable[dict[str, Any]]:
    token = None
    while True:
        p = dict(params, **({"pageToken": token} if token else {}))
        resp = session.get(url, params=p, timeout=60)
        resp.raise_for_status()
        body = resp.json()
        yield body
        token = body.get("nextPageToken")
        if not token:
            return


def remove_leftovers(
    leftovers: Iterable[Leftover],
    *,
    delete_data: bool = False,
    project: str | None = None,
    storage_client: Any | None = None,
    session: Any | None = None,
    echo: Callable[[str], None] = lambda s: None,
    wait_timeout_s: float = 600.0,
) -> RemovalReport:
    """Delete in order (instances, disks, service accounts, buckets); report, don't stop, on failure."""
    report = RemovalReport()
    rank = {k: i for i, k in enumerate(REMOVAL_ORDER)}
    for x in sorted((x for x in leftovers if x.provider == "gcp"), key=lambda x: rank.get(x.kind, 99)):
        if x.is_data and not delete_data:
            report.skipped.append((x, "artifact data is kept without --delete-data"))
            continue
        try:
            if x.kind == "gcs:bucket":
                _delete_bucket(storage_client or _storage_client(project), x.id)
            elif x.kind in _REST_KINDS:
                if session is None:
                    session, default_project = _authed_session()
                    project = project or default_project
                _delete_rest(session, project, x, wait_timeout_s)
            else:
                report.failed.append((x, "rlfleet does not know how to delete this kind; remove it by hand"))
                continue
        except Exception as err:
            if _not_found(err):
                report.removed.append(x)
                continue
            report.failed.append((x, f"{type(err).__name__}: {err}"))
            echo(f"failed to remove {x}: {err}")
            continue
        report.removed.append(x)
        echo(f"removed {x}")
    return report


def _not_found(err: BaseException) -> bool:
    code = getattr(err, "code", None) or getattr(getattr(err, "response", None), "status_code", None)
    return code == 404


def _delete_bucket(client: Any, name: str) -> None:
    bucket = client.bucket(name)
    for blob in client.list_blobs(name, versions=True):
        bucket.delete_blob(blob.name, generation=blob.generation)
    bucket.delete()


def bucket_usage(name: str, *, project: str | None = None, storage_client: Any | None = None) -> tuple[int, int]:
    client = storage_client or _storage_client(project)
    n = size = 0
    for blob in client.list_blobs(name, versions=True):
        n += 1
        size += int(blob.size or 0)
    return n, size


def _delete_rest(session: Any, project: str | None, x: Leftover, timeout_s: float) -> None:
    if x.kind == "kms:crypto-key":
        # no new versions after this (rotation off), then destroy every live one
        resp = session.patch(f"{KMS}/{x.id}", params={"updateMask": "rotationPeriod,nextRotationTime"},
                             json={}, timeout=60)
        resp.raise_for_status()
        for version in _live_versions(session, x.id):
            session.post(f"{KMS}/{version}:destroy", json={}, timeout=60).raise_for_status()
        return
    if x.kind == "iam:service-account":
        resp = session.delete(f"{IAM}/projects/{project}/serviceAccounts/{x.id}", timeout=60)
        resp.raise_for_status()
        return
    zone, name = x.id.split("/", 1)
    coll = "instances" if x.kind == "compute:instance" else "disks"
    resp = session.delete(f"{COMPUTE}/projects/{project}/zones/{zone}/{coll}/{name}", timeout=60)
    resp.raise_for_status()
    op = resp.json().get("name")
    deadline = time.monotonic() + timeout_s
    while op and time.monotonic() < deadline:  # operations/wait returns at DONE or after ~2 min
        w = session.post(f"{COMPUTE}/projects/{project}/zones/{zone}/operations/{op}/wait", timeout=150)
        w.raise_for_status()
        body = w.json()
        if body.get("status") == "DONE":
            if body.get("error"):
                raise RuntimeError(f"delete of {x.id} failed: {body['error']}")
            return
    if op:
        raise TimeoutError(f"delete of {x.id} did not finish in {timeout_s:.0f} s")


def stack_sweep(scope: StackScope) -> StackSweep:
    """The sweep of one stack: label scan and removal inside the target's project (where even the
    bare names of stacks made before stack ids were unique)."""
    return StackSweep(
        scope=scope,
        scan=lambda: scan_stack(scope.stack, project=scope.project, region=scope.region),
        remove=lambda items, delete_data: remove_leftovers(items, delete_data=delete_data, project=scope.project),
        tagged=f"the label {GCP_STACK_LABEL}={scope.stack}",
    )
