"""Target fixtures for the conformance suite: one list of scenarios, run unchanged on every target.

A scenario (test_scenarios.py) only talks to a :class:`ConformanceTarget`: the rlfleet ``Target``
it submits to, plus the few things that differ by nature between targets and that a user would
do with that target's own tools:

- ``own_store``: the artifact root as the target's store itself holds it (local disk, the NAS
  path on the node, later ``s3://`` through moto and ``gs://`` through the GCS emulator);
- ``monitored(run_id)``: the run's training metrics where that target's monitoring reads them;
- ``trainer_pids(run_id)``: the run's trainer processes (to SIGKILL them);
- ``head_down()``: the cluster's head really stopped, then started again.

Targets are session-scoped and built once: ``local`` wraps tests/conftest.py's ``local_cluster``,
``onprem`` wraps the one throwaway host of the test run (tests/onprem/session.py). Adding a target
(the ``aws-node`` / ``gcp-node`` throwaway hosts started from the rendered cloud bootstrap, with
moto / the GCS emulator as cloud APIs) is one more entry in TARGETS, one more
``conformance_<key>`` fixture and a subclass; the scenarios do not change.

Results: each scenario x target outcome and duration is collected; with
``RLFLEET_CONFORMANCE_TABLE=<file.md>`` the session writes the markdown table that
docs/conformance.md carries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .targets import ConformanceTarget, LocalConformance, OnpremConformance, wait_jobs_api

TARGETS = [
    pytest.param("local", id="local"),
    # the first onprem scenario also boots and converges the session's host: 3-6 min here, over
    # 15 min when several test sessions share the machine, so more than the default 900 s
    pytest.param("onprem", id="onprem", marks=[pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400)]),
    # throwaway hosts booted from the AWS program's rendered user data, moto + IMDS as the cloud
    # (awsnode.py): installing the kit on two hosts takes minutes, so the same room as onprem
    pytest.param("aws-node", id="aws-node", marks=[pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400)]),
    # throwaway hosts started from the GCP program's rendered startup-script, the GCS emulator,
    # a Secret Manager endpoint and the GCE metadata server as the cloud (gcpnode.py)
    pytest.param("gcp-node", id="gcp-node", marks=[pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400)]),
]


@pytest.fixture(scope="session")
def conformance_local(local_cluster, tmp_path_factory) -> ConformanceTarget:
    from rlfleet.local import local_target

    tgt = local_target()
    return LocalConformance(key="local", target=tgt, own_store=tgt.artifact_root,
                            cache={"tmp": str(tmp_path_factory.mktemp("conformance-local"))})


@pytest.fixture(scope="session")
def conformance_onprem(onprem, tmp_path_factory) -> ConformanceTarget:
    from onprem.harness import playbook

    from rlfleet.provisioners import ansible_site
    from rlfleet.targets import save_target

    host = onprem.host
    if not host.path("/opt/rlfleet/venv").exists():  # tests/onprem/test_site.py tore it down earlier
        r = playbook(onprem.site, onprem.workdir, "site.yml")
        assert r.rc == 0, r.output[-3000:]
    nas = "/mnt/rlfleet/rlfleet"
    # the target exactly as 'rlfleet target add onprem --inventory ...' builds it; this machine reads
    # the NAS directory through the container's root filesystem (no NFS in this kernel)
    target = ansible_site.target_from(
        "onprem-conformance",
        inventory=str(onprem.site.inventory),
        vault_password_file=str(onprem.site.vault_password_file),
        client_artifact_root=f"file://{host.path(nas)}",
        env_vars={"RLFLEET_METRICS_LINGER_S": "12"},  # a 5 s scrape interval sees short runs
    )
    save_target(target)  # the CLI scenarios name it with --target
    ct = OnpremConformance(key="onprem", target=target, own_store=f"file://{host.path(nas)}", timeout=600,
                           cache={"tmp": str(tmp_path_factory.mktemp("conformance-onprem"))})
    ct.host = host
    return ct


def say(request: pytest.FixtureRequest, line: str) -> None:
    """A line on the terminal even under pytest's output capture (fixture timings), and among the
    figures of the next test (tests/said.py)."""
    import said

    said.PENDING.append(line.strip())
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(line, flush=True)


def _cloud_node_cluster(request, key: str, start_cluster):
    """A cloud-node cluster (head + 1 worker) for the session, its timings printed, stopped at the end."""
    from onprem.session import _preconditions

    _preconditions()
    workdir = Path(tempfile.mkdtemp(prefix=f"rlfleet-{key.replace('-', '')}-"))
    try:
        cluster = start_cluster(workdir, workers=1)  # stops what it started when it fails
        say(request, f"\n[{key}] cluster timings (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in cluster.timings.items()))
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def aws_node_cluster(request):
    from .awsnode import start_cluster

    yield from _cloud_node_cluster(request, "aws-node", start_cluster)


@pytest.fixture(scope="session")
def conformance_aws_node(aws_node_cluster, tmp_path_factory, request) -> Iterator[ConformanceTarget]:
    from rlfleet.provisioners.pulumi_stack import target_from_outputs
    from rlfleet.targets import save_target

    from .awsnode import AwsNodeConformance, MetricsForwarder

    cl = aws_node_cluster
    # this machine reaches the cloud as a user would: credentials, region and moto as endpoint
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": cl.cloud.endpoint}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    forwarder = None
    t0 = time.monotonic()
    try:
        # the target exactly as 'rlfleet target add aws --outputs-file' builds it from the stack outputs
        target = target_from_outputs("aws-node-conformance", cl.rendered.outputs, kind="aws", wait_for_ca=60)
        save_target(target)
        # the head's Ray may need a restart or two to start on a loaded machine (its unit restarts
        # on failure): the target is handed over once its Jobs API answers, as after 'pulumi up'
        wait_jobs_api(target, timeout=900)
        forwarder = MetricsForwarder(cl, f"rlfleet/{cl.rendered.stack}").start()
        ct = AwsNodeConformance(key="aws-node", target=target, own_store=target.artifact_root, timeout=600,
                                cache={"tmp": str(tmp_path_factory.mktemp("conformance-aws-node"))})
        ct.cluster, ct.forwarder = cl, forwarder
        say(request, f"[aws-node] target ready (CA fetched, Jobs API answering) in {time.monotonic() - t0:.0f} s")
        yield ct
    finally:
        if forwarder is not None:
            forwarder.stop()
        mp.undo()


@pytest.fixture(scope="session")
def gcp_node_cluster(request):
    from .gcpnode import start_cluster

    yield from _cloud_node_cluster(request, "gcp-node", start_cluster)


@pytest.fixture(scope="session")
def conformance_gcp_node(gcp_node_cluster, tmp_path_factory, request) -> Iterator[ConformanceTarget]:
    from rlfleet.provisioners.pulumi_stack import target_from_outputs
    from rlfleet.targets import save_target

    from .gcpnode import GcpNodeConformance, OpsAgentScraper

    cl = gcp_node_cluster
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("conformance-gcp-node")
    # this machine reads the bucket through the emulator; the client's token source is a 0600 file
    # (the SDK's gcp-secret source speaks gRPC to Secret Manager, which has no local stand-in here)
    token_file = tmp / "ray_token"
    token_file.write_text(cl.token)
    token_file.chmod(0o600)
    storage = {"endpoint_url": cl.cloud.storage_endpoint, "token": "anon"}
    built = target_from_outputs("gcp-node-conformance", cl.rendered.outputs, kind="gcp", storage_options=storage,
                                wait_for_ca=60)
    target = built.model_copy(update={"token_source": f"file:{token_file}",
                                      "env_vars": {"RLFLEET_METRICS_LINGER_S": "20"}})  # 15 s scrapes
    save_target(target)
    wait_jobs_api(target, timeout=900)
    scraper = OpsAgentScraper(cl).start()
    say(request, f"[gcp-node] target ready (CA fetched, Jobs API answering) in {time.monotonic() - t0:.0f} s")
    try:
        ct = GcpNodeConformance(key="gcp-node", target=target, own_store=target.artifact_root,
                                storage_options=storage, timeout=600, cache={"tmp": str(tmp)})
        ct.cluster, ct.monitoring = cl, scraper
        yield ct
    finally:
        scraper.stop()


# -- the parametrization every scenario uses -------------------------------------------------------

@pytest.fixture(scope="session", params=TARGETS)
def tgt(request) -> Iterator[ConformanceTarget]:
    ct = request.getfixturevalue("conformance_" + request.param.replace("-", "_"))
    yield ct
    # pytest runs a session param's tests together: when the session moves on to the next target,
    # a cloud target's hosts go (they would slow every later run on this 2-core machine)
    ct.release()


# -- results table ---------------------------------------------------------------------------------

_RESULTS: dict[tuple[str, str], tuple[str, float]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/conformance/" not in report.nodeid.replace(os.sep, "/") or "[" not in report.nodeid:
        return
    scenario, key = report.nodeid.split("::")[-1][:-1].split("[", 1)
    outcome, secs = _RESULTS.get((scenario, key), ("passed", 0.0))
    secs += report.duration
    if report.failed:
        outcome = "xfail" if hasattr(report, "wasxfail") else "FAILED" if report.when == "call" else "ERROR"
    elif hasattr(report, "wasxfail"):
        outcome = "xfail" if report.skipped else "XPASS"
    elif report.skipped:
        outcome = "skipped"
    _RESULTS[(scenario, key)] = (outcome, secs)


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("RLFLEET_CONFORMANCE_TABLE")
    if not out or not _RESULTS or hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes it
        return
    keys = [k for k in (p.values[0] for p in TARGETS) if any(k == t for _, t in _RESULTS)]
    scenarios = list(dict.fromkeys(s for s, _ in _RESULTS))
    lines = ["| scenario | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for s in scenarios:
        cells = []
        for k in keys:
            outcome, secs = _RESULTS.get((s, k), ("not run", 0.0))
            cells.append(f"{outcome} ({secs:.0f} s)" if outcome != "not run" else outcome)
        lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
    Path(out).write_text("\n".join(lines) + "\n")
