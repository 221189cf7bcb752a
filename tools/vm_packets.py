#!/usr/bin/python3
"""Packet equivalence: native XDP on the guest's virtio-net against BPF_PROG_TEST_RUN.

The same frames go through the same loaded program twice, in the lb guest
of the Vagrant lab (tools/vm_lab.py):

- **native**: a frame is sent from the client namespace onto the lab
  segment, QEMU delivers it to the guest's virtio-net NIC, the program
  attached in driver mode runs; its verdict is read as the delta of the
  program's own ``xdp_actions`` counter, and a forwarded frame (XDP_TX) is
  captured where it lands, in the backend namespace;
- **test run**: the frame the NIC received is run through the same program
  (found by id on the guest's link, the same maps) with BPF_PROG_TEST_RUN;
  its verdict is the return value and its output the frame the kernel
  hands back.

What cannot be compared, and why (the comparison reports each case):

- a frame shorter than 60 bytes may reach the guest padded with zeros
  (Ethernet's minimum; some QEMU paths pad): the test run is given the
  frame padded and as sent, and the capture of a forwarded frame shows
  which the program saw (as sent, on this tap to virtio-net path); the
  fixture's expected verdict is checked only for frames of 60 bytes or more;
- QEMU's virtio-net drops frames for foreign MACs and 802.1Q frames of VLANs
  the guest did not register: the caller registers the fixtures' VLAN, and
  a frame that never reaches the program (no counter moves) is reported as
  filtered;
- passed and dropped frames never reach a backend: only their verdicts
  compare.

Sub-commands (the first runs in the guest, the others in lab namespaces; all
as root):

    vm_packets.py serve IFACE          answer "actions" and "run HEX" lines on stdin
    vm_packets.py send IFACE           send each HEX frame read on stdin, answer "sent"
    vm_packets.py capture IFACE SRC_MAC  print frames from SRC_MAC to this host, as hex

``serve`` needs xdplb (bpfsys); ``send`` and ``capture`` the standard library.
"""
from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 1 << 4, 1 << 6
AUXDATA = struct.Struct("=IIIHHHH")   # struct tpacket_auxdata
MIN_FRAME = 60          # what QEMU pads a short frame to (Ethernet minimum without FCS)
SETTLE = 3.0            # seconds for a sent frame to be counted in the guest
TRIES = 3


# ---- guest side -------------------------------------------------------------

class Program:
    """The XDP program attached to ``iface``, and its ``xdp_actions`` counter."""

    def __init__(self, iface: str):
        from xdplb import bpfsys, structs

        self.bpfsys, self.actions = bpfsys, structs.ACTIONS
        link = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show", iface], check=True,
                                         capture_output=True, text=True).stdout)[0]
        self.prog_fd = bpfsys.fd_by_id(bpfsys.BPF_PROG_GET_FD_BY_ID, link["xdp"]["prog"]["id"])
        self.map_fd = None
        for map_id in bpfsys.prog_map_ids(self.prog_fd):
            fd = bpfsys.fd_by_id(bpfsys.BPF_MAP_GET_FD_BY_ID, map_id)
            if bpfsys.map_info(fd).name == "xdp_actions":
                self.map_fd = fd
                break
            __import__("os").close(fd)
        if self.map_fd is None:
            raise SystemExit(f"the program on {iface} holds no xdp_actions map")
        first, _, last = open("/sys/devices/system/cpu/possible").read().strip().partition("-")
        self.cpus = int(last or first) + 1

    def counts(self) -> dict[str, int]:
        """Packets per XDP action, summed over CPUs (a per-CPU array of u64)."""
        items = self.bpfsys.map_items(self.map_fd, 4, 8 * self.cpus)
        out = {}
        for key, value in items.items():
            index = int.from_bytes(key, "little")
            if index < len(self.actions):
                out[self.actions[index]] = sum(int.from_bytes(value[i:i + 8], "little")
                                               for i in range(0, len(value), 8))
        return out

    def run(self, frame: bytes) -> dict:
        result = self.bpfsys.prog_test_run(self.prog_fd, frame)
        return {"action": self.actions[result.retval], "data": result.data.hex()}


def serve(iface: str) -> int:
    prog = Program(iface)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        word, _, arg = line.strip().partition(" ")
        if word == "actions":
            print(json.dumps(prog.counts()), flush=True)
        elif word == "run":
            print(json.dumps(prog.run(bytes.fromhex(arg))), flush=True)
        else:
            print(json.dumps({"error": f"unknown request {word!r}"}), flush=True)
    return 0


# ---- namespace side ---------------------------------------------------------

def send(iface: str) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    for line in sys.stdin:
        sock.send(bytes.fromhex(line.strip()))
        print("sent", flush=True)
    return 0


def capture(iface: str, src_mac: str) -> int:
    """Frames from ``src_mac`` to this interface's own MAC, one hex line each.

    The kernel takes a VLAN tag off a received frame before a packet socket
    sees it; the tag is put back from the socket's PACKET_AUXDATA.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.bind((iface, 0))
    own = bytes.fromhex(open(f"/sys/class/net/{iface}/address").read().strip().replace(":", ""))
    src = bytes.fromhex(src_mac.replace(":", ""))
    print("ready", flush=True)
    while True:
        frame, ancillary, _flags, addr = sock.recvmsg(65535, socket.CMSG_SPACE(AUXDATA.size))
        if addr[2] == socket.PACKET_OUTGOING or frame[:6] != own or frame[6:12] != src:
            continue
        for level, kind, data in ancillary:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= AUXDATA.size:
                status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack(data[:AUXDATA.size])
                if status & TP_STATUS_VLAN_VALID:
                    tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
                    frame = frame[:12] + struct.pack("!HH", tpid, tci) + frame[12:]
        print(frame.hex(), flush=True)


# ---- host side: drive both and compare --------------------------------------

class _Lines:
    """A child process spoken to in lines."""

    def __init__(self, argv: list[str], what: str):
        self.what = what
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, line: str, timeout: float = 120) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def read(self, timeout: float = 120) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        answer = self.proc.stdout.readline() if ready else ""
        if not answer:
            raise RuntimeError(f"{self.what} did not answer within {timeout:.0f}s (exit {self.proc.poll()})")
        return answer.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def _native(guest: _Lines, sender: _Lines, frame: bytes) -> dict:
    """Send ``frame`` once from the client; the guest's counter delta that followed."""
    before = json.loads(guest.ask("actions"))
    sender.ask(frame.hex())
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline and not _delta(before, json.loads(guest.ask("actions"))):
        time.sleep(0.05)
    time.sleep(0.3)  # anything else arriving now would show as a second count
    return _delta(before, json.loads(guest.ask("actions")))


def serve_command(iface: str, python: str = "/vagrant/.venv/bin/python") -> str:
    """The shell command that runs ``serve`` in the guest (the repository is at /vagrant there)."""
    return f"sudo {python} /vagrant/tools/{Path(__file__).name} serve {iface}"


def compare(serve_argv: list[str], send_argv: list[str], lab, frames: list[tuple[str, bytes, str]],
            guest_mac: str, min_frame: int = MIN_FRAME) -> tuple[list[dict], dict]:
    """Each (description, frame, expected action) natively in the guest, then by test run.

    ``send_argv`` runs ``send`` on an interface whose frames reach the
    guest's NIC and nothing else (the guest's tap: no bridge on the way,
    whose br_netfilter would drop malformed IPv4); a frame shorter than
    ``min_frame`` is also run padded to it.  The backends capture what reaches
    them; they must not answer (no VIP on their lo then), or their answers
    would come back through the program.
    ``serve_argv`` runs ``serve`` where the program is attached (the
    guest, over ssh); its xdplb must be quiet (probes stopped) and its stack
    deaf on that NIC (a tc drop after XDP), because anything else the NIC
    receives moves the counter too.  A frame whose native delta is not one
    packet is sent again,
    up to ``TRIES`` times, and every delta is kept).  Returns one record per
    frame (native deltas, the test run's verdict, counter delta and output,
    the unpadded frame's test-run verdict when QEMU pads it, the backends that
    captured the output) and {backend: [frames captured, hex]}.
    """
    guest = _Lines(serve_argv, "the test-run server")
    sender = _Lines(send_argv, "the sender")
    captures = {name: subprocess.Popen(["ip", "netns", "exec", lab.ns(name), "/usr/bin/python3", __file__,
                                        "capture", "eth0", guest_mac], stdout=subprocess.PIPE, text=True)
                for name in lab.backend_names()}
    records = []
    try:
        assert json.loads(guest.read(600)).get("ready"), "the guest's server did not start"
        for proc in captures.values():
            assert proc.stdout.readline().strip() == "ready"
        for description, frame, expected in frames:
            natives = [_native(guest, sender, frame)]
            while sum(natives[-1].values()) != 1 and len(natives) < TRIES:
                natives.append(_native(guest, sender, frame))
            before = json.loads(guest.ask("actions"))
            test_run = json.loads(guest.ask("run " + frame.ljust(min_frame, b"\0").hex()))
            test_delta = _delta(before, json.loads(guest.ask("actions")))
            unpadded = json.loads(guest.ask("run " + frame.hex())) if len(frame) < min_frame else None
            records.append({"description": description, "length": len(frame), "expected": expected,
                            "native": natives, "test_run": test_run["action"], "test_run_delta": test_delta,
                            "output": test_run["data"],
                            "unpadded_test_run": unpadded and unpadded["action"],
                            "unpadded_output": unpadded and unpadded["data"]})
    finally:
        guest.close()
        sender.close()
        time.sleep(1.0)   # the last forwarded frame's way to the backend
        for proc in captures.values():
            proc.kill()
        captured = {name: proc.communicate()[0].split() for name, proc in captures.items()}
    for record in records:
        outputs = {record["output"], record["unpadded_output"]} - {None}
        record["captured_at"] = sorted(name for name, got in captured.items() if outputs & set(got))
    return records, captured


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        return serve(argv[1])
    if len(argv) == 2 and argv[0] == "send":
        return send(argv[1])
    if len(argv) == 3 and argv[0] == "capture":
        return capture(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
