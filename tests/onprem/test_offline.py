"""The parts that cannot run on this machine (GPU driver, NFS, Grafana server), checked offline:
the roles' templates rendered for an example GPU site and validated with the tools that would
read them (findmnt, promtool, nft), the dashboards' PromQL through promtool, the preflight
messages for bad settings, plus ansible-lint (production profile) and --syntax-check."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .harness import ANSIBLE_DIR, REPO, VENV_BIN, clean_env

DASHBOARDS = ANSIBLE_DIR / "roles/monitoring/files/dashboards"
EXAMPLE = REPO / "infra_onprem/inventories/example"


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_syntax_check_with_the_example_inventory(tmp_path):
    r = _run([str(VENV_BIN / "ansible-playbook"), "-i", str(EXAMPLE), "--syntax-check",
              "site.yml", "teardown.yml", "leftovers.yml"], cwd=ANSIBLE_DIR, env=clean_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_ansible_lint_production_profile(tmp_path):
    r = _run([str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
             cwd=ANSIBLE_DIR, env=clean_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_nas_mount_line_verifies(rendered):
    line = (rendered / "fstab").read_text().strip()
    src, target, fstype, opts, *_ = line.split()
    assert re.fullmatch(r"[\w.-]+:/\S+", src) and fstype == "nfs4"
    assert "sec=krb5p" in opts.split(",") and "_netdev" in opts
    r = _run(["findmnt", "--verify", "--verbose", "--tab-file", str(rendered / "fstab")])
    assert r.returncode == 0 and "no errors" in r.stdout, r.stdout + r.stderr
    assert Path(target).is_dir()


def test_nas_exports_only_inventory_hosts_root_squashed(rendered):
    (line,) = [ln for ln in (rendered / "exports").read_text().splitlines() if ln and not ln.startswith("#")]
    path, *clients = line.split()
    assert path == "/export/rlfleet"
    assert [c.split("(")[0] for c in clients] == ["10.20.0.11", "10.20.0.12"]
    for c in clients:
        opts = c.split("(")[1].rstrip(")").split(",")
        assert "root_squash" in opts and "no_root_squash" not in opts and "sec=krb5p" in opts


def test_prometheus_config_and_alert_rules_pass_promtool(rendered):
    r = _run(["promtool", "check", "config", "--syntax-only", str(rendered / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(["promtool", "check", "rules", str(rendered / "rlfleet-alerts.yml")])
    assert r.returncode == 0 and "6 rules found" in r.stdout, r.stdout + r.stderr
    cfg = yaml.safe_load((rendered / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"prometheus", "node", "dcgm", "ray"}
    for name in ("node", "dcgm", "ray"):  # everything that crosses the network: mutual TLS
        assert jobs[name]["scheme"] == "https" and jobs[name]["tls_config"]["cert_file"]
    assert [t["labels"]["node"] for t in jobs["dcgm"]["static_configs"]] == ["gpu-head-01"]  # GPU hosts only
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/var/lib/rlfleet/ray/prom_metrics_service_discovery.json"]


def test_alerts_fire_on_synthetic_series(rendered, tmp_path):
    """promtool's rule unit tests: node down, GPU idle and disk nearly full really fire."""
    node_down = {
        "summary": "Node n1 (a:9443) does not answer",
        "description": "node_exporter on this node has not been scraped for 2m: the host is down, its TLS "
        "front is stopped or the firewall blocks the monitoring host.",
    }
    gpu_idle = {
        "summary": "GPU 0 on n1 is idle",
        "description": "Average utilisation below 5% over 30m: a run holds a GPU it does not use, or the "
        "node could be released.",
    }
    disk = {
        "summary": "/ on n1 is nearly full",
        "description": "Less than 10% free: prune old runs (rlfleet cleanup) or grow the volume.",
    }
    fs = {"node": "n1", "mountpoint": "/", "fstype": "ext4"}
    tests = {
        "rule_files": [str(rendered / "rlfleet-alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="node",node="n1",instance="a:9443"}', "values": "0x10"},
                {"series": 'DCGM_FI_DEV_GPU_UTIL{node="n1",gpu="0"}', "values": "1x60"},
                {"series": 'node_filesystem_avail_bytes{node="n1",mountpoint="/",fstype="ext4"}', "values": "5x30"},
                {"series": 'node_filesystem_size_bytes{node="n1",mountpoint="/",fstype="ext4"}', "values": "100x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "RlfleetNodeDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "job": "node", "node": "n1", "instance": "a:9443"},
                    "exp_annotations": node_down}]},
                {"eval_time": "1m", "alertname": "RlfleetNodeDown", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "RlfleetGpuIdle", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "node": "n1", "gpu": "0"},
                    "exp_annotations": gpu_idle}]},
                {"eval_time": "20m", "alertname": "RlfleetDiskNearlyFull", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", **fs}, "exp_annotations": disk}]},
            ],
        }],
    }
    f = tmp_path / "alerts_test.yml"
    f.write_text(yaml.safe_dump(tests, sort_keys=False))
    r = _run(["promtool", "test", "rules", str(f)])
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_serving_alerts_fire_on_synthetic_series(rendered, tmp_path):
    """promtool's rule unit tests for the policy servers' alerts: a drifted feature fires (and only after
    the hold time, and not at a score under 1 however large its PSI), an action shift fires, a 5xx ratio
    fires. The thresholds are the server's: score (PSI / the feature's calibrated level) above 1, the
    action shift's PSI above rlfleet_agents.drift.PSI_ALERT."""
    from rlfleet_agents.drift import PSI_ALERT

    rules = yaml.safe_load((rendered / "rlfleet-alerts.yml").read_text())["groups"][0]["rules"]
    drift = next(r for r in rules if r["alert"] == "RlfleetServeDrift")
    assert drift["expr"].endswith("(ray_rlfleet_serve_drift_score) > 1.0")
    lab = 'deployment="cartpole",version="2",replica="r1"'
    series = [
        {"series": f'ray_rlfleet_serve_drift_score{{{lab},feature="1"}}', "values": "0.05x5 1.6x20"},
        {"series": f'ray_rlfleet_serve_drift_score{{{lab},feature="0"}}', "values": "0.95x25"},  # just under
        {"series": f'ray_rlfleet_serve_drift_psi{{{lab},feature="0"}}', "values": "5.7x25"},  # a slow feature
        {"series": f'ray_rlfleet_serve_action_shift{{{lab}}}', "values": "0.02x5 0.5x20"},
        {"series": f'ray_rlfleet_serve_requests_total{{{lab},code="200"}}', "values": "0+100x25"},
        {"series": f'ray_rlfleet_serve_errors_total{{{lab},code="503"}}', "values": "0+20x25"},
    ]
    who = {"deployment": "cartpole", "version": "2"}
    tests = {"rule_files": [str(rendered / "rlfleet-alerts.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "RlfleetServeDrift", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "RlfleetServeDrift", "exp_alerts": []},  # held for 1m first
            {"eval_time": "8m", "alertname": "RlfleetServeDrift", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "feature": "1", **who},
                "exp_annotations": {
                    "summary": "Deployment cartpole v2: observation feature 1 drifted (score 1.60)",
                    "description": "The served observations of this feature no longer match the policy's "
                    "training statistics: its PSI over the server's sliding window is above 1.0 x the "
                    "feature's alert level, calibrated at export from the run's own episodes. "
                    "rlfleet drift shows every feature."}}]},
            {"eval_time": "8m", "alertname": "RlfleetServeActionShift", "exp_alerts": [{
                "exp_labels": {"severity": "warning", **who},
                "exp_annotations": {
                    "summary": "Deployment cartpole v2: the policy's actions shifted (PSI 0.50)",
                    "description": "The distribution of served actions differs from the one the policy "
                    f"showed in its final evaluation (PSI above {PSI_ALERT})."}}]},
            {"eval_time": "15m", "alertname": "RlfleetServeErrors", "exp_alerts": [{
                "exp_labels": {"severity": "critical", **who},
                "exp_annotations": {
                    "summary": "Deployment cartpole v2 answers 5xx",
                    "description": "More than 0.05 of its requests failed with a server error over 5 minutes."}}]},
        ]}]}
    f = tmp_path / "serve_alerts_test.yml"
    f.write_text(yaml.safe_dump(tests, sort_keys=False))
    r = _run(["promtool", "test", "rules", str(f)])
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_firewall_ruleset_passes_nft_check(rendered):
    text = (rendered / "nftables.conf").read_text()
    r = _run(["nft", "-c", "-f", str(rendered / "nftables.conf")])
    assert r.returncode == 0, r.stderr
    assert "policy drop;" in text and "flush ruleset" not in text
    assert re.search(r"set cluster_v4 .*elements = \{ 10\.20\.0\.11, 10\.20\.0\.12 \}", text)
    assert "ip saddr @admin_v4 tcp dport @admin_tcp accept" in text
    assert "ip6 saddr @admin_v6 tcp dport @admin_tcp accept" in text
    # ssh, Ray API, Grafana, metrics, and the deploy ports the node's TLS front serves
    deploy = ", ".join(str(p) for p in range(8600, 8608))
    assert re.search(r"set admin_tcp .*elements = \{ 22, 8443, 3000, 9443, " + deploy + r" \}", text)


def test_grafana_provisioning_is_locked_down(rendered):
    ini = (rendered / "grafana.ini").read_text()
    section = re.search(r"\[auth\.anonymous\]\s*\n([^\[]*)", ini)
    assert section and re.search(r"^enabled = false$", section.group(1), re.M)
    assert "admin_password = $__file{/etc/grafana/admin_password}" in ini
    assert "protocol = https" in ini and "allow_sign_up = false" in ini
    ds = yaml.safe_load((rendered / "grafana-datasource.yml").read_text())["datasources"][0]
    assert ds["uid"] == "rlfleet-prometheus" and ds["url"].startswith("http://127.0.0.1:")


def _exprs() -> list[tuple[str, str, str]]:
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["panels"]:
            assert p["datasource"]["uid"] == "rlfleet-prometheus", (f.name, p["title"])
            for t in p["targets"]:
                out.append((f.name, p["title"], t["expr"]))
    return out


def test_dashboards_cover_the_metrics_and_their_promql_parses(tmp_path):
    exprs = _exprs()
    text = " ".join(e for _, _, e in exprs)
    for metric in ("ray_rlfleet_episode_return", "ray_rlfleet_steps_per_second", "DCGM_FI_DEV_GPU_UTIL",
                   "DCGM_FI_DEV_FB_USED", 'up{job="node"', "node_filesystem_avail_bytes",
                   "ray_rlfleet_serve_requests_total", "ray_rlfleet_serve_latency_seconds_bucket",
                   "ray_rlfleet_serve_errors_total", "ray_rlfleet_serve_batch_size_sum",
                   "ray_rlfleet_serve_drift_psi", "ray_rlfleet_serve_drift_ks", "ray_rlfleet_serve_action_shift",
                   "ray_rlfleet_serve_drift_score"):
        assert metric in text, metric
    # Grafana variables become concrete values, then every expression goes through promtool
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"rlfleet:dash_{i}",
         "expr": e.replace("$run_id", ".*").replace("$node", ".*").replace("$deployment", ".*")
         .replace("$__rate_interval", "5m")}
        for i, (_, _, e) in enumerate(exprs)]}]}
    f = tmp_path / "dash_rules.yml"
    f.write_text(yaml.safe_dump(rules))
    r = _run(["promtool", "check", "rules", str(f)])
    assert r.returncode == 0 and f"{len(exprs)} rules found" in r.stdout, r.stdout + r.stderr


def test_preflights_refuse_bad_settings_with_clear_messages(rendered):
    msgs = {int(k): v for k, v in json.loads((rendered / "preflight.json").read_text()).items()}
    assert sorted(msgs) == list(range(8)), msgs
    expect = {
        0: ("nas_client", "would mount nas.example.internal:/export/rlfleet without encryption"),
        1: ("nas_server", "must not include no_root_squash"),
        2: ("nas_server", "never '*' or a wildcard"),
        3: ("firewall", "must not be the whole Internet"),
        4: ("firewall", "Set rlfleet_admin_cidrs in group_vars/all"),
        5: ("ray_runtime", "Put vault_ray_token in group_vars/all/vault.yml"),
        6: ("monitoring", "Put vault_grafana_admin_password in group_vars/all/vault.yml"),
        7: ("gpu", "not an apt package"),
    }
    for i, (role, text) in expect.items():
        assert msgs[i]["role"] == role
        assert text in " ".join(msgs[i]["msg"].split()), msgs[i]
