"""Provisioner for ``onprem`` targets: a site inventory (``infra_onprem/inventories/<site>``) and
the playbooks in ``ansible/`` (site.yml, teardown.yml, leftovers.yml), driven by ansible-runner.

The target is read from the inventory with ``ansible-inventory --list``:

- ``ray_address``: ``https://<rlfleet_address of the ray_head host>:<tls_front_ray_api_port>``
  (nginx terminates TLS in front of Ray's token-protected Jobs API; default port 8443);
- ``ca_cert``: the cluster CA the playbooks generate on the controller, ``<pki dir>/ca.crt``
  (``rlfleet_pki_dir``, default ``<inventory dir>/pki``); it exists after the first ``up``;
- ``artifact_root``: ``file://<nas_client_artifact_dir>`` (default ``/mnt/rlfleet/rlfleet``), the
  NAS mount as every node sees it; ``client_artifact_root`` is where this machine sees the same
  directory, if it mounts the NAS too;
- ``serve_ports``: ``tls_front_serve_ports`` (or ``rlfleet_serve_ports``; default 8600-8607), the
  ports a deploy run binds on 127.0.0.1 of its node and nginx serves over TLS on the node's address
  (a deploy run's endpoint is ``https://<node address>:<port>``, called with ``ca_cert``);
- token: ``token_file=`` (mode 0600), else ``vault_ray_token`` from the inventory's vault, decrypted
  with ``vault_password_file=`` or ``$ANSIBLE_VAULT_PASSWORD_FILE`` and written to
  ``~/.rlfleet/tokens/<target>.token`` (0600). The token never enters the targets file.

ansible and ansible_runner are imported only inside the functions that run them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlfleet.constants import SERVE_PORTS_DEFAULT
from rlfleet.errors import ConfigError, ProvisionerError
from rlfleet.provisioners.refs import AnsibleRef
from rlfleet.provisioners.registry import CostInputs, ref_of
from rlfleet.targets import Target, check_target_name, rlfleet_home
from rlfleet.teardown import Leftover

if TYPE_CHECKING:
    from rlfleet.teardown.sweep import StackSweep

Echo = Callable[[str], None]

DEFAULT_RAY_API_PORT = 8443
DEFAULT_MOUNT_PATH = "/mnt/rlfleet"
# tls_front_serve_ports (ansible/roles/tls_front): deploy ports nginx serves over TLS on every node
DEFAULT_SERVE_PORTS = SERVE_PORTS_DEFAULT
HEAD_GROUP = "ray_head"
# Controller variables that must not reach the hosts (the nsenter/local connections inherit the
# environment): pip/SSL settings of this machine mean nothing there and break pip.
_SCRUB_PREFIXES = ("PIP_",)
_SCRUB_KEYS = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PYTHONPATH",
               "VIRTUAL_ENV", "PYTHONHOME")


def _noop(_: str) -> None:
    pass


def _bin(name: str) -> str:
    """Executables from the same environment as this Python, then PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ProvisionerError(f"{name} is not installed: pip install -e '.[onprem]' in your rlfleet checkout")
    return found


def default_playbook_dir() -> Path | None:
    env = os.environ.get("RLFLEET_ANSIBLE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[3] / "ansible"  # a source checkout: <repo>/ansible
    return repo if (repo / "site.yml").exists() else None


def _playbook_dir(explicit: str | None) -> Path:
    path = Path(explicit).expanduser().resolve() if explicit else default_playbook_dir()
    if path is None or not (path / "site.yml").exists():
        raise ConfigError(
            f"no Ansible playbooks found{f' in {path}' if path else ''}: give playbook_dir=<checkout>/ansible "
            "or set RLFLEET_ANSIBLE_DIR to the ansible/ folder of an rlfleet checkout"
        )
    return path


def _vault_file(explicit: str | None) -> str | None:
    path = explicit or os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ConfigError(f"vault password file {p} does not exist")
    return str(p)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_KEYS}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


@contextlib.contextmanager
def _scrubbed_environ() -> Iterator[None]:
    """ansible-runner copies os.environ for ansible-playbook: hide the controller's pip/SSL settings."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(_clean_env())
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- inventory -> Target ----------------------------------------------------------------------

def read_inventory(inventory: str | Path, *, vault_password_file: str | None = None,
                   playbook_dir: Path | None = None) -> dict[str, Any]:
    """``ansible-inventory --list`` as a dict (group_vars merged into ``_meta.hostvars``)."""
    cmd = [_bin("ansible-inventory"), "-i", str(inventory), "--list"]
    if vault_password_file:
        cmd += ["--vault-password-file", vault_password_file]
    env = _clean_env()
    env["ANSIBLE_INVENTORY_UNPARSED_FAILED"] = "True"  # an unparsable inventory is an error, not an empty one
    if playbook_dir is not None:
        env["ANSIBLE_CONFIG"] = str(playbook_dir / "ansible.cfg")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        raise ProvisionerError(f"ansible-inventory on {inventory} did not finish in 120 s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        # the last [ERROR] line says what failed; an 'Unable to parse' warning says where
        err = [ln for ln in lines if ln.startswith("[ERROR]")][-1:] or lines[-1:]
        err += [ln for ln in lines if "Unable to parse" in ln][:1]
        err = [" ".join(err)] if err else []
        hint = ""
        if "vault" in proc.stderr.lower():
            hint = (" (the inventory holds ansible-vault data: give vault_password_file= or set "
                    "ANSIBLE_VAULT_PASSWORD_FILE)")
        raise ConfigError(f"cannot read inventory {inventory}: {err[-1] if err else proc.returncode}{hint}")
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ansible-inventory printed no JSON for {inventory}: {e}") from None
    return data


def _group_hosts(inv: dict[str, Any], group: str) -> list[str]:
    g = inv.get(group) or {}
    hosts = list(g.get("hosts") or [])
    for child in g.get("children") or []:
        hosts += [h for h in _group_hosts(inv, child) if h not in hosts]
    return hosts


def _literal(value: Any, name: str, inventory: str) -> str:
    s = str(value)
    if "{{" in s or "{%" in s:
        raise ConfigError(
            f"inventory {inventory}: {name} is a template ({s!r}); rlfleet reads it without running a play, "
            "so give it as a literal value in group_vars"
        )
    return s


def _is_host(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*", address))


@dataclass(frozen=True)
class SiteInfo:
    head: str
    head_address: str
    api_port: int
    artifact_dir: str
    pki_dir: Path
    hosts: list[str] = field(default_factory=list)
    vault_token: str | None = None
    serve_ports: tuple[int, ...] = DEFAULT_SERVE_PORTS


def site_info(inventory: str | Path, *, vault_password_file: str | None = None,
              playbook_dir: Path | None = None) -> SiteInfo:
    inv_path = Path(inventory).expanduser().resolve()
    inv = read_inventory(inv_path, vault_password_file=vault_password_file, playbook_dir=playbook_dir)
    heads = _group_hosts(inv, HEAD_GROUP)
    if len(heads) != 1:
        raise ConfigError(f"inventory {inv_path}: group {HEAD_GROUP!r} must hold exactly one host (found {heads})")
    head = heads[0]
    hv = (inv.get("_meta") or {}).get("hostvars", {}).get(head, {})
    if not hv.get("rlfleet_address"):
        raise ConfigError(f"inventory {inv_path}: host {head!r} has no rlfleet_address (its cluster IP)")
    where = str(inv_path)
    mount = _literal(hv.get("nas_client_mount_path", DEFAULT_MOUNT_PATH), "nas_client_mount_path", where)
    artifact_dir = _literal(hv.get("nas_client_artifact_dir", f"{mount.rstrip('/')}/rlfleet"),
                            "nas_client_artifact_dir", where)
    inv_dir = inv_path if inv_path.is_dir() else inv_path.parent
    pki = hv.get("rlfleet_pki_dir")
    pki_dir = Path(_literal(pki, "rlfleet_pki_dir", where)).expanduser() if pki else inv_dir / "pki"
    token = hv.get("vault_ray_token")
    if not artifact_dir.startswith("/"):
        raise ConfigError(f"inventory {where}: nas_client_artifact_dir {artifact_dir!r} must be an absolute path")
    address = _literal(hv["rlfleet_address"], "rlfleet_address", where)
    if not _is_host(address):
        raise ConfigError(f"inventory {where}: rlfleet_address {address!r} of host {head!r} is not an IP address "
                          "or host name")
    port = _literal(hv.get("tls_front_ray_api_port", DEFAULT_RAY_API_PORT), "tls_front_ray_api_port", where)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"inventory {where}: tls_front_ray_api_port {port!r} is not a TCP port (1-65535)")
    return SiteInfo(
        serve_ports=_serve_ports(hv, where),
        head=head,
        head_address=address,
        api_port=int(port),
        artifact_dir=artifact_dir,
        pki_dir=pki_dir,
        hosts=_group_hosts(inv, "rlfleet"),
        vault_token=str(token) if isinstance(token, str) and token and "{{" not in token else None,
    )


def _serve_ports(hostvars: dict[str, Any], where: str) -> tuple[int, ...]:
    name = next((n for n in ("tls_front_serve_ports", "rlfleet_serve_ports") if n in hostvars), None)
    if name is None:
        return DEFAULT_SERVE_PORTS
    value = hostvars[name]
    _literal(value, name, where)
    ports = value if isinstance(value, list) else [value]
    if not ports or not all(str(p).isdigit() and 1024 <= int(p) <= 65535 for p in ports):
        raise ConfigError(f"inventory {where}: {name} {value!r} must be a list of TCP ports 1024-65535, "
                          "e.g. [8600, 8601]")
    return tuple(dict.fromkeys(int(p) for p in ports))


def _save_token(name: str, token: str) -> Path:
    d = rlfleet_home() / "tokens"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    path = d / f"{name}.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    path.chmod(0o600)
    return path


def target_from(name: str, *, inventory: str | None = None, token_file: str | None = None,
                vault_password_file: str | None = None, playbook_dir: str | None = None,
                ca_cert: str | None = None, client_artifact_root: str | None = None,
                env_vars: dict[str, str] | None = None, **_: Any) -> Target:
    """Build the onprem target from its inventory (see the module docstring)."""
    check_target_name(name)  # before anything is written for it (the token file below)
    if not inventory:
        raise ConfigError("an onprem target needs --inventory <infra_onprem/inventories/<site>>")
    pdir = _playbook_dir(playbook_dir)
    vault = _vault_file(vault_password_file)
    info = site_info(inventory, vault_password_file=vault, playbook_dir=pdir)
    if token_file:
        source = f"file:{Path(token_file).expanduser().resolve()}"
    elif info.vault_token:
        source = f"file:{_save_token(name, info.vault_token)}"
    else:
        raise ConfigError(
            f"no Ray token for target {name!r}: give --token-file FILE (mode 0600), or keep vault_ray_token in "
            f"the inventory's group_vars/all/vault.yml and set ANSIBLE_VAULT_PASSWORD_FILE"
        )
    inv_abs = str(Path(inventory).expanduser().resolve())
    return Target(
        name=name,
        kind="onprem",
        ray_address=f"https://{_url_host(info.head_address)}:{info.api_port}",
        token_source=source,
        artifact_root=f"file://{info.artifact_dir}",
        client_artifact_root=client_artifact_root,
        ca_cert=str(Path(ca_cert).expanduser().resolve()) if ca_cert else str(info.pki_dir / "ca.crt"),
        provisioner=AnsibleRef(type="ansible", inventory=inv_abs, playbook_dir=str(pdir), vault_password_file=vault),
        env_vars=dict(env_vars or {}),
        serve_ports=info.serve_ports,
    )


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


# -- running playbooks --------------------------------------------------------------------------

@dataclass
class PlaybookResult:
    playbook: str
    rc: int
    status: str
    seconds: float
    stats: dict[str, dict[str, int]]  # host -> {ok, changed, failed, unreachable, skipped}
    failures: list[str]
    messages: dict[str, list[Any]]    # task name -> debug msgs (for leftovers)
    changed_tasks: list[str] = field(default_factory=list)  # "host: task" that reported a change

    @property
    def changed(self) -> int:
        return sum(s.get("changed", 0) for s in self.stats.values())


def _opts(target: Target) -> tuple[str, Path, str | None]:
    try:
        ref = ref_of(target, AnsibleRef)
    except ConfigError:
        ref = AnsibleRef(type="ansible")
    if not ref.inventory:
        raise ConfigError(
            f"target {target.name!r} has no Ansible inventory; re-add it with "
            "'rlfleet target add onprem --inventory <infra_onprem/inventories/<site>>'"
        )
    return ref.inventory, _playbook_dir(ref.playbook_dir), _vault_file(ref.vault_password_file)


def run_playbook(target: Target, playbook: str, *, extravars: dict[str, Any] | None = None,
                 echo: Echo = _noop) -> PlaybookResult:
    """Run one playbook of ``ansible/`` on the target's inventory through ansible-runner."""
    inventory, pdir, vault = _opts(target)
    try:
        import ansible_runner
    except ImportError:
        raise ProvisionerError(
            "onprem targets need ansible-runner: pip install -e '.[onprem]' in your rlfleet checkout") from None

    counters = {"tasks": 0}
    failures: list[str] = []
    messages: dict[str, list[Any]] = {}
    changed: list[str] = []

    def on_event(ev: dict[str, Any]) -> bool:
        kind = ev.get("event")
        data = ev.get("event_data") or {}
        if kind == "playbook_on_play_start":
            echo(f"PLAY {data.get('play', '')}")
        elif kind == "playbook_on_task_start":
            counters["tasks"] += 1
            echo(f"  [{counters['tasks']}] {data.get('task', '')}")
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            res = data.get("res") or {}
            msg = res.get("msg") or res.get("stderr") or "failed"
            items = [r for r in res.get("results") or [] if isinstance(r, dict) and r.get("msg")]
            if items:  # a loop: "All items completed" says nothing, the first item's message does
                msg = items[0]["msg"]
            failures.append(f"{data.get('host')}: {data.get('task')}: {str(msg).strip()[:500]}")
            echo(f"  FAILED {failures[-1]}")
        elif kind == "runner_on_ok":
            res = data.get("res") or {}
            if res.get("changed"):
                changed.append(f"{data.get('host')}: {data.get('task')}")
                echo(f"  changed {changed[-1]}")
            if "msg" in res and data.get("task_action") in ("debug", "ansible.builtin.debug"):
                messages.setdefault(str(data.get("task")), []).append((data.get("host"), res["msg"]))
        return True

    private = Path(tempfile.mkdtemp(prefix="rlfleet-ansible-"))
    cmdline = f"--vault-password-file {vault}" if vault else ""
    t0 = time.monotonic()
    keep = False
    try:
        with _scrubbed_environ():
            r = ansible_runner.run(
                private_data_dir=str(private),
                project_dir=str(pdir),
                playbook=playbook,
                inventory=inventory,
                extravars=extravars or {},
                cmdline=cmdline,
                envvars={"ANSIBLE_CONFIG": str(pdir / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"},
                event_handler=on_event,
                quiet=True,
                suppress_env_files=True,
            )
        seconds = time.monotonic() - t0
        raw = r.stats or {}
        stats: dict[str, dict[str, int]] = {}
        for key, name in (("ok", "ok"), ("changed", "changed"), ("failures", "failed"),
                          ("dark", "unreachable"), ("skipped", "skipped")):
            for host, n in (raw.get(key) or {}).items():
                stats.setdefault(host, {})[name] = int(n)
        for host, s in sorted(stats.items()):
            echo(f"{host}: ok={s.get('ok', 0)} changed={s.get('changed', 0)} "
                 f"failed={s.get('failed', 0)} unreachable={s.get('unreachable', 0)}")
        result = PlaybookResult(playbook=playbook, rc=int(r.rc), status=str(r.status), seconds=seconds,
                                stats=stats, failures=failures, messages=messages, changed_tasks=changed)
        if r.rc != 0:
            keep = True
            detail = "; ".join(failures[-3:]) or f"status {r.status}"
            raise ProvisionerError(
                f"{playbook} failed on target {target.name!r} after {seconds:.0f} s: {detail}. "
                f"Full output: {private}/artifacts/*/stdout"
            )
        return result
    finally:
        if not keep:
            shutil.rmtree(private, ignore_errors=True)


def up(target: Target, *, echo: Echo = print) -> Target:
    """Apply site.yml (idempotent: a second run changes nothing)."""
    run_playbook(target, "site.yml", echo=echo)
    return target


def plan_destroy(target: Target, *, delete_data: bool = False) -> list[str]:
    inventory, pdir, vault = _opts(target)
    info = site_info(inventory, vault_password_file=vault, playbook_dir=pdir)
    out = []
    for h in info.hosts or [info.head]:
        out.append(f"{h}: stop and remove units rlfleet-ray-head/rlfleet-ray-worker/rlfleet-dcgm-exporter")
        out.append(f"{h}: remove /opt/rlfleet (venv), /etc/rlfleet (Ray token, TLS keys), Ray temp dir")
        out.append(f"{h}: stop nginx (TLS front), prometheus, node_exporter, grafana where rlfleet installed them "
                   "(services that were there before stay as they were); put back the nginx.conf it replaced")
        if delete_data:
            out.append(f"{h}: DELETE artifact data {info.artifact_dir} (only if rlfleet created it: "
                       ".created-by-rlfleet in it)")
    if not delete_data:
        out.append(f"kept: artifact data under {info.artifact_dir} (NAS), firewall and base hardening")
    return out


def destroy(target: Target, *, delete_data: bool = False, echo: Echo = print) -> None:
    """Apply teardown.yml; NAS data stays unless ``delete_data``. Idempotent."""
    run_playbook(target, "teardown.yml", extravars={"teardown_delete_data": bool(delete_data)}, echo=echo)


def ready(target: Target) -> Target:
    return target  # the site's head runs as a systemd unit once 'up' has run


def sweep(target: Target) -> StackSweep | None:
    return None  # nothing is tagged in a cloud: leftovers.yml looks on the hosts


def scan_leftovers(target: Target) -> list[Leftover]:
    """What the kit created that is still on the hosts (units, venv, token dir, Ray processes)."""
    result = run_playbook(target, "leftovers.yml")
    out: list[Leftover] = []
    for host, msg in result.messages.get("Report leftovers", []):
        items = msg.get("rlfleet_leftovers", []) if isinstance(msg, dict) else []
        out += [Leftover("onprem", "leftover", f"{host}: {item}") for item in items]
    return out


def cost_inputs(target: Target) -> CostInputs:
    raise ConfigError(f"target {target.name!r} (onprem) has no cloud stack to price: the servers are yours")
