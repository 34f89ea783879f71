"""Filters the rlfleet roles use to check settings by parsing them, never by substring:
admin networks (how much of the address space they open), NFS security options, the effective
sshd settings (``sshd -T``) and the state of services before the kit touched a host.

Loaded through ``filter_plugins`` in ansible.cfg; the standard library only (no netaddr).
"""

from __future__ import annotations

import ipaddress
from typing import Any

# NFS security flavours and transports that encrypt what crosses the network.
_ENCRYPTING_FLAVOURS = {"krb5p"}
_ENCRYPTING_XPRTSEC = {"tls", "mtls"}
# sshd -T prints the first name of an alias
_SSHD_ALIASES = {"prohibit-password": "without-password"}


# Admin networks that together cover more than this are "world-open" (per family, union of the
# networks). The same rule as infra_cloud/shared/rlfleet_cloud/settings.py world_open_reason
# (tests/onprem/test_hardening.py checks that both agree): IPv4 more than a /8, IPv6 more than a /32
# (an ISP's allocation); IPv4-mapped IPv6 (::ffff:0:0/96) counts as IPv4.
IPV4_MAX_PREFIX = 8
IPV6_MAX_PREFIX = 32
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def invalid_networks(cidrs: Any) -> list[str]:
    """Entries that are not an IP address or network (a host name would be resolved by nft)."""
    bad = []
    for c in cidrs or []:
        try:
            ipaddress.ip_network(str(c).strip(), strict=False)
        except ValueError:
            bad.append(str(c))
    return bad


def world_open_reason(cidrs: Any) -> str:
    """Why these networks count as world-open, "" if they do not. ``0.0.0.0/1`` + ``128.0.0.0/1``
    is as open as ``0.0.0.0/0``: the union is measured, not the spelling. Host bits are allowed,
    as nft allows them (10.1.2.3/8 is 10.0.0.0/8); invalid entries are left to invalid_networks."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for c in cidrs or []:
        try:
            net = ipaddress.ip_network(str(c).strip(), strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_V4_MAPPED):
            v4.append(ipaddress.IPv4Network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}"))
        elif isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    reasons = []
    for family, nets, bits, limit in (("IPv4", v4, 32, IPV4_MAX_PREFIX), ("IPv6", v6, 128, IPV6_MAX_PREFIX)):
        total = sum(n.num_addresses for n in ipaddress.collapse_addresses(nets))  # type: ignore[type-var]
        if total > 2 ** (bits - limit):
            size = f"/{bits - (total.bit_length() - 1)}" if total & (total - 1) == 0 else f"{total} addresses"
            reasons.append(f"{family} {size} in total, more than a /{limit}")
    return "; ".join(reasons)


def _nfs_values(options: Any, key: str) -> list[str] | None:
    """Every value of ``key=a:b`` in a comma-separated NFS option string; None when absent."""
    found = None
    for opt in str(options or "").split(","):
        name, sep, value = opt.strip().partition("=")
        if name == key:
            found = (found or []) + (value.split(":") if sep else [""])
    return found


def nfs_flavours(options: Any) -> list[str]:
    """The security flavours an NFS option string names (``sec=krb5p:sys`` -> [krb5p, sys])."""
    return _nfs_values(options, "sec") or []


def nfs_encrypted(options: Any) -> bool:
    """True when every way the mount/export may be used encrypts: only Kerberos privacy
    (``sec=krb5p``), or only RPC-over-TLS (``xprtsec=tls|mtls``). A list such as
    ``sec=krb5p:sys`` or ``xprtsec=none:tls`` lets a peer fall back to clear text: refused."""
    sec = _nfs_values(options, "sec")
    xprtsec = _nfs_values(options, "xprtsec")
    if xprtsec is not None and set(xprtsec) <= _ENCRYPTING_XPRTSEC:
        return True
    return sec is not None and set(sec) <= _ENCRYPTING_FLAVOURS


def nfs_flags(options: Any) -> list[str]:
    """The option names of an NFS option string (``rw,sec=krb5p`` -> [rw, sec])."""
    return [o.strip().partition("=")[0] for o in str(options or "").split(",") if o.strip()]


def sshd_mismatches(sshd_t_output: str, wanted: dict[str, Any]) -> list[str]:
    """Settings whose effective value (``sshd -T`` output) differs from what the kit wants."""
    effective = {}
    for line in str(sshd_t_output).splitlines():
        key, _, value = line.strip().partition(" ")
        effective.setdefault(key.lower(), value.strip().lower())
    out = []
    for key, value in wanted.items():
        want = str(value).lower()
        have = effective.get(key.lower(), "(unset)")
        if have not in (want, _SSHD_ALIASES.get(want)):
            out.append(f"{key} is {have}, wanted {want}")
    return out


def service_states(services: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """From ansible_facts.services: every installed systemd service (name without ".service")
    with whether it was enabled and running. Written once, before rlfleet installs anything."""
    out = {}
    for unit, facts in sorted((services or {}).items()):
        if not unit.endswith(".service") or facts.get("status") == "not-found":
            continue
        out[unit.removesuffix(".service")] = {
            "enabled": facts.get("status") == "enabled",
            "active": facts.get("state") == "running",
        }
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "rlfleet_invalid_networks": invalid_networks,
            "rlfleet_world_open_reason": world_open_reason,
            "rlfleet_nfs_encrypted": nfs_encrypted,
            "rlfleet_nfs_flavours": nfs_flavours,
            "rlfleet_nfs_flags": nfs_flags,
            "rlfleet_sshd_mismatches": sshd_mismatches,
            "rlfleet_service_states": service_states,
        }
