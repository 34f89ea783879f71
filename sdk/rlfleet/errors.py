"""One error hierarchy. Every message says what went wrong and what to do next.

The CLI prints ``str(err)`` on one line and exits with ``err.exit_code``; a traceback
is shown only with ``--debug``.
"""

from __future__ import annotations


class RlfleetError(Exception):
    """Base class for every error rlfleet raises on purpose (user-facing)."""

    exit_code = 1


class SpecError(RlfleetError):
    """A RunSpec (or a CLI flag that feeds one) is invalid. Raised before anything is submitted."""

    exit_code = 2


class ConfigError(RlfleetError):
    """The targets file, a provisioner's config or an inventory is invalid."""

    exit_code = 2


class TargetNotFound(RlfleetError):
    """No target with that name is configured."""

    exit_code = 2


class ClusterUnreachable(RlfleetError):
    """The target's Ray cluster does not answer."""

    exit_code = 3


class AuthError(RlfleetError):
    """The cluster refused our credentials (missing or wrong token)."""

    exit_code = 3


class RunNotFound(RlfleetError):
    """No run with that id exists on the target."""

    exit_code = 4


class RunFailed(RlfleetError):
    """A run the caller waited for ended FAILED or CANCELLED."""

    exit_code = 5


class ArtifactError(RlfleetError):
    """Reading or writing run artifacts failed."""

    exit_code = 6


class IncompleteRunError(ArtifactError):
    """The run has no manifest.json: it never committed its artifacts."""


class TamperedRunError(ArtifactError):
    """A file's content no longer matches the sha256 in the run's manifest."""


class StoreUnavailable(ArtifactError):
    """The artifact store kept failing after all retries."""


class ProvisionerError(RlfleetError):
    """Pulumi / Ansible could not run or reported a failure."""

    exit_code = 7


class LeftoversFound(RlfleetError):
    """Teardown finished but resources tagged for the stack are still there."""

    exit_code = 8


class ConfirmationRequired(RlfleetError):
    """A destructive action needs --yes (no TTY to ask on)."""

    exit_code = 2
