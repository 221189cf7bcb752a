"""A network namespace for bpf_fib_lookup under BPF_PROG_TEST_RUN.

BPF_PROG_TEST_RUN runs the program in the calling thread's network
namespace, and bpf_fib_lookup looks the route and the neighbour up there,
on the interface the test run names as the ingress (xdp_md.ingress_ifindex).
FibNet makes a namespace, runs `ip` commands in it, and lends it to the
calling thread for a while (`inside`), so NAT replies can be run through
the real route and neighbour tables without touching the host's. Used by
the data-plane bench and tests/packet/test_nat.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class FibNet:
    """Network namespace `name`, made now and deleted by close()."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        self._fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        self.sysctl("net.ipv4.ip_forward=1")

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def sysctl(self, setting: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-qw", setting], check=True)

    def ifindex(self, link: str) -> int:
        out = subprocess.run(["ip", "-n", self.name, "-j", "link", "show", link], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)[0]["ifindex"]

    @contextlib.contextmanager
    def inside(self):
        """The calling thread in this namespace until the block ends."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self._fd)
            yield
        finally:
            _setns(home)
            os.close(home)

    def close(self) -> None:
        os.close(self._fd)
        subprocess.run(["ip", "netns", "del", self.name], check=False)
