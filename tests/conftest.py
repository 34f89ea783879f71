"""Shared, session-scoped fixtures: real services on 127.0.0.1, started once per test run.

- ``moto_server``: a real moto HTTP server (AWS APIs) -> its endpoint URL; state is reset
  between tests by ``moto_reset``.
- ``gcs_emulator``: a real GCS emulator -> its endpoint URL (STORAGE_EMULATOR_HOST is set).
- ``ray_local``: the embedded local target's Ray head (token auth, private network namespace),
  shared by every test that needs a cluster; see tests/sdk/conftest.py.
- ``onprem``: the one throwaway on-prem host of the test run (tests/onprem/session.py), shared by
  tests/onprem and tests/conformance; registered here only, so both get the same host.
- ``multinode``: the one multi-node Ray cluster of the test run (head + worker nodes in their own
  network namespaces, one with a fake GPU; tests/scaleout/multinode.py), in its own RLFLEET_HOME.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import said

# helper modules whose asserts a failing test reports: rewritten like test modules (a bare
# 'AssertionError' in the CI summary said nothing about which check failed)
pytest.register_assert_rewrite("tracking_server")
from onprem.session import onprem  # noqa: E402, F401 - the session fixture, registered once for every directory
from scaleout.multinode import multinode  # noqa: E402, F401 - the same: one multi-node cluster per test run
from tracking_server import _mlflow_servers, mlflow_server  # noqa: E402, F401 - the same: one MLflow tracking server

VENV_BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    """Isolate every test run from the user's own rlfleet state and targets file."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rlfleet-test-"))
    os.environ["RLFLEET_HOME"] = str(base / "home")
    os.environ["XDG_CONFIG_HOME"] = str(base / "config")
    os.environ.pop("RLFLEET_TARGET", None)
    os.environ.pop("RLFLEET_CONFIG", None)


# -- two workers (make test: pytest tests -n 2) ------------------------------------------------------
# pytest-xdist's own grouping (--dist loadgroup) cannot be used: it renames node ids through an
# attribute pytest 9 no longer reads, so its groups silently fall apart into single tests.

# the session fixtures that boot throwaway hosts (tests/onprem/session.py, tests/conformance/conftest.py)
_HOST_FIXTURES = frozenset({"onprem", "aws_node_cluster", "gcp_node_cluster"})


def worker_group(nodeid: str) -> str:
    """``hosts``: the tests on the throwaway hosts (tests/onprem, the conformance suite on the on-prem,
    aws-node and gcp-node targets: minutes of booting and installing inside the hosts); ``main``: the
    rest (the local target, moto, the emulators, the multi-node cluster)."""
    path, _, name = nodeid.partition("::")
    conformance_off_local = path.startswith("tests/conformance/") and not name.endswith("[local]")
    on_hosts = path.startswith("tests/onprem/") or conformance_off_local
    return "hosts" if on_hosts else "main"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Each group runs in one worker, in collection order: every expensive fixture is still built once
    per test run, and the hosts' minutes of waiting overlap the local tests. Each worker has its own
    RLFLEET_HOME (pytest_configure). A plain ``pytest tests`` runs everything in one process."""
    from xdist.scheduler import LoadScopeScheduling

    class TwoGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return TwoGroups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that boots throwaway hosts must be in the hosts group: in the other worker it would
    build a second set of hosts (or wait on the first set's subnet lock)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("tgt", "local") if callspec is not None else "local"
        needs_hosts = bool(_HOST_FIXTURES.intersection(getattr(item, "fixturenames", ()))) or target != "local"
        if needs_hosts and worker_group(item.nodeid) != "hosts":
            raise pytest.UsageError(f"{item.nodeid} uses a throwaway host: tests/conftest.py's worker_group "
                                    "must put it in the hosts group")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """In a module marked ``figures``, a test's printed lines (setup and call) are its figures; so are
    the lines session fixtures said before it (tests/said.py)."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call" and said.PENDING:
        rep.user_properties.extend(("figures", line) for line in said.PENDING)
        said.PENDING.clear()
    if rep.when == "call" and item.get_closest_marker("figures") is not None:
        rep.user_properties.extend(("figures", line.strip()) for line in rep.capstdout.splitlines() if line.strip())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures tests record (``record_property("figures", line)``) in one section of the output,
    so a CI log holds them without ``-s``."""
    lines = [f"{rep.nodeid}: {v}" for key in ("passed", "failed") for rep in terminalreporter.stats.get(key, [])
             if getattr(rep, "when", "") == "call" for k, v in getattr(rep, "user_properties", []) if k == "figures"]
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback test URL
            return
        except urllib.error.HTTPError:
            return  # it answered
        except Exception as err:
            last = err
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout} s: {last}")


class _LiveLocalTarget:
    """The local target as it is now: a test that stops and restarts the head (tests/conformance:
    'runs' from the store when the head is down) gets new ports, and every later test follows."""

    def __getattr__(self, name: str) -> object:
        from rlfleet.local import local_target

        return getattr(local_target(), name)


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[object]:
    """The embedded local target's Ray head, started once for the whole test run (~10 s)."""
    from rlfleet.local import ensure_local_up, local_down

    ensure_local_up()
    try:
        yield _LiveLocalTarget()
    finally:
        local_down()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def moto_reset(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fresh moto state and AWS env pointing at it; returns the endpoint URL."""
    req = urllib.request.Request(moto_server + "/moto-api/reset", method="POST")  # noqa: S310
    # a reset reloads moto's managed IAM policies: 5-7 s measured on a loaded 2-core machine
    urllib.request.urlopen(req, timeout=90)  # noqa: S310 - loopback
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    try:
        wait_http(url + "/storage/v1/b")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


def write_wheel(out_dir: Path, name: str, version: str, module_src: str) -> Path:
    """A real, minimal pure-Python wheel (PEP 427), built without any build backend."""
    import base64
    import hashlib
    import io
    import zipfile

    out_dir.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module_src.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: rlfleet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    wheel.write_bytes(buf.getvalue())
    return wheel


@pytest.fixture
def make_wheel():
    """write_wheel(out_dir, name, version, module_src) -> path of a real pure-Python wheel."""
    return write_wheel


@pytest.fixture(autouse=True)
def _no_ansible_in_the_test_process() -> Iterator[None]:
    """Ansible patches sys.intern when imported, which breaks torch's compiler for every later test
    in the process: tests drive Ansible through its CLIs and ansible-runner, never by import."""
    yield
    assert "ansible" not in sys.modules, "this test imported ansible into the pytest process; run it as a CLI"
