"""Entry point of every run on a target: ``python -m rlfleet_agents.run [SPEC_FILE]``.

Everything the run needs comes in one variable, ``RLFLEET_ENVELOPE``: the SDK's
:class:`rlfleet.envelope.RunEnvelope` (run id, artifact root, spec, source/resume runs, the
deployment token's sha256, ...). The runtime acts on what the SDK decided and never re-checks
facts about the submitting machine. A run submitted by another rlfleet version is refused at once,
naming both versions. A spec file argument replaces the envelope's spec (for debugging by hand).
Other variables: ``RLFLEET_METRICS_LINGER_S`` keeps the process alive this long after the last
metrics (scrapes).

Artifacts: spec.json first; metrics/ segments while running, metrics.jsonl when it ends (see
rlfleet_agents.metrics); checkpoints/; policy.onnx (+ policy.pt, policy_stats.json: rlfleet_agents.drift);
eval.json (eval); endpoint.json (deploy; after it, outside the manifest: serve_status.json and audit/,
rlfleet_agents.servemetrics); manifest.json last, only on success.
On error: one line on stderr (``rlfleet: error: run <id>: ...``), a non-zero exit code, no manifest.

The 'random' agent path imports no torch, so short runs start fast.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from rlfleet.artifacts import RunArtifacts, open_run
from rlfleet.envelope import EnvelopeError, RunEnvelope
from rlfleet.errors import IncompleteRunError, RlfleetError
from rlfleet.spec import Kind, RunSpec
from rlfleet_agents.registry import config_to_dict, get_agent, learners

EXIT_ERROR = 1
EXIT_TERMINATED = 143
# a run's own store operations (checkpoints, manifest, sources) ride out store outages this long
STORE_RETRY_S = 300.0


class RunError(Exception):
    """A failure with a message meant for the user."""


class Stopped(Exception):
    """The run was asked to stop (SIGTERM: a cancel) before its commit point: it commits nothing."""


@dataclass
class RunContext:
    envelope: RunEnvelope
    spec: RunSpec
    arts: RunArtifacts | None = None
    stop_requested: bool = False
    sources: dict[str, str | None] | None = None  # sha256 of environment.txt / code.zip (rlfleet_agents.provenance)

    @classmethod
    def from_env(cls, argv: list[str]) -> RunContext:
        envelope = RunEnvelope.from_env(os.environ)
        spec = RunSpec.from_file(argv[0]) if argv else envelope.spec
        return cls(envelope=envelope, spec=spec)

    @property
    def run_id(self) -> str:
        return self.envelope.run_id

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.envelope.storage_options

    @property
    def target(self) -> str:
        return self.envelope.target

    @property
    def labels(self) -> dict[str, str]:
        from rlfleet_agents.distributed import node_address

        return {"run_id": self.run_id, "kind": self.spec.kind.value, "env": self.spec.env, "target": self.target,
                "node": node_address()}

    def open_other(self, uri: str) -> RunArtifacts:
        return open_run(uri, storage_options=self.storage_options, retry_s=STORE_RETRY_S)

    def check_stop(self) -> None:
        """Raise Stopped if a stop was asked for (a deploy run commits as it starts: never)."""
        if self.stop_requested and self.spec.kind != Kind.DEPLOY:
            raise Stopped("stopped before its commit: no manifest (a cancelled run never reads as complete)")

    def commit(self, extra: dict[str, Any]) -> None:
        """Write manifest.json with ``extra`` and the run's provenance (the commit point)."""
        from rlfleet_agents.provenance import provenance

        assert self.arts is not None and self.sources is not None
        self.check_stop()
        self.arts.commit(extra=extra, provenance=provenance(self.envelope, self.spec, self.sources,
                                                           str(extra.get("device", "cpu"))))


def _device_label() -> str:
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def _common_extra(ctx: RunContext, start: float) -> dict[str, Any]:
    wall = time.monotonic() - start
    return {"kind": ctx.spec.kind.value, "agent": ctx.spec.agent, "env": ctx.spec.env,
            "wall_time_s": round(wall, 3), "gpu_hours": round(ctx.spec.resources.gpus * wall / 3600, 6),
            "target": ctx.target}


# ---------------------------------------------------------------------------------------------
# train


def run_train(ctx: RunContext, start: float) -> int:
    from rlfleet_agents.metrics import MetricsWriter

    spec, arts = ctx.spec, ctx.arts
    assert arts is not None
    if get_agent(spec.agent).algorithm is None:  # the random baseline: no learner, no torch, no policy
        from rlfleet_agents.metrics import METRICS_CONNECT_AFTER_S
        from rlfleet_agents.random_agent import run_random

        # often a run of a second or two (a smoke test, a queue test): no Ray connection for that
        writer = MetricsWriter(arts, ctx.labels, ray_connect_after_s=METRICS_CONNECT_AFTER_S)

        summary = run_random(spec.env, spec.env_kwargs, spec.seed, spec.budget.steps, spec.budget.minutes,
                             writer.write, lambda: ctx.stop_requested)
        writer.close()
        if ctx.stop_requested:
            return EXIT_TERMINATED
        arts.write_json("eval.json", {**summary, "policy": "random", "policy_sha256": None,
                                      "env": spec.env, "seed": spec.seed})
        extra = {**_common_extra(ctx, start), "env_steps": summary["env_steps"], "device": "cpu",
                 "final_eval": {k: summary[k] for k in ("episodes", "mean", "std", "min", "max")}}
        ctx.commit(extra)
        return 0

    writer = MetricsWriter(arts, ctx.labels)
    import numpy as np

    from rlfleet_agents.checkpoint import load_latest, save_checkpoint
    from rlfleet_agents.drift import STATS_FILE, StatsRecorder, compute_stats
    from rlfleet_agents.evaluate import evaluate
    from rlfleet_agents.export import check_parity, export_onnx, sample_observations, sha256
    from rlfleet_agents.policy import OnnxPolicy
    from rlfleet_agents.trainer import make_algorithm, train

    algo = make_algorithm(spec.agent, spec.env, spec.env_kwargs, spec.seed, spec.config,
                          spec.budget.steps, spec.resources.gpus)
    resumed_from = None
    if ctx.envelope.resume_uri:
        src = ctx.open_other(ctx.envelope.resume_uri)
        state = load_latest(src)
        if state.get("meta", {}).get("agent") not in (None, spec.agent):
            raise RunError(f"resume_from: run {src.run_id} trained agent {state['meta']['agent']!r}, "
                           f"not {spec.agent!r}")
        algo.load_state_dict(state)
        resumed_from = {"run_id": src.run_id, "step": algo.global_step}
        print(f"resuming from run {src.run_id} at step {algo.global_step}", flush=True)
        if src.run_id == ctx.run_id:  # a restart of this run (its supervisor): its rows so far stay
            writer.carry_over(algo.global_step)
    writer.set_start_step(algo.global_step)
    tb = _tensorboard_log(ctx, algo)
    ml = _mlflow_log(ctx, algo)
    ckpt_meta = {"agent": spec.agent, "env": spec.env, "run_id": ctx.run_id}

    def on_checkpoint(a: Any) -> None:
        save_checkpoint(arts, a, ckpt_meta)

    def on_row(row: dict[str, Any]) -> None:
        writer.write(row)
        tb.write(row)
        if ml is not None:
            ml.write(row)

    try:
        res = train(algo, total_steps=algo.total_steps, minutes=spec.budget.minutes, env_kwargs=spec.env_kwargs,
                    on_row=on_row, on_checkpoint=on_checkpoint, should_stop=lambda: ctx.stop_requested)
        if res.stopped_by == "signal" and ml is not None:
            ml.end("KILLED")  # first: Ray sends SIGKILL a few seconds after SIGTERM
        save_checkpoint(arts, algo, ckpt_meta)
        if res.stopped_by == "signal":
            writer.close()
            print(f"stopped at step {algo.global_step}; checkpoint saved for resume_from", file=sys.stderr)
            return EXIT_TERMINATED
        # export the policy the run reports (best in-training evaluation, else the last)
        policy = res.policy
        assert policy is not None
        meta = {"env": spec.env, "agent": spec.agent, "run_id": ctx.run_id, "step": res.best_step or res.global_step}
        onnx_bytes = export_onnx(policy, algo.info, meta)
        real_obs = np.asarray(algo.obs, dtype=np.float32)
        parity = check_parity(policy, onnx_bytes, sample_observations(algo.info, 512, spec.seed, real_obs))
        import io

        import torch

        buf = io.BytesIO()
        torch.save({"model": policy.model.state_dict(), "kind": policy.kind, "spaces": algo.info.to_dict(),
                    "agent": spec.agent, "config": config_to_dict(algo.cfg)}, buf)
        arts.write_bytes("policy.pt", buf.getvalue())
        arts.write_bytes("policy.onnx", onnx_bytes)
        ort_policy = OnnxPolicy(onnx_bytes)
        recorder = StatsRecorder(ort_policy.act, seed=spec.seed)  # what the exported policy sees and does
        final = evaluate(recorder, spec.env, algo.cfg.eval_episodes, seed=spec.seed + 99_991,
                         env_kwargs=spec.env_kwargs)
        arts.write_json(STATS_FILE, compute_stats(
            *recorder.sample(), action_kind=algo.info.action_kind, n_actions=algo.info.n_actions,
            order=recorder.order(), seen=recorder.seen,
            source=f"final evaluation of policy.onnx: {final['episodes']} episodes of {spec.env}, "
                   f"{min(recorder.seen, recorder.cap)} of {recorder.seen} observations (uniform sample)"))
        writer.close()
        ctx.check_stop()  # before the trackers record the run as finished
        tb.close(final["mean"], res.global_step)
        tracked = {"mlflow": ml.close(final["mean"], res.global_step, onnx_bytes)} if ml is not None else {}
        extra = {
            **_common_extra(ctx, start),
            "env_steps": res.global_step,
            "device": str(algo.device) if str(algo.device) == "cpu" else _device_label(),
            "train_wall_time_s": round(res.wall_time_s, 3),
            "eval_time_s": round(res.eval_time_s, 3),
            "stopped_by": res.stopped_by,
            "policy_sha256": sha256(onnx_bytes),
            "policy_step": meta["step"],
            "parity": parity,
            "final_eval": {k: final[k] for k in ("episodes", "mean", "std", "min", "max")},
            "evals": res.evals,
            "solved_step": res.solved_step,
            "resumed_from": resumed_from,
            "ray_metrics": _ray_metrics_state(writer),
            **tracked,
        }
        ctx.commit(extra)
        if ml is not None:
            ml.end("FINISHED")  # only now: a stop before the commit leaves it KILLED (the finally below)
        print(f"done: {res.global_step} steps in {res.wall_time_s:.1f} s, eval mean {final['mean']:.1f}", flush=True)
        return 0
    finally:
        tb.discard()
        if ml is not None:  # no-op after close(); else the run stopped or failed
            ml.end("KILLED" if ctx.stop_requested else "FAILED")
        algo.close()


def _hparams(ctx: RunContext, algo: Any) -> dict[str, Any]:
    """The run's hyperparameters as TensorBoard and MLflow get them: the resolved config, agent, env,
    seed, and the budget the run trains for (spec.budget.steps over the config's total_steps)."""
    spec = ctx.spec
    return {**config_to_dict(algo.cfg), "agent": spec.agent, "env": spec.env, "seed": spec.seed,
            "total_steps": algo.total_steps}


def _mlflow_log(ctx: RunContext, algo: Any) -> Any:
    """The run's MLflow log when its envelope names a tracking server, else None."""
    tracking = ctx.envelope.tracking
    if tracking is None or not tracking.mlflow_uri:
        return None
    from rlfleet_agents.mlflowlog import MlflowLog

    sources = ctx.sources or {}
    tags = {**ctx.spec.tags, "mlflow.runName": ctx.spec.label, "rlfleet.run_id": ctx.run_id,
            "rlfleet.target": ctx.target, "rlfleet.kit_version": ctx.envelope.kit_version,
            "rlfleet.code_sha256": str(sources.get("code_sha256") or "none"),
            "rlfleet.packages_sha256": str(sources.get("packages_sha256"))}
    return MlflowLog(tracking, _hparams(ctx, algo), tags)


def _tensorboard_log(ctx: RunContext, algo: Any) -> Any:
    """The run's TensorBoard log, headed with its hyperparameters, kit version and hashes."""
    from rlfleet_agents.tblog import TensorBoardLog

    spec = ctx.spec
    hparams = _hparams(ctx, algo)
    sources = ctx.sources or {}
    text = {"rlfleet/kit_version": ctx.envelope.kit_version, "rlfleet/run_id": ctx.run_id,
            "rlfleet/code_sha256": str(sources.get("code_sha256") or "none (no code: directory)"),
            "rlfleet/packages_sha256": str(sources.get("packages_sha256")),
            "rlfleet/spec": "```\n" + spec.to_json() + "\n```"}
    return TensorBoardLog(ctx.arts, hparams, text)  # type: ignore[arg-type]


def _ray_metrics_state(writer: Any) -> dict[str, Any] | None:
    r = writer.ray
    if not r.enabled:
        return None
    return {"connected": r.ready.is_set(), "connect_s": None if r.connect_s is None else round(r.connect_s, 3),
            "error": r.failed}


# ---------------------------------------------------------------------------------------------
# eval


def _open_source(ctx: RunContext, what: str) -> RunArtifacts:
    if not ctx.envelope.source_uri:
        raise RunError(f"a {what} run needs a source run (the run to {what})")
    src = ctx.open_other(ctx.envelope.source_uri)
    if not src.is_complete():
        raise IncompleteRunError(
            f"cannot {what} run {src.run_id}: it is incomplete (no manifest.json in {src.uri}); "
            "it failed, was cancelled or is still running. Use a run that finished (status SUCCEEDED)"
        )
    if "policy.onnx" not in src.manifest().files:
        raise RunError(f"cannot {what} run {src.run_id}: it has no policy.onnx "
                       f"(only {' and '.join(learners())} train runs export a policy)")
    if ctx.envelope.env_from_source:
        # the submitter could not read the store: take the env the source trained on
        src_spec = RunSpec.from_dict(src.read_json("spec.json"))
        ctx.spec = ctx.spec.with_changes(env=src_spec.env, env_kwargs=src_spec.env_kwargs)
        assert ctx.arts is not None
        ctx.arts.write_text("spec.json", ctx.spec.to_json())
    return src


def _load_torch_act(src: RunArtifacts) -> Any:
    import io

    import torch

    from rlfleet_agents.envs import SpaceInfo
    from rlfleet_agents.networks import DeterministicPolicy, torch_act_fn

    state = torch.load(io.BytesIO(src.read_bytes("policy.pt")), map_location="cpu", weights_only=True)
    info = SpaceInfo.from_dict(state["spaces"])
    model = get_agent(state["agent"]).load_algorithm().policy_network(info, state["config"])
    model.load_state_dict(state["model"])
    return torch_act_fn(DeterministicPolicy(model, state["kind"]), torch.device("cpu"))


def run_eval(ctx: RunContext, start: float) -> int:
    from rlfleet_agents.envs import make_env, space_info
    from rlfleet_agents.evaluate import evaluate
    from rlfleet_agents.policy import OnnxPolicy

    src = _open_source(ctx, "evaluate")
    spec, arts = ctx.spec, ctx.arts
    assert arts is not None
    onnx_bytes = src.read_bytes("policy.onnx")
    policy = OnnxPolicy(onnx_bytes)
    probe = make_env(spec.env, spec.env_kwargs)
    info = space_info(probe.observation_space, probe.action_space, spec.env)
    probe.close()
    policy.check_env(info.obs_shape, info.action_kind, info.n_actions, spec.env)
    act = policy.act if spec.eval.policy_format == "onnx" else _load_torch_act(src)
    result = evaluate(act, spec.env, spec.eval.episodes, seed=spec.seed, env_kwargs=spec.env_kwargs)
    out: dict[str, Any] = {**result, "policy_sha256": policy.sha256, "policy_format": spec.eval.policy_format,
                           "source_run": src.run_id, "env": spec.env, "seed": spec.seed}
    if spec.eval.compare_to:
        other = ctx.open_other(f"{src.store.root_uri}/runs/{spec.eval.compare_to}")
        if not other.is_complete():
            raise IncompleteRunError(f"eval.compare_to: run {other.run_id} is incomplete (no manifest.json)")
        theirs = other.read_json("eval.json")
        out["compare"] = {"run_id": other.run_id, "mean": theirs["mean"], "std": theirs["std"],
                          "episodes": theirs["episodes"], "mean_diff": result["mean"] - theirs["mean"],
                          "better": result["mean"] > theirs["mean"]}
    arts.write_json("eval.json", out)
    extra = {**_common_extra(ctx, start), "env_steps": int(sum(result["lengths"])), "device": "cpu",
             "source_run": src.run_id, "policy_sha256": policy.sha256,
             "final_eval": {k: result[k] for k in ("episodes", "mean", "std", "min", "max")}}
    ctx.commit(extra)
    print(f"eval of {src.run_id}: mean {result['mean']:.2f} ± {result['std']:.2f} over "
          f"{result['episodes']} episodes", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# deploy


def run_deploy(ctx: RunContext, start: float) -> int:
    from rlfleet_agents.policy import OnnxPolicy
    from rlfleet_agents.serve import PolicyApp, bind_socket, serve_forever
    from rlfleet_agents.servemetrics import observer_for_run

    src = _open_source(ctx, "deploy")
    spec, arts = ctx.spec, ctx.arts
    assert arts is not None
    token_sha256 = ctx.envelope.serve_token_sha256
    if not token_sha256:
        raise RunError("a deploy run needs its deployment token's sha256 in the envelope; submit it with submit_run()")
    policy = OnnxPolicy(src.read_bytes("policy.onnx"))
    name = spec.deploy.name or spec.name or src.run_id.lower()
    # metrics, drift, audit log: version = the source run, replica = this run (a bare deploy run)
    observer = observer_for_run(arts, src, policy, run_labels=ctx.labels, deployment=name, version=src.run_id,
                                replica=ctx.run_id, audit_rate=spec.deploy.audit_rate)
    app = PolicyApp(policy, name, token_sha256, observer=observer)
    # The node's TLS front (on-prem: set in the Ray unit by ansible, inherited by every job): nginx
    # serves https://<address>:<p> for a server on 127.0.0.1:<p>; plain http stays on loopback.
    front_host = os.environ.get("RLFLEET_SERVE_TLS_ADDRESS", "").strip()
    front_ports = [int(p) for p in os.environ.get("RLFLEET_SERVE_TLS_PORTS", "").split(",") if p.strip()]
    if front_host and front_ports:
        if spec.deploy.host != "127.0.0.1":
            raise RunError(f"deploy.host {spec.deploy.host}: on this target the policy server binds 127.0.0.1 and "
                           f"is reached over TLS through the node's front at {front_host}; remove deploy.host")
        if spec.deploy.port and spec.deploy.port not in front_ports:
            raise RunError(f"deploy.port {spec.deploy.port} is not one of this node's deploy ports {front_ports} "
                           "(tls_front_serve_ports); remove deploy.port or pick one of them")
        wanted = [spec.deploy.port] if spec.deploy.port else (
            [p for p in ctx.envelope.serve_ports if p in front_ports] or front_ports)
        sock = None
        for p in wanted:  # never a port outside the front: it would not be reachable
            try:
                sock = bind_socket("127.0.0.1", p, [])
                break
            except OSError:
                continue
        if sock is None:
            raise RunError(f"all deploy ports {wanted} of node {front_host} are in use: cancel a deployment, "
                           "or add ports to tls_front_serve_ports and converge")
    else:
        sock = bind_socket(spec.deploy.host, spec.deploy.port, list(ctx.envelope.serve_ports))
    host, port = sock.getsockname()[:2]
    wildcard = host in ("0.0.0.0", "::")  # noqa: S104 - detecting it, not binding it
    url_host = front_host if front_host and front_ports else (
        socket.gethostbyname(socket.gethostname()) if wildcard else host)
    if ":" in url_host:
        url_host = f"[{url_host}]"
    scheme = "https" if front_host and front_ports else "http"
    endpoint = {"url": f"{scheme}://{url_host}:{port}", "path": app.path, "policy": name,
                "policy_sha256": policy.sha256, "pid": os.getpid(), "source_run": src.run_id}

    def started() -> None:
        arts.write_json("endpoint.json", endpoint)
        ctx.commit({**_common_extra(ctx, start), "source_run": src.run_id,
                    "policy_sha256": policy.sha256, "endpoint": endpoint, "device": "cpu"})
        print(f"serving {name} at {endpoint['url']}{app.path}", flush=True)

    try:
        serve_forever(app, sock, on_started=started)
    finally:
        observer.close()
    print(f"policy server stopped after {app.requests} requests", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    start = time.monotonic()
    ctx: RunContext | None = None
    try:
        ctx = RunContext.from_env(argv)
        if ctx.spec.code is None and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        if ctx.spec.kind != Kind.DEPLOY:

            def _on_term(signum: int, frame: Any) -> None:
                assert ctx is not None
                if ctx.stop_requested:
                    raise KeyboardInterrupt
                ctx.stop_requested = True

            signal.signal(signal.SIGTERM, _on_term)
        ctx.arts = open_run(ctx.envelope.artifact_root, ctx.run_id, storage_options=ctx.storage_options,
                            retry_s=STORE_RETRY_S)
        if ctx.arts.is_complete():
            raise RunError(f"run {ctx.run_id} already committed a manifest in {ctx.arts.uri}; use a new run id")
        ctx.arts.write_text("spec.json", ctx.spec.to_json())
        from rlfleet_agents.provenance import write_sources

        ctx.sources = write_sources(ctx.arts, ctx.spec)
        if ctx.spec.kind == Kind.TRAIN:
            return run_train(ctx, start)
        if ctx.spec.kind == Kind.EVAL:
            return run_eval(ctx, start)
        return run_deploy(ctx, start)
    except KeyboardInterrupt:
        print("rlfleet run interrupted", file=sys.stderr)
        return EXIT_TERMINATED
    except Stopped as stop:
        print(f"rlfleet run {stop}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except (RunError, RlfleetError, EnvelopeError, ValueError, OSError) as err:
        _fail(ctx, str(err))
        return EXIT_ERROR
    except Exception as err:
        _fail(ctx, f"{type(err).__name__}: {err}")
        if os.environ.get("RLFLEET_DEBUG"):
            raise
        return EXIT_ERROR


def _fail(ctx: RunContext | None, msg: str) -> None:
    """One line on stderr, in the CLI's format (the SDK's Run.failure_reason() reads it)."""
    run_id = ctx.run_id if ctx is not None else None
    rid = f"run {run_id}: " if run_id else ""
    print(f"rlfleet: error: {rid}{' '.join(msg.split())}", file=sys.stderr, flush=True)

if __name__ == "__main__":
    sys.exit(main())
