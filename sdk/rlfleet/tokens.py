"""Deployment tokens: each deploy run gets its own bearer token, never the cluster's.

The token is made on the submitting machine and kept there in a file only its owner can read
(``$RLFLEET_HOME/tokens/deploy-<run_id>``, mode 0600 in a 0700 folder). The cluster receives
only its sha256 (in the run envelope), so neither the Ray API nor anyone reading the job's
environment learns a token that calls the policy, and the policy's token opens nothing else.
The file is removed when the deployment is cancelled, which revokes the token for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from rlfleet.errors import RlfleetError
from rlfleet.targets import rlfleet_home


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _path(run_id: str) -> Path:
    return rlfleet_home() / "tokens" / f"deploy-{run_id}"


def _deployment_key(name: str) -> str:
    """Named deployments (rlfleet.deployments) keep one token per name, beside the deploy runs' tokens."""
    return f"deployment-{name}"


def new_deploy_token(run_id: str) -> str:
    """Make and store the token of deploy run ``run_id``; returns its sha256 for the envelope."""
    path = _path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return sha256_hex(token)


def deploy_token(run_id: str) -> str:
    path = _path(run_id)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise RlfleetError(
            f"no token for deployment {run_id} on this machine: a deployment's token is kept only where it was "
            f"submitted ({path.parent}), and removed when the deployment ends"
        ) from None


def revoke_deploy_token(run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(run_id).unlink()


def new_deployment_token(name: str) -> str:
    """Make and store the token of the named deployment ``name``; returns its sha256 (the registry's copy)."""
    return new_deploy_token(_deployment_key(name))


def deployment_token(name: str) -> str:
    return deploy_token(_deployment_key(name))


def has_deployment_token(name: str) -> bool:
    return _path(_deployment_key(name)).is_file()


def revoke_deployment_token(name: str) -> None:
    revoke_deploy_token(_deployment_key(name))
