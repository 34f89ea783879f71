"""rlfleet.provisioners.ansible_site without a host: the target built from an inventory, and the
messages for inventories it cannot use. Real ansible-inventory / ansible-vault, no mocks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rlfleet.errors import ConfigError
from rlfleet.provisioners import ansible_site, for_kind

from .harness import REPO, VENV_BIN, clean_env

EXAMPLE = REPO / "infra_onprem/inventories/example"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)


def _token_file(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text("t" * 40)
    f.chmod(0o600)
    return f


def _inventory(tmp_path: Path, hosts: str, vault: dict | None = None) -> Path:
    inv = tmp_path / "inv"
    (inv / "group_vars/all").mkdir(parents=True)
    (inv / "hosts.ini").write_text(textwrap.dedent(hosts))
    if vault is not None:
        v = inv / "group_vars/all/vault.yml"
        v.write_text(yaml.safe_dump(vault))
        pw = tmp_path / "vault-pass"
        pw.write_text("pw-1\n")
        subprocess.run([str(VENV_BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(pw), str(v)],
                       check=True, capture_output=True, env=clean_env(tmp_path))
    return inv


def test_onprem_kind_maps_to_this_module():
    assert for_kind("onprem") is ansible_site


def test_target_from_the_example_inventory(tmp_path):
    tok = _token_file(tmp_path)
    t = ansible_site.target_from("lab", inventory=str(EXAMPLE), token_file=str(tok))
    assert t.kind == "onprem"
    assert t.ray_address == "https://10.20.0.11:8443"  # the head's cluster address, TLS front port
    assert t.artifact_root == "file:///mnt/rlfleet/rlfleet"  # the NAS mount as the nodes see it
    assert t.ca_cert == str(EXAMPLE / "pki/ca.crt")
    assert t.token_source == f"file:{tok}"
    assert t.provisioner["type"] == "ansible" and t.provisioner["inventory"] == str(EXAMPLE)
    assert Path(t.provisioner["playbook_dir"], "site.yml").exists()
    plan = ansible_site.plan_destroy(t, delete_data=True)
    assert sum("DELETE artifact data /mnt/rlfleet/rlfleet" in p for p in plan) == 3  # one per node


def test_serve_ports_come_from_the_inventory(tmp_path):
    """The deploy ports the node's TLS front serves (tls_front_serve_ports) become the target's
    serve_ports, which the envelope carries to deploy runs."""
    tok = str(_token_file(tmp_path))
    assert ansible_site.target_from("lab", inventory=str(EXAMPLE), token_file=tok).serve_ports == (
        8600, 8601, 8602, 8603, 8604, 8605, 8606, 8607)
    inv = _inventory(tmp_path, "[ray_head]\nh1 rlfleet_address=10.9.0.1\n")
    (inv / "group_vars/all/main.yml").write_text("tls_front_serve_ports: [9700, 9701, 9700]\n")
    assert ansible_site.target_from("t", inventory=str(inv), token_file=tok).serve_ports == (9700, 9701)
    (inv / "group_vars/all/main.yml").write_text("rlfleet_serve_ports: [80]\n")
    with pytest.raises(ConfigError, match=r"rlfleet_serve_ports \[80\] must be a list of TCP ports 1024-65535"):
        ansible_site.target_from("t", inventory=str(inv), token_file=tok)


def test_the_tls_front_address_cannot_come_from_the_submitting_machine(tmp_path):
    """A deploy run learns its public address from the node's Ray unit; a target's env_vars (which
    override the node's environment in the job) may not set it."""
    with pytest.raises(ValueError, match="RLFLEET_SERVE_TLS_ADDRESS is set on the node by its TLS front"):
        ansible_site.target_from("lab", inventory=str(EXAMPLE), token_file=str(_token_file(tmp_path)),
                                 env_vars={"RLFLEET_SERVE_TLS_ADDRESS": "198.51.100.7"})


def test_an_https_endpoint_carries_the_targets_ca(tmp_path):
    """Run.endpoint() of a deploy run behind a TLS front hands the client the pinned CA."""
    import ssl

    from rlfleet import RunSpec
    from rlfleet.runs import Run
    from rlfleet.tokens import deploy_token, new_deploy_token

    t = ansible_site.target_from("lab", inventory=str(EXAMPLE), token_file=str(_token_file(tmp_path)),
                                 client_artifact_root=f"file://{tmp_path / 'store'}")
    run = Run("rl-1", t, spec=RunSpec(kind="deploy", source="rl-0"))
    new_deploy_token("rl-1")
    token = deploy_token("rl-1")
    run.artifacts().write_json("endpoint.json", {"url": "https://10.20.0.11:8600", "path": "/v1/policies/p:act"})
    ep = run.endpoint()
    assert ep.act_url == "https://10.20.0.11:8600/v1/policies/p:act" and ep.token == token
    assert ep.ca_cert == t.ca_cert and token not in repr(ep)
    with pytest.raises(FileNotFoundError):  # the example site has no pki/ yet: the CA file is really used
        ep.verify  # noqa: B018
    run.artifacts().write_json("endpoint.json", {"url": "http://127.0.0.1:8600", "path": "/x"})
    assert run.endpoint().ca_cert is None and isinstance(run.endpoint().verify, ssl.SSLContext)


def test_token_from_the_vault_is_saved_owner_only(tmp_path):
    inv = _inventory(tmp_path, """\
        [ray_head]
        h1 rlfleet_address=10.9.0.1 tls_front_ray_api_port=9443
        [rlfleet:children]
        ray_head
        """, vault={"vault_ray_token": "s3cret-" + "x" * 30})
    t = ansible_site.target_from("vaulted", inventory=str(inv), vault_password_file=str(tmp_path / "vault-pass"))
    assert t.ray_address == "https://10.9.0.1:9443"
    path = Path(t.token_source.removeprefix("file:"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert t.token() == "s3cret-" + "x" * 30
    assert "s3cret" not in yaml.safe_dump(t.model_dump(mode="json"))  # never in the targets file


def test_wrong_vault_password_is_a_clear_error(tmp_path):
    inv = _inventory(tmp_path, "[ray_head]\nh1 rlfleet_address=10.9.0.1\n", vault={"vault_ray_token": "x" * 40})
    bad = tmp_path / "bad-pass"
    bad.write_text("nope\n")
    with pytest.raises(ConfigError, match="cannot read inventory"):
        ansible_site.target_from("t", inventory=str(inv), vault_password_file=str(bad))


def test_no_token_anywhere(tmp_path):
    with pytest.raises(ConfigError, match=r"--token-file FILE .* ANSIBLE_VAULT_PASSWORD_FILE"):
        ansible_site.target_from("lab", inventory=str(EXAMPLE))


@pytest.mark.parametrize(("hosts", "message"), [
    ("[ray_head]\nh1 rlfleet_address=10.9.0.1\nh2 rlfleet_address=10.9.0.2\n", "exactly one host"),
    ("[ray_head]\nh1 ansible_host=10.9.0.1\n", "has no rlfleet_address"),
    ("[ray_head]\nh1 rlfleet_address=10.9.0.1 nas_client_mount_path='{{ x }}'\n", "is a template"),
])
def test_unusable_inventories(tmp_path, hosts, message):
    inv = _inventory(tmp_path, hosts)
    with pytest.raises(ConfigError, match=message):
        ansible_site.target_from("t", inventory=str(inv), token_file=str(_token_file(tmp_path)))


def test_missing_inventory_option():
    with pytest.raises(ConfigError, match="--inventory"):
        ansible_site.target_from("t")


def test_import_is_cheap():
    code = ("import sys, rlfleet.provisioners.ansible_site; "
            "print(any(m.split('.')[0] in ('ansible', 'ansible_runner') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": f"{REPO / 'sdk'}:{REPO / 'agents'}"})
    assert out.stdout.strip() == "False"


def test_cli_target_add_onprem_with_vault_password_file(tmp_path):
    """`rlfleet target add onprem --inventory … --vault-password-file …`: the token comes out of the vault."""
    inv = _inventory(tmp_path, """\
        [ray_head]
        h1 rlfleet_address=10.9.0.1
        [rlfleet:children]
        ray_head
        """, vault={"vault_ray_token": "v" * 40})
    env = {**clean_env(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "RLFLEET_HOME": str(tmp_path / "home")}
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    res = subprocess.run([str(VENV_BIN / "rlfleet"), "target", "add", "onprem", "--name", "lab", "--inventory",
                          str(inv), "--vault-password-file", str(tmp_path / "vault-pass"), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "onprem" and doc["ray_address"].startswith("https://10.9.0.1:")
    assert Path(doc["token_source"].removeprefix("file:")).read_text().strip() == "v" * 40
    assert "v" * 40 not in (tmp_path / "cfg/rlfleet/targets.yaml").read_text()
