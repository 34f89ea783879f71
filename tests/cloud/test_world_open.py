"""Admin CIDRs that together cover more than a /8 (IPv4) or a /32 (IPv6) are world-open in any
spelling: the Pulumi settings refuse them without allow_world_control_ports=true."""

from __future__ import annotations

import pytest

from rlfleet_cloud.settings import (
    IPV4_MAX_PREFIX,
    IPV6_MAX_PREFIX,
    StackConfigError,
    parse_cidrs,
    parse_settings,
    world_open_reason,
)


@pytest.mark.parametrize("cidrs", [
    ["0.0.0.0/0"],
    ["::/0"],
    ["0.0.0.0/1", "128.0.0.0/1"],  # the whole IPv4 internet in two halves
    ["10.0.0.0/8", "11.0.0.0/8"],  # two /8s: more than one /8 in sum
    ["0.0.0.0/7"],
    ["2000::/3"],  # all of global unicast IPv6
    ["2001:db8::/32", "2001:db9::/32"],  # two /32s
    ["::ffff:0:0/96"],  # IPv4-mapped IPv6: the whole IPv4 internet spelled as IPv6
])
def test_world_open_in_any_spelling_is_refused(cidrs: list[str]) -> None:
    assert world_open_reason(cidrs) is not None
    with pytest.raises(StackConfigError, match="allow_world_control_ports=true"):
        parse_cidrs(",".join(cidrs), allow_world=False)
    with pytest.raises(StackConfigError, match="admin_cidrs"):
        parse_settings("aws", {"admin_cidrs": ",".join(cidrs)}.get, stack="dev")
    # the override still works, and is explicit
    assert parse_cidrs(",".join(cidrs), allow_world=True)


@pytest.mark.parametrize("cidrs", [
    ["10.0.0.0/8"],  # exactly a /8 is allowed
    ["203.0.113.7/32", "198.51.100.0/24"],
    ["10.0.0.0/8", "10.1.0.0/16"],  # overlap is counted once (union)
    ["2001:db8::/32"],  # exactly a /32
    ["2001:db8::/48", "2001:db8:1::/48", "203.0.113.0/24"],
    ["::ffff:203.0.113.0/120"],
])
def test_own_networks_are_accepted(cidrs: list[str]) -> None:
    assert world_open_reason(cidrs) is None
    assert len(parse_cidrs(",".join(cidrs), allow_world=False)) == len(cidrs)


def test_reason_names_the_family_and_the_size() -> None:
    reason = world_open_reason(["0.0.0.0/1", "128.0.0.0/1", "2001:db8::/48"])
    assert reason is not None and "IPv4" in reason and "/0" in reason
    assert "IPv6" in (world_open_reason(["2001:db8::/31"]) or "")
    assert (IPV4_MAX_PREFIX, IPV6_MAX_PREFIX) == (8, 32)
    with pytest.raises(StackConfigError, match="whole internet"):
        parse_cidrs('["0.0.0.0/1", "128.0.0.0/1"]', allow_world=False)
