"""The one place that knows the target kinds: kind -> provisioner, reference type and the few
facts that differ between kinds. Every other module asks here (no ``target.kind == ...`` elsewhere;
tests/sdk/test_module_structure.py checks it).

A provisioner is a module implementing :class:`Provisioner` with module-level functions (heavy
imports such as pulumi or ansible_runner happen inside them, never at import time):

=================  ========================================================================
``target_from``    build a Target from what the provisioner knows (stack outputs, inventory);
                   options are the ``rlfleet target add`` flags
``up``             create or update the infrastructure; idempotent; returns the target as it is
``ready``          make the target reachable for a run (the local head starts here)
``plan_destroy``   describes what ``destroy`` would remove (``--dry-run``); changes nothing
``destroy``        remove what it created; keeps artifact data unless ``delete_data``; idempotent
``sweep``          the tag sweep of a cloud stack (scan + remove), or None
``scan_leftovers`` after destroy: what the kit created that is still there; empty means clean
``cost_inputs``    what a cost estimate reads, or ConfigError when there is nothing to price
=================  ========================================================================

Adding a target kind: a provisioner module, a reference model in :mod:`.refs`, a row in
:data:`KINDS` and the kind in :data:`TargetKind` (docs/architecture.md lists the files).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, get_args

from rlfleet.errors import ClusterUnreachable, ConfigError, RlfleetError
from rlfleet.provisioners.refs import AnsibleRef, LocalRef, NoRef, PulumiRef, parse_ref

if TYPE_CHECKING:
    from rlfleet.targets import Target
    from rlfleet.teardown import Leftover
    from rlfleet.teardown.sweep import StackSweep

TargetKind = Literal["local", "aws", "gcp", "onprem", "ray"]
Echo = Callable[[str], None]
AnyRef = PulumiRef | AnsibleRef | LocalRef | NoRef
R = TypeVar("R", PulumiRef, AnsibleRef, LocalRef, NoRef)


@dataclass(frozen=True)
class CostInputs:
    """What a cost estimate of a cloud stack reads: the cloud's price table and the stack config."""

    cloud: str  # aws | gcp: the section of prices.yaml and the stack config's namespace
    project_dir: str
    stack: str


class Provisioner(Protocol):
    def target_from(self, name: str, **options: Any) -> Target: ...
    def up(self, target: Target, *, echo: Echo) -> Target: ...
    def ready(self, target: Target) -> Target: ...
    def plan_destroy(self, target: Target, *, delete_data: bool) -> list[str]: ...
    def destroy(self, target: Target, *, delete_data: bool, echo: Echo) -> None: ...
    def sweep(self, target: Target) -> StackSweep | None: ...
    def scan_leftovers(self, target: Target) -> list[Leftover]: ...
    def cost_inputs(self, target: Target) -> CostInputs: ...


@dataclass(frozen=True)
class KindSpec:
    ref: type[AnyRef]  # the provisioner reference a target of this kind records
    module: str  # its provisioner (for an unmanaged kind: a module with target_from only)
    managed: bool = True  # rlfleet provisions it and tears it down
    embedded: bool = False  # the local head: started on submit, rebuilt from its state (never saved)
    billable: bool = False  # 'rlfleet up' shows a cost estimate and asks first
    teardown: str | None = None  # the cloud's tag-sweep module (rlfleet.teardown.<cloud>)
    head_front: bool = False  # deploy runs go to the head: it runs the TLS front of the deploy ports
    supervisor: str | None = None  # module running the target's run supervisor (queue, restarts), if any
    # no supervisor of ours to start, but a cluster may run one: supervised while its heartbeat in
    # the target's store (queue/supervisor.json) is fresh
    announced_supervisor: bool = False
    # what a user does when that heartbeat is missing or stale
    supervisor_hint: str = "start one on the cluster (python -m rlfleet.supervisor)"


# the cloud head's bootstrap runs the supervisor as the rlfleet-supervisor unit, its queue and
# heartbeat in the stack's bucket (infra_cloud/shared/rlfleet_cloud/files/bootstrap.sh)
_CLOUD_HINT = ("start it on the head ('systemctl start rlfleet-supervisor'; the head's bootstrap installs it: "
               "a head booted before that needs 'rlfleet up' and a new head, docs/scale-out.md) and check that "
               "this machine can read the bucket")

KINDS: dict[str, KindSpec] = {
    "local": KindSpec(LocalRef, "rlfleet.provisioners.local", embedded=True,
                      supervisor="rlfleet.provisioners.local_supervisor"),
    "aws": KindSpec(PulumiRef, "rlfleet.provisioners.pulumi_stack", billable=True, teardown="rlfleet.teardown.aws",
                    head_front=True, announced_supervisor=True, supervisor_hint=_CLOUD_HINT),
    "gcp": KindSpec(PulumiRef, "rlfleet.provisioners.pulumi_stack", billable=True, teardown="rlfleet.teardown.gcp",
                    head_front=True, announced_supervisor=True, supervisor_hint=_CLOUD_HINT),
    # site.yml runs the supervisor as the rlfleet-supervisor unit on the head (ray_runtime role)
    "onprem": KindSpec(AnsibleRef, "rlfleet.provisioners.ansible_site", announced_supervisor=True,
                       supervisor_hint="start it on the head ('systemctl start rlfleet-supervisor'; site.yml "
                       "installs it) and check that this machine sees the NAS (client_artifact_root)"),
    "ray": KindSpec(NoRef, "rlfleet.provisioners.external", managed=False, announced_supervisor=True),
}
if set(KINDS) != set(get_args(TargetKind)):
    raise AssertionError("KINDS and TargetKind must name the same kinds")


def spec(kind: str) -> KindSpec:
    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown target kind {kind!r}; known: {', '.join(KINDS)}") from None


def for_kind(kind: str) -> Provisioner:
    """The provisioner of ``kind`` (ConfigError for a kind rlfleet does not provision)."""
    if not spec(kind).managed:
        managed = sorted(k for k, s in KINDS.items() if s.managed)
        raise ConfigError(
            f"targets of kind {kind!r} have no provisioner (kinds with one: {', '.join(managed)}); "
            "an existing Ray cluster is added with 'rlfleet target add ray --address … --token-file …'"
        )
    return cast(Provisioner, importlib.import_module(KINDS[kind].module))


def provisioner_of(target: Target) -> Provisioner:
    return for_kind(target.kind)


def new_target(kind: str, name: str, **options: Any) -> Target:
    """``rlfleet target add KIND``: the target built by the kind's module from ``options``."""
    target_from: Callable[..., Target] = importlib.import_module(spec(kind).module).target_from
    return target_from(name, kind=kind, **options)


def ref_type_name(cls: type[AnyRef]) -> str:
    """The ``type`` a reference class is saved with (``pulumi``, ``ansible``, ...)."""
    return str(get_args(cls.model_fields["type"].annotation)[0])


def check_ref(kind: str, ref: AnyRef) -> AnyRef:
    """A target's reference must be its kind's type (or none: a hand-written target)."""
    want = spec(kind).ref
    if not isinstance(ref, (want, NoRef)):
        raise ValueError(f"a {kind} target takes a provisioner of type {ref_type_name(want)!r}, not {ref.type!r}")
    return ref


def ref_of(target: Target, cls: type[R]) -> R:
    """The target's provisioner reference as ``cls`` (also for a target copied with a plain mapping)."""
    ref = parse_ref(target.provisioner)
    if not isinstance(ref, cls):
        raise ConfigError(
            f"target {target.name!r} ({target.kind}) has no {ref_type_name(cls)} provisioner reference; "
            "re-create it with 'rlfleet target add'"
        )
    return ref


def ready(target: Target) -> Target:
    """The target ready for a run: the local head is started (or reused), with its run supervisor;
    others as they are."""
    out = provisioner_of(target).ready(target) if spec(target.kind).managed else target
    if spec(target.kind).supervisor:
        importlib.import_module(cast(str, spec(target.kind).supervisor)).ensure_supervisor(out)
    return out


LIVE_CACHE_S = 5.0  # how long one look at a target's supervisor heartbeat is trusted
_live: dict[tuple[str, str], tuple[float, bool]] = {}


def supervised(target: Target) -> bool:
    """Do runs on this target go through the run queue of a supervisor inside the cluster? Kinds
    with a supervisor module always do; a ``ray`` target does while a live supervisor announces
    itself in the target's store (its heartbeat, :meth:`QueueStore.supervisor_live`)."""
    ks = spec(target.kind)
    if ks.supervisor is not None:
        return True
    if not ks.announced_supervisor:
        return False
    key, now = (target.reader_artifact_root, target.ray_address), time.monotonic()
    seen = _live.get(key)
    if seen is None or now - seen[0] > LIVE_CACHE_S:
        from rlfleet.artifacts import ArtifactStore
        from rlfleet.runqueue import QueueStore

        try:  # one attempt: a store that does not answer is not a supervisor
            store = ArtifactStore(target.reader_artifact_root, storage_options=target.storage_options, retries=1)
            live = QueueStore(store).supervisor_live()
        except (RlfleetError, OSError):
            live = False  # the store does not answer: runs go straight to Ray, as without a supervisor
        seen = _live[key] = (now, live)
    return seen[1]


def may_queue(target: Target) -> bool:
    """Could this target's runs be in its run queue (a kind with a supervisor, or one whose cluster
    may announce one)? A run Ray does not know is looked up there even while the heartbeat is stale
    for a moment: a run queued while the supervisor was live must not vanish."""
    ks = spec(target.kind)
    return ks.supervisor is not None or ks.announced_supervisor


def supervisor_missing(target: Target) -> str:
    """Why a run with max_restarts is refused on this target (no supervisor restarts it)."""
    ks = spec(target.kind)
    if ks.announced_supervisor:
        from rlfleet.runqueue import FRESH_S, HEARTBEAT, QUEUE_DIR

        return (f"target {target.name!r} ({target.kind}) has no live run supervisor (none wrote "
                f"{target.reader_artifact_root}/{QUEUE_DIR}/{HEARTBEAT} in the last {FRESH_S:.0f} s); "
                f"{ks.supervisor_hint}, or submit without max_restarts")
    return (f"target {target.name!r} ({target.kind}) runs no run supervisor, which restarts runs; submit "
            "without max_restarts, or to a supervised target (local, or a ray target whose cluster runs one)")


def nudge_supervisor(target: Target) -> None:
    """Tell the target's supervisor a run was queued (where it can be told; else it polls)."""
    mod = spec(target.kind).supervisor
    if mod:
        importlib.import_module(mod).nudge(target)


def sweep_of(target: Target) -> StackSweep | None:
    """The tag sweep of the target's cloud stack, or None for kinds that have none."""
    return provisioner_of(target).sweep(target) if spec(target.kind).teardown else None


def teardown_module(target: Target) -> Any:
    """The tag-sweep module of the target's cloud (rlfleet.teardown.aws | gcp)."""
    mod = spec(target.kind).teardown
    if mod is None:
        raise ConfigError(f"targets of kind {target.kind!r} have no cloud tag sweep")
    return importlib.import_module(mod)


def cost_inputs(target: Target) -> CostInputs:
    if not spec(target.kind).billable:
        raise ConfigError(
            f"target {target.name!r} ({target.kind}) has no cloud stack to price: cost estimates cover "
            "aws and gcp targets created from a Pulumi stack"
        )
    return provisioner_of(target).cost_inputs(target)


def estimate_before_up(target: Target) -> bool:
    """Does 'rlfleet up' show a cost estimate and ask before creating anything?"""
    return spec(target.kind).billable


def saved_after_up(target: Target) -> bool:
    """Is the target written to the targets file after 'rlfleet up'? (The local one never is.)"""
    return not spec(target.kind).embedded


def deploys_on_head_front(target: Target) -> bool:
    """Do deploy runs go to the head node, which serves the deploy ports over TLS (cloud stacks)?"""
    return spec(target.kind).head_front


def head_down_note(target: Target, err: Exception) -> str | None:
    """When the cluster does not answer (or refuses the token): the line said before falling back
    to the runs in the artifact store, or None to let the error stand."""
    if spec(target.kind).embedded:  # no token file / no head: the local head is simply not running
        return "the local Ray head is not running (start it with 'rlfleet local up')"
    return str(err) if isinstance(err, ClusterUnreachable) else None
