"""Inventory abuse: an onprem target from a bad Ansible inventory (real ansible-inventory) fails with
one line naming the inventory and the variable/group, writes no token file and no targets file.

ansible-inventory costs ~1-4 s per call on a loaded 2-core machine, so the SDK cases run in a
thread pool (one subprocess each) and a few go through the CLI as well."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rlfleet.errors import ConfigError, RlfleetError
from rlfleet.provisioners import ansible_site

from .conftest import Sandbox
from .harness import assert_cli_error, assert_one_line, count, run_cli, snapshot

HEAD = "h1 rlfleet_address=10.0.0.5"


def _ini(head_line: str = HEAD, extra: str = "") -> str:
    return f"[ray_head]\n{head_line}\n\n[rlfleet:children]\nray_head\n{extra}"


def _vault(text: str, password: bytes) -> str:
    """Encrypt with the real ansible-vault CLI, in its own process: importing ansible here would
    patch this process's sys.intern, which breaks torch's compiler in every later test."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pw, src = Path(d) / "pw", Path(d) / "secret"
        pw.write_bytes(password)
        src.write_text(text)
        subprocess.run([str(Path(sys.executable).parent / "ansible-vault"), "encrypt", "--vault-password-file",
                        str(pw), str(src)], check=True, capture_output=True, timeout=120)
        return src.read_text()


# id -> (files of the inventory dir, target_from options, words of the message)
def cases() -> dict[str, tuple[dict[str, str | bytes], dict[str, Any], list[str]]]:
    tok = {"token_file": "TOKEN"}
    return {
        "empty-dir": ({}, tok, ["No inventory was parsed"]),
        "bad-yaml": ({"hosts.yml": "all: [\n"}, tok, ["inventory", "parse"]),
        "binary": ({"hosts": bytes(range(256)) * 2}, tok, ["inventory", "parse"]),
        "bad-ini": ({"hosts.ini": "[ray_head\nfoo bar=\n"}, tok, ["inventory", "parse"]),
        "no-head-group": ({"hosts.ini": "[rlfleet]\nh1 rlfleet_address=10.0.0.5\n"}, tok, ["'ray_head'", "found []"]),
        "two-heads": ({"hosts.ini": _ini(HEAD + "\nh2 rlfleet_address=10.0.0.6")}, tok, ["'ray_head'", "h1", "h2"]),
        "no-address": ({"hosts.ini": _ini("h1")}, tok, ["rlfleet_address"]),
        "templated-address": ({"hosts.yml": "all:\n  children:\n    ray_head:\n      hosts:\n        h1:\n"
                                            "          rlfleet_address: \"{{ lookup('env', 'X') }}\"\n"},
                              tok, ["rlfleet_address", "template"]),
        "address-injection": ({"hosts.yml": "all:\n  children:\n    ray_head:\n      hosts:\n        h1:\n"
                                            "          rlfleet_address: '10.0.0.5/x?y#z'\n"},
                              tok, ["rlfleet_address", "10.0.0.5/x?y#z"]),  # was accepted into ray_address
        "port-not-a-number": ({"hosts.ini": _ini(HEAD + " tls_front_ray_api_port=abc")}, tok,
                              ["tls_front_ray_api_port", "'abc'"]),  # was a ValueError traceback
        "port-out-of-range": ({"hosts.ini": _ini(HEAD + " tls_front_ray_api_port=99999")}, tok,
                              ["tls_front_ray_api_port", "99999"]),  # was accepted
        "relative-artifact-dir": ({"hosts.ini": _ini(HEAD + " nas_client_artifact_dir=data/rl")}, tok,
                                  ["nas_client_artifact_dir", "absolute"]),  # became file://data/rl
        "templated-pki": ({"hosts.ini": _ini(HEAD + " rlfleet_pki_dir={{x}}")}, tok, ["rlfleet_pki_dir"]),
        "no-token": ({"hosts.ini": _ini()}, {}, ["no Ray token", "--token-file"]),
        "vault-no-password": ({"hosts.ini": _ini(), "group_vars/all/vault.yml": "VAULT:pw"}, {},
                              ["vault", "ANSIBLE_VAULT_PASSWORD_FILE"]),
        "vault-wrong-password": ({"hosts.ini": _ini(), "group_vars/all/vault.yml": "VAULT:pw", "pw": "wrong\n"},
                                 {"vault_password_file": "pw"}, ["inventory", "ecrypt"]),
        "vault-password-missing": ({"hosts.ini": _ini()}, {"vault_password_file": "/nonexistent/pw"},
                                   ["/nonexistent/pw", "does not exist"]),
        "bad-name-with-vault-token": ({"hosts.ini": _ini(), "group_vars/all/main.yml": "vault_ray_token: abc\n"},
                                      {"name": "Bad/Name"}, ["Bad/Name", "target name"]),  # wrote a token first
    }


def _materialize(root: Path, files: dict[str, str | bytes]) -> None:
    root.mkdir(parents=True)
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("VAULT:"):
            content = _vault("vault_ray_token: abc\n", content[len("VAULT:"):].encode())
        p.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture(scope="module")
def outcomes(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every case through ansible_site.target_from, four ansible-inventory processes at a time."""
    base = tmp_path_factory.mktemp("inventories")
    table = cases()
    runs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for cid, (files, opts, _) in table.items():
        inv = base / cid
        _materialize(inv, files)
        kw = {k: (str(sandbox.token) if v == "TOKEN" else str(inv / v) if k == "vault_password_file"
                  and not v.startswith("/") else v) for k, v in opts.items()}
        runs[cid] = (inv, kw)
    before = snapshot(*sandbox.roots, base)

    def attempt(cid: str) -> object:
        inv, kw = runs[cid]
        name = kw.pop("name", "site")
        try:
            return ansible_site.target_from(name, inventory=str(inv), **kw)
        except BaseException as err:  # the case under test decides what is acceptable
            return err

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(runs, pool.map(attempt, runs), strict=True))
    after = snapshot(*sandbox.roots, base)
    yield {"results": results, "table": table, "base": base, "disk_changed": sorted(
        k for k in set(before) | set(after) if before.get(k) != after.get(k))}


@pytest.mark.parametrize("cid", list(cases()))
def test_bad_inventory(outcomes: dict[str, Any], cid: str) -> None:
    count("inventory")
    err = outcomes["results"][cid]
    assert isinstance(err, RlfleetError), f"{cid}: expected one rlfleet error line, got {err!r}"
    assert_one_line(str(err), *outcomes["table"][cid][2])


def test_bad_inventories_change_nothing_on_disk(outcomes: dict[str, Any]) -> None:
    """No token file under RLFLEET_HOME, no targets file, no change to the inventories."""
    assert outcomes["disk_changed"] == []


# A sample through the CLI: one stderr line, exit code 2, nothing saved.
CLI_CASES = ["port-not-a-number", "bad-name-with-vault-token"]


@pytest.mark.parametrize("cid", CLI_CASES)
def test_bad_inventory_cli(sandbox: Sandbox, outcomes: dict[str, Any], cid: str) -> None:
    count("inventory")
    inv = outcomes["base"] / cid
    name = "Bad/Name" if cid == "bad-name-with-vault-token" else "site"
    argv = ["target", "add", "onprem", "--name", name, "--inventory", str(inv)]
    if cid != "bad-name-with-vault-token":
        argv += ["--token-file", str(sandbox.token)]
    before = snapshot(*sandbox.roots, inv)
    rc, out, err = run_cli(argv)
    assert rc == ConfigError.exit_code, err
    assert_cli_error(rc, out, err, *outcomes["table"][cid][2])
    assert snapshot(*sandbox.roots, inv) == before
