"""Harness for packet tests: the real XDP program, run by BPF_PROG_TEST_RUN.

One BccDataplane is compiled per session (bcc takes seconds). Each test
programs the maps through the real planner (xdplb.plan) and the real map
writer, then runs packets built with scapy through the kernel. Expected
backends come from an independent prediction: xdplb.flowhash plus the
Maglev table the planner built. CI runs these as root; without root they
are skipped, never faked.
"""
from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass, replace

import pytest

from xdplb import bpfsys, flowhash, plan, structs
from xdplb.config import Settings

GW_MAC = bytes.fromhex("02000a0a000a")
VIP = ipaddress.IPv4Address("10.10.0.100")
CLIENT = "10.10.0.2"


def mac_of(i: int) -> bytes:
    return bytes([2, 0, 10, 10, 0, i])


def backend(i: int, weight: int = 1, healthy: bool = True, mac=True) -> plan.BackendState:
    return plan.BackendState(
        f"be{i}", ipaddress.IPv4Address(f"10.10.0.{i}"), weight, mac_of(i) if mac else None, healthy
    )


def service(name, port, protocol="tcp", persistence="flow", backends=None) -> plan.ServiceState:
    backends = backends if backends is not None else tuple(backend(i) for i in (11, 12, 13))
    return plan.ServiceState(name, VIP, port, protocol, persistence, tuple(backends))


def default_services() -> tuple[plan.ServiceState, ...]:
    return (
        service("dicom", 104),
        service("web", 80, persistence="client"),
        service("udp-echo", 5000, protocol="udp"),
    )


@dataclass
class Verdict:
    action: int
    data: bytes

    @property
    def action_name(self) -> str:
        return structs.ACTIONS[self.action]


class Harness:
    def __init__(self, dp, settings: Settings):
        self.dp = dp
        self.settings = settings
        self.applied = plan.Applied()
        self.desired: plan.Desired | None = None

    def program(self, services, drop_without_backend: bool = False, **flow_settings) -> plan.Plan:
        """flow_settings: plan.Desired's extra_macs, udp_idle_ns, down_grace_ns,
        flood_rate (default: none, no expiry, no grace, no guard)."""
        self.desired = plan.Desired(
            tuple(services), GW_MAC, self.settings.hash_seed, self.settings.maglev_size,
            self.settings.max_services, self.settings.max_backends, drop_without_backend, **flow_settings,
        )
        result = plan.plan(self.applied, self.desired, time.monotonic_ns())
        self.dp.apply(result.ops)
        self.applied = result.applied
        return result

    def reset(self) -> None:
        """Empty every map, as after a fresh load."""
        result = plan.plan(self.applied, replace(self.desired, services=(), down_grace_ns=0) if self.desired else
                           plan.Desired((), GW_MAC, 0, self.settings.maglev_size, 64, 4096))
        self.dp.apply(result.ops)
        self.applied = plan.Applied()
        self.dp.map("flows").clear()
        self.dp.map("flows6").clear()

    def run(self, packet) -> Verdict:
        result = bpfsys.prog_test_run(self.dp.prog_fd, bytes(packet))
        return Verdict(result.retval, result.data)

    def service_state(self, name) -> plan.AppliedService:
        return self.applied.services[name]

    def backend_id(self, service_name: str, address: str) -> int:
        return self.applied.backends[(service_name, address)].id

    def predict(self, service_name, src, sport, dport, proto="tcp") -> str:
        """Address of the backend the live Maglev table gives this flow."""
        svc = self.applied.services[service_name]
        want = next(s for s in self.desired.services if s.name == service_name)
        slot = flowhash.slot_for(self.settings.hash_seed, self.settings.maglev_size, want.persistence,
                                 src, want.vip, sport, dport, structs.IPPROTO[proto], want.client_prefix)
        bid = svc.table[slot]
        for (name, address), be in self.applied.backends.items():
            if name == service_name and be.id == bid:
                return address
        raise AssertionError(f"slot {slot} holds id {bid}, which no backend of {service_name} has")

    def stats(self):
        return self.dp.read_stats([], [])


@pytest.fixture(scope="session")
def dataplane():
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF_PROG_TEST_RUN loads the real program")
    from xdplb.dataplane import BccDataplane

    # Pin to one CPU so the per-CPU counters read back what this test ran.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    return BccDataplane(Settings(hash_seed=0x5EED))


@pytest.fixture
def harness(dataplane):
    h = Harness(dataplane, dataplane.settings)
    h.program(default_services())
    yield h
    h.reset()
