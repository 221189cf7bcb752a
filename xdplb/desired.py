"""What the data plane should hold, from the pool, health verdicts and MACs.

Pure: the daemon calls `desired_state` after every change and hands the
result to `plan.plan`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .config import FLOW_TABLE_SIZE_RANGE, Pool, balances_ipv6
from .health_fsm import Health, State
from .plan import BackendState, Desired, ServiceState


def is_drained(service: str, backend, drained) -> bool:
    """Drained by the pool (weight 0) or at run time. A backend is (service
    name, address) everywhere, so a drain survives renaming the backend."""
    return backend.weight == 0 or (service, backend.address) in drained


def desired_state(pool: Pool, health: Mapping[tuple, Health], macs: Mapping, gw_mac: bytes,
                  drained: frozenset | set = frozenset()) -> Desired:
    """health is keyed by (service name, backend address); macs by address;
    drained holds (service name, backend address) pairs drained at run time,
    which count as weight 0: no new flows, existing flows stay."""
    services = []
    for svc in pool.services:
        if svc.tls is not None:
            continue  # HAProxy terminates it: its packets go to the gateway's stack (XDP_PASS)
        backends = tuple(
            BackendState(
                be.name,
                be.address,
                0 if is_drained(svc.name, be, drained) else be.weight,
                macs.get(be.address),
                health.get((svc.name, be.address), Health()).state is State.UP,
                svc.backend_port(be) if svc.forwarding == "nat" else 0,
            )
            for be in svc.backends
        )
        services.append(ServiceState(svc.name, svc.vip, svc.port, svc.protocol, svc.persistence, backends,
                                     svc.forwarding, svc.client_prefix))
    st = pool.settings
    return Desired(tuple(services), gw_mac, st.hash_seed, st.maglev_size, st.max_services, st.max_backends,
                   st.no_backend == "drop", extra_macs=st.extra_macs,
                   udp_idle_ns=_ns(st.udp_idle_timeout), down_grace_ns=_ns(st.down_grace),
                   flood_rate=st.flood_guard_rate)


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


# Settings baked into the compiled program: changing them needs a restart.
# flow_table_size6 follows the pool's services when it is not set (config.py),
# so a reload that adds the first IPv6 service, or removes the last, changes it:
# keep_running_flows6 decides which of those the running program absorbs.
COMPILED_SETTINGS = ("maglev_size", "max_services", "max_backends", "flow_table_size", "flow_table_size6")


def keep_running_flows6(old: Pool, new: Pool) -> Pool:
    """`new`, with the running flows6 size where its own only follows from
    its services (flow_table_size6 unset) and another would block: such a
    pool never needs a restart for flows6. The kept table is resized by a
    later restart once no IPv6 service is programmed (pinning.prepare).
    Only the first IPv6 service keeps the size it implies (a restart gives
    it, as nothing uses flows6 yet), where the minimum would leave it few flows."""
    before, after = old.settings.flow_table_size6, new.settings.flow_table_size6
    if not new.settings.flows6_size_implied or before == after:
        return new
    if balances_ipv6(new.services) and not balances_ipv6(old.services):
        return new
    return dataclasses.replace(new, settings=dataclasses.replace(new.settings, flow_table_size6=before))


def restart_needed(old: Pool, new: Pool) -> list[str]:
    """Compiled-in settings that differ between two pools, as 'key old -> new'
    (flow_table_size6 says why it changed and the steps that work). Call it
    with keep_running_flows6(old, new) as `new`."""
    changed = []
    for key in COMPILED_SETTINGS:
        before, after = getattr(old.settings, key), getattr(new.settings, key)
        if before == after:
            continue
        text = f"{key} {before} -> {after}"
        if key == "flow_table_size6":
            text += f" ({_flows6_resize_steps(old, new)})"
        changed.append(text)
    return changed


def _flows6_resize_steps(old: Pool, new: Pool) -> str:
    """Why flows6 changes size and how to get there (only steps that work:
    a restart resizes flows6 only while no IPv6 service is programmed)."""
    before = old.settings.flow_table_size6
    if new.settings.flows6_size_implied:
        why = (f"the IPv6 flow table: unset, it is flow_table_size while the pool balances an IPv6 service and "
               f"{FLOW_TABLE_SIZE_RANGE[0]} without one")
    else:
        why = "the IPv6 flow table"
    if not balances_ipv6(old.services):
        return f"{why}; restart xdplb to resize it, which keeps every flow while no IPv6 service is programmed"
    return (f"{why}; IPv6 services are programmed, so a restart cannot resize it either: keep "
            f"flow_table_size6 = {before}, or first reload this pool without its IPv6 services and with "
            f"flow_table_size6 = {before}, then restart xdplb with the new size and the IPv6 services")
