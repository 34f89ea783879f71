"""A thin client for Ray's Jobs REST API (what ``ray.job_submission`` speaks), on the stdlib.

Using HTTP directly keeps ``import rlfleet`` and the CLI free of Ray's heavy modules, lets us
pin a CA for ``https://`` heads (``Target.ca_cert``), and turns Ray's answers into our errors.
Every request carries ``Authorization: Bearer <token>`` (Ray token auth).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import ssl
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from rlfleet.errors import AuthError, ClusterUnreachable, ConfigError, RlfleetError, RunNotFound, SpecError

# Ray stores working_dir packages in GCS; the bound is its max gRPC message size (same env var).
_DEFAULT_MAX_PACKAGE = 512 * 1024 * 1024
_EXCLUDE_DIRS = {".git", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", "node_modules"}


def max_package_bytes() -> int:
    return int(os.environ.get("RAY_max_grpc_message_size", _DEFAULT_MAX_PACKAGE))


class JobsClient:
    def __init__(
        self, address: str, token: str, *, target_name: str = "?", ca_cert: str | None = None, timeout: float = 30.0
    ) -> None:
        self.address = address.rstrip("/")
        if not self.address.startswith(("http://", "https://")):
            raise ConfigError(
                f"target {target_name!r}: ray_address must be an http:// or https:// URL, not {address!r}"
            )
        self._token = token
        self.target_name = target_name
        self.timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        if self.address.startswith("https://"):
            if ca_cert and not os.path.isfile(os.path.expanduser(ca_cert)):
                raise ConfigError(
                    f"target {target_name!r}: its CA certificate {ca_cert} does not exist yet "
                    f"(it is created by 'rlfleet up {target_name}'; or re-add the target with --ca-cert)"
                )
            # a pinned CA replaces the system trust store (create_default_context loads only cafile)
            self._ctx = ssl.create_default_context(cafile=os.path.expanduser(ca_cert) if ca_cert else None)

    def __repr__(self) -> str:  # never show the token
        return f"JobsClient({self.address!r}, target={self.target_name!r})"

    # -- transport ----------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        json_body: Any = None,
        ok404: bool = False,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        # only http(s) addresses reach here (checked in __init__)
        req = urllib.request.Request(self.address + path, data=body, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self._ctx) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            payload = err.read()
            if err.code == 401:
                raise AuthError(
                    f"target {self.target_name!r} refused the request: no valid token was sent "
                    f"(HTTP 401 from {self.address}); check the target's token_source"
                ) from None
            if err.code == 403:
                raise AuthError(
                    f"target {self.target_name!r} refused the token (HTTP 403 from {self.address}): "
                    "the token does not match the cluster's; check the target's token_source"
                ) from None
            if err.code == 404 and ok404:
                return 404, payload
            if err.code in (502, 503, 504):  # a front end (nginx on an on-prem node) whose Ray head is down
                raise ClusterUnreachable(
                    f"the Ray head of target {self.target_name!r} is not answering: {self.address} "
                    f"answered HTTP {err.code} (the head behind it is down or restarting)"
                ) from None
            text = payload.decode(errors="replace").strip()[:500]
            raise RlfleetError(f"Ray at {self.address} answered HTTP {err.code} to {method} {path}: {text}") from None
        except ssl.SSLError as err:
            raise ClusterUnreachable(
                f"TLS to target {self.target_name!r} at {self.address} failed: {err.reason} "
                "(is the target's ca_cert the CA that signed the head's certificate?)"
            ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            hint = " Start it with 'rlfleet local up'." if self.target_name == "local" else ""
            raise ClusterUnreachable(
                f"cannot reach the Ray cluster of target {self.target_name!r} at {self.address}: {reason}.{hint}"
            ) from None

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        status, data = self._request(method, path, **kw)
        if status == 404:
            return None
        return json.loads(data) if data else None

    # -- API ----------------------------------------------------------------------------------
    def get_json(self, path: str) -> Any:
        """GET one of the dashboard's read-only APIs (``/api/v0/nodes``, ``/api/v0/actors?...``); None on 404."""
        return self._json("GET", path)

    def version(self, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/api/version", timeout=timeout) or {}

    def submit(
        self,
        *,
        submission_id: str,
        entrypoint: str,
        runtime_env: dict[str, Any],
        metadata: dict[str, str],
        num_cpus: float,
        num_gpus: float,
        resources: dict[str, float] | None = None,
    ) -> str:
        body: dict[str, Any] = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "runtime_env": runtime_env,
            "metadata": metadata,
            "entrypoint_num_cpus": num_cpus,
            "entrypoint_num_gpus": num_gpus,
        }
        if resources:  # custom Ray resources the entrypoint needs (places it on a node that has them)
            body["entrypoint_resources"] = resources
        out = self._json("POST", "/api/jobs/", json_body=body)
        return str(out["submission_id"])

    def get(self, submission_id: str) -> dict[str, Any]:
        out = self._json("GET", f"/api/jobs/{submission_id}", ok404=True)
        if out is None:
            raise RunNotFound(
                f"no run {submission_id!r} on target {self.target_name!r} "
                f"(list runs with 'rlfleet runs --target {self.target_name}')"
            )
        return dict(out)

    def list(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/jobs/") or [])

    def stop(self, submission_id: str) -> bool:
        out = self._json("POST", f"/api/jobs/{submission_id}/stop", ok404=True)
        if out is None:
            raise RunNotFound(f"no run {submission_id!r} on target {self.target_name!r}")
        return bool(out.get("stopped"))

    def delete(self, submission_id: str) -> bool:
        """Forget a terminal job (its id can then be submitted again); False if there was none."""
        status, _ = self._request("DELETE", f"/api/jobs/{submission_id}", ok404=True)
        return status != 404

    def node_resources(self) -> builtins.list[dict[str, Any]]:
        """What each ALIVE node declares: ``{"node_id": ..., "CPU": ..., "GPU": ..., <custom>: ...}``."""
        out = self._json("GET", "/nodes?view=summary") or {}
        nodes = []
        for node in (out.get("data") or {}).get("summary") or []:
            raylet = node.get("raylet") or {}
            if raylet.get("state") != "ALIVE":
                continue
            nodes.append({"node_id": str(raylet.get("nodeId") or ""),
                          **{k: float(v) for k, v in (raylet.get("resourcesTotal") or {}).items()}})
        return nodes

    def cluster_resources(self) -> dict[str, float]:
        """The resources the cluster's ALIVE nodes declare, summed (CPU, GPU, custom ones)."""
        total: dict[str, float] = {}
        for node in self.node_resources():
            for k, v in node.items():
                if k != "node_id":
                    total[k] = total.get(k, 0.0) + float(v)
        return total

    def logs(self, submission_id: str) -> str:
        out = self._json("GET", f"/api/jobs/{submission_id}/logs", ok404=True)
        if out is None:
            raise RunNotFound(f"no run {submission_id!r} on target {self.target_name!r}")
        return str(out.get("logs", ""))

    def upload_working_dir(self, path: str) -> str:
        """Zip a local directory and upload it to the cluster's GCS; return its gcs:// URI."""
        return self.upload_package(zip_dir(Path(path)))

    def upload_package(self, data: bytes) -> str:
        """Upload a zip archive as a working_dir package (once per content); return its gcs:// URI."""
        name = f"_ray_pkg_{hashlib.sha256(data).hexdigest()[:32]}.zip"
        status, _ = self._request("GET", f"/api/packages/gcs/{name}", ok404=True)
        if status == 404:
            self._request("PUT", f"/api/packages/gcs/{name}", body=data, timeout=max(self.timeout, 300))
        return f"gcs://{name}"


def zip_dir(root: Path) -> bytes:
    """Deterministic zip of a directory (sorted entries, fixed timestamps), size-checked."""
    limit = max_package_bytes()
    total = 0
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE_DIRS)
        for fn in sorted(filenames):
            if fn.endswith(".pyc"):
                continue
            p = Path(dirpath) / fn
            if p.is_symlink() or not p.is_file():
                continue
            total += p.stat().st_size
            files.append(p)
    if total > limit:
        raise SpecError(
            f"code: {str(root)!r} holds {total / 2**20:.1f} MiB of files; Ray's upload limit for a "
            f"run's code is {limit / 2**20:.0f} MiB. Move data out of the code directory "
            "(put it in the artifact store) and try again"
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            info = zipfile.ZipInfo(str(p.relative_to(root)), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (p.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, p.read_bytes())
    data = buf.getvalue()
    if len(data) > limit:
        raise SpecError(
            f"code: {str(root)!r} packs to {len(data) / 2**20:.1f} MiB; Ray's upload limit is "
            f"{limit / 2**20:.0f} MiB. Move data out of the code directory and try again"
        )
    return data
