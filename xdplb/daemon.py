"""The `xdplb attach` daemon: glue between pool, probes, planner and kernel.

Everything it decides comes from pure modules (config, health_fsm, desired,
plan, modes); everything it changes goes through two injected objects, a
dataplane (xdplb/dataplane.py) and a netlink handle (xdplb/netlink.py), which
tests replace with fakes. It runs one asyncio loop:

  start:  load pool -> compile -> first probe round -> program maps ->
          attach -> add VIPs -> control socket -> "ready"
  events: a probe result that changes a verdict, a neighbour MAC change,
          SIGHUP (reload) -> recompute desired state -> plan -> apply
  stop:   SIGTERM/SIGINT -> detach the program, remove the VIPs it added,
          remove the control socket
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from . import __version__, control, modes, probes
from .config import Pool, PoolError, load_pool
from .desired import desired_state, restart_needed
from .health_fsm import Health, State, is_changing, step
from .plan import Applied, PlanError, adopt, plan, retire_due
from .telemetry import Telemetry

log = logging.getLogger("xdplb")

MAC_REFRESH_SECONDS = 1.0
PROG_NAME = "xdplb_ingress"   # the name bcc gives the program (its C function)
EXIT_LEFT_RUNNING = 75        # EX_TEMPFAIL: systemd's RestartForceExitStatus restarts on it


class AttachError(RuntimeError):
    pass


class Daemon:
    def __init__(self, ifname: str, pool_path: str, mode: str = "auto", *,
                 dataplane_factory=None, netlink=None, probe=probes.run_probe, prog_name_lookup=None):
        self.ifname = ifname
        self.pool_path = pool_path
        self.requested_mode = mode
        self._dataplane_factory = dataplane_factory
        self.netlink = netlink
        self.probe = probe
        self.pool: Pool | None = None
        self.link = None
        self.dp = None
        self.mode: str | None = None
        self.applied = Applied()
        self.health: dict[tuple, Health] = {}
        self.macs: dict = {}
        self.added_vips: set = set()
        self.started = time.time()
        self.ready = False
        self.last_reload: dict = {"result": "none"}
        self.telemetry = Telemetry()
        self._tasks: dict[tuple, asyncio.Task] = {}
        self._keys: dict[tuple, tuple] = {}   # (service name, address) -> (Service, Backend)
        self._stop = asyncio.Event()
        self._first_verdicts = asyncio.Event()
        self._server = None
        self._socket_path = None
        self._mac_task = None
        self.exporter = None          # xdplb/exporter.py's Exporter while metrics are served
        self.adopting = False         # an earlier xdplb program is attached: replace it, adopt its maps
        self.leave_running = False    # SIGUSR1: exit without detaching
        self.drained: set[tuple] = set()  # (service name, backend name) drained at run time
        if prog_name_lookup is None:
            from .bpfsys import prog_name as prog_name_lookup
        self._prog_name = prog_name_lookup

    # ---- start and stop ---------------------------------------------------

    async def run(self) -> int:
        """Run until signalled. Returns the exit code: 0 after a clean stop,
        EXIT_LEFT_RUNNING after SIGUSR1 (program, maps and VIPs left in place
        for the next `xdplb attach` to adopt)."""
        self.pool = load_pool(self.pool_path)  # PoolError: nothing has changed yet
        if self.netlink is None:
            from .netlink import Netlink
            self.netlink = Netlink()
        self.link = self.netlink.link(self.ifname)
        if self.link.xdp_prog_id:
            name = self._prog_name(self.link.xdp_prog_id)
            if name != PROG_NAME:
                raise AttachError(
                    f"{self.ifname} already has an XDP program attached ({name!r}, id {self.link.xdp_prog_id}) "
                    f"that is not xdplb's; remove it first"
                )
            self.adopting = True
        self._socket_path = control.prepare(self.ifname)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._leave_running)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload("SIGHUP"))
        try:
            await self._start()
            await self._stop.wait()
        finally:
            await self._cleanup()
        return EXIT_LEFT_RUNNING if self.leave_running else 0

    def _leave_running(self) -> None:
        log.info("SIGUSR1: exiting for a restart; the XDP program, its pinned maps and the VIPs stay")
        self.leave_running = True
        self._stop.set()

    async def _start(self) -> None:
        factory = self._dataplane_factory
        if factory is None:
            from .dataplane import BccDataplane as factory
        from . import pinning

        pin_dir = pinning.pin_dir(self.ifname)
        if self.adopting and not pinning.pinned_maps(pin_dir):
            raise AttachError(
                f"{self.ifname} carries an xdplb program but no maps are pinned at {pin_dir} to adopt; "
                f"run `xdplb detach {self.ifname}` (established flows will break), or set XDPLB_BPFFS "
                f"to where the earlier instance pinned them"
            )
        log.info("compiling the XDP program (maglev_size %d), maps pinned at %s",
                 self.pool.settings.maglev_size, pin_dir)
        self.dp = factory(self.pool.settings, pin_dir=pin_dir)
        for note in getattr(self.dp, "notes", []):
            log.warning("%s", note)
        log.info("compiled and loaded in %.1fs", getattr(self.dp, "compile_seconds", 0.0))
        if getattr(self.dp, "adopted", False):
            self._adopt()
        self._refresh_macs()
        self._sync_probes()
        timeout = max((s.health.timeout for s in self.pool.services), default=1.0) + 1.0
        try:
            await asyncio.wait_for(self._first_verdicts.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("not every backend answered its first probe within %.1fs", timeout)
        self._refresh_macs()
        self.sync()
        self.mode = self._attach()
        self._sync_vips()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self._socket_path))
        os.chmod(self._socket_path, 0o600)
        self._mac_task = asyncio.get_running_loop().create_task(self._mac_loop())
        from .exporter import serve as serve_metrics

        self.exporter = await serve_metrics(self, self.pool)  # logs and returns None if it cannot listen
        self.ready = True
        up = sum(1 for h in self.health.values() if h.state is State.UP)
        log.info("ready on %s in %s mode: %d service(s), %d of %d backend(s) up",
                 self.ifname, self.mode, len(self.pool.services), up, len(self.health))

    def _adopt(self) -> None:
        """Take over the maps an earlier instance left pinned: keep its ids, so
        its flow entries stay valid, and its VIP addresses and drain marks."""
        kernel = self.dp.read_state()
        names = {s.key: s.name for s in self.pool.services}
        self.applied = adopt(kernel, names)
        self.added_vips = set(self.netlink.vips(self.link.index))
        self.drained = self._load_drained()
        flows = len(self.dp.flows()) if hasattr(self.dp, "flows") else 0
        log.info("adopted pinned maps: %d service(s), %d backend id(s), %d flow(s), VIPs %s",
                 len(kernel.services), len(kernel.backends), flows,
                 ", ".join(sorted(map(str, self.added_vips))) or "none")

    def _attach(self) -> str:
        if self.adopting:
            # Same mode as the program being replaced: a second program in
            # the other mode would not replace it.
            mode = self.link.xdp_mode
            self.dp.attach(self.ifname, mode, replace=True)
            log.info("replaced the running xdplb program on %s in %s mode without a gap", self.ifname, mode)
            return mode
        errors = []
        for mode, why in modes.attempts(self.requested_mode, self.link.kind):
            try:
                self.dp.attach(self.ifname, mode)
            except Exception as exc:  # the kernel layer reports driver refusals as LoadError
                errors.append(f"{mode}: {exc}")
                continue
            log.info("attached to %s in %s mode (%s)", self.ifname, mode, why)
            return mode
        raise AttachError(f"could not attach to {self.ifname}: " + "; ".join(errors))

    async def _cleanup(self) -> None:
        for task in [*self._tasks.values(), self._mac_task]:
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
        if self.exporter is not None:
            await self.exporter.stop()
            self.exporter = None
        if self.leave_running:
            self._save_drained()
            log.info("left running on %s: program, pinned maps and VIPs stay for the next xdplb attach",
                     self.ifname)
        elif self.adopting and self.mode is None:
            # Taking over failed before our program went in: the earlier
            # program still runs on the pinned maps and VIPs; leave them be.
            log.error("start-up failed while taking over %s; the running xdplb program is left in place",
                      self.ifname)
        else:
            log.info("stopping: detaching from %s", self.ifname)
            if self.dp is not None and getattr(self.dp, "attached", None):
                self.dp.detach()
                log.info("detached the XDP program from %s", self.ifname)
            if self.dp is not None and hasattr(self.dp, "unpin") and self.dp.unpin():
                log.info("removed the pinned maps")
            for vip in sorted(self.added_vips):
                self.netlink.del_vip(self.link.index, vip)
                log.info("removed VIP %s from %s", vip, self.ifname)
            self.added_vips.clear()
            self._drain_file().unlink(missing_ok=True)
        if self._socket_path is not None and self._socket_path.exists():
            self._socket_path.unlink()

    def stop(self) -> None:
        self._stop.set()

    # ---- state -> kernel --------------------------------------------------

    def sync(self, prepared: tuple | None = None) -> None:
        """Recompute what the maps should hold and write the difference.

        ``prepared`` is a (desired, plan result) pair planned from the current
        applied state (a reload's dry run); it is used when the desired state
        is still the same, so the Maglev tables are not built twice.
        """
        desired = desired_state(self.pool, self.health, self.macs, self.link.mac, self.drained)
        started = time.monotonic()
        if prepared is not None and prepared[0] == desired:
            result = prepared[1]
        else:
            result = plan(self.applied, desired, time.monotonic_ns())
        if result.ops:
            self.dp.apply(result.ops)
        self.applied = result.applied
        if result.rebuilt:
            self.telemetry.rebuilt(time.monotonic() - started)
            log.info("Maglev table rebuilt and flipped for %s (%d writes, %.0f ms)",
                     ", ".join(result.rebuilt), len(result.ops), (time.monotonic() - started) * 1000)

    def _wanted_vips(self) -> set:
        if not self.pool.settings.manage_vips:
            return set()
        return {s.vip for s in self.pool.services}

    def _sync_vips(self) -> None:
        wanted = self._wanted_vips()
        for vip in sorted(wanted - self.added_vips):
            if self.netlink.add_vip(self.link.index, vip):
                self.added_vips.add(vip)
                log.info("added VIP %s/32 to %s", vip, self.ifname)
            else:
                log.info("VIP %s is already on %s; leaving it as configured", vip, self.ifname)
        for vip in sorted(self.added_vips - wanted):
            self.netlink.del_vip(self.link.index, vip)
            self.added_vips.discard(vip)
            log.info("removed VIP %s from %s", vip, self.ifname)

    # ---- neighbours -------------------------------------------------------

    def _backend_addresses(self) -> set:
        return {be.address for s in self.pool.services for be in s.backends}

    def _refresh_macs(self) -> bool:
        changed = False
        for address in sorted(self._backend_addresses()):
            mac = self.netlink.neighbour_mac(self.link.index, address)
            old = self.macs.get(address)
            if mac is None:
                self.netlink.solicit(address)
                continue  # keep the last known MAC; a failed probe takes a dead host out
            if mac != old:
                changed = True
                self.macs[address] = mac
                if old is not None:
                    log.info("backend %s moved from MAC %s to %s", address, old.hex(":"), mac.hex(":"))
        for address in set(self.macs) - self._backend_addresses():
            del self.macs[address]
        return changed

    def _refresh_link_mac(self) -> bool:
        """Re-read the interface's own MAC (the program balances only frames
        sent to it); True when it changed."""
        link = self.netlink.link(self.ifname)
        if link.mac == self.link.mac:
            return False
        log.info("%s changed its MAC from %s to %s", self.ifname, self.link.mac.hex(":"), link.mac.hex(":"))
        self.link = link
        return True

    async def _mac_loop(self) -> None:
        while True:
            await asyncio.sleep(MAC_REFRESH_SECONDS)
            try:
                link_changed = self._refresh_link_mac()
            except Exception as exc:  # a vanished or renamed link must not stop the neighbour refresh
                log.warning("cannot re-read %s: %s", self.ifname, exc)
                link_changed = False
            # Bitwise or: both refreshes run every round.
            if self._refresh_macs() | link_changed or retire_due(self.applied, time.monotonic_ns()):
                self.sync()

    # ---- health -----------------------------------------------------------

    def _probe_keys(self) -> dict:
        return {(s.name, be.address): (s, be) for s in self.pool.services for be in s.backends}

    def _sync_probes(self) -> None:
        keys = self._keys = self._probe_keys()
        for key in list(self._tasks):
            if key not in keys:
                self._tasks.pop(key).cancel()
                self.health.pop(key, None)
        loop = asyncio.get_running_loop()
        for key in keys:
            if key not in self._tasks:
                self.health.setdefault(key, Health())
                self._tasks[key] = loop.create_task(self._probe_loop(key))

    async def _probe_loop(self, key: tuple) -> None:
        while True:
            svc, be = self._keys[key]
            hc = svc.health
            try:
                result = await self.probe(hc, str(be.address))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a probe bug must not freeze this backend's verdict
                log.exception("probe of %s (%s) for %s crashed", be.name, be.address, svc.name)
                result = probes.ProbeResult(False, f"{hc.check} probe crashed: {exc!r}", 0.0, "error")
            self._on_result(key, result)
            # While a verdict is in the balance (a streak toward rise or fall),
            # probe twice as often, as ExaBGP does: failover and recovery come
            # sooner, and a steady backend costs no extra probes.
            interval = hc.interval / 2 if is_changing(self.health.get(key, Health())) else hc.interval
            await asyncio.sleep(max(0.0, interval - result.seconds))

    def _on_result(self, key: tuple, result) -> None:
        if key not in self._keys:
            return  # removed by a reload while the probe ran
        svc, be = self._keys[key]
        old = self.health.get(key, Health())
        new, transition = step(old, result.ok, result.reason, time.time(), svc.health.rise, svc.health.fall)
        self.health[key] = new
        self.telemetry.probe(svc.name, be.name, svc.health.check, result.seconds, result.ok,
                             getattr(result, "kind", "error"), result.reason)
        if transition is not None:
            self.telemetry.transition(svc.name, be.name, transition.old.value, transition.new.value,
                                      transition.reason, transition.at)
            log.info("backend %s (%s) of %s: %s -> %s: %s", be.name, be.address, svc.name,
                     transition.old.value, transition.new.value, transition.reason)
            if self.ready:
                self.sync()
        if not self._first_verdicts.is_set() and all(h.state is not State.UNKNOWN for h in self.health.values()):
            self._first_verdicts.set()

    # ---- reload -----------------------------------------------------------

    def reload(self, trigger: str) -> dict:
        """Re-read the pool file. A bad file changes nothing."""
        try:
            new = load_pool(self.pool_path)
            blocked = restart_needed(self.pool, new)
            if blocked:
                raise PoolError(f"{self.pool_path}: changing {', '.join(blocked)} needs a restart of xdplb")
            # Dry run: the new pool must fit the compiled maps before anything changes.
            dry_desired = desired_state(new, self.health, self.macs, self.link.mac, self.drained)
            dry_run = plan(self.applied, dry_desired, time.monotonic_ns())
        except (PoolError, PlanError) as exc:
            log.error("reload (%s) rejected, keeping the running configuration: %s", trigger, exc)
            self.last_reload = {"result": "rejected", "error": str(exc), "at": time.time()}
            self.telemetry.reload("rejected")
            return self.last_reload
        self.pool = new
        self._sync_probes()
        self._refresh_macs()
        self._sync_vips()
        self.sync(prepared=(dry_desired, dry_run))
        log.info("reload (%s) applied: %d service(s)", trigger, len(new.services))
        self.last_reload = {"result": "applied", "at": time.time()}
        self.telemetry.reload("applied")
        return self.last_reload

    # ---- drain --------------------------------------------------------------

    def _drain_file(self):
        return control.run_dir() / f"{self.ifname}.drained.json"

    def _load_drained(self) -> set:
        import json

        try:
            return {tuple(pair) for pair in json.loads(self._drain_file().read_text())}
        except (OSError, ValueError):
            return set()

    def _save_drained(self) -> None:
        import json

        path = self._drain_file()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(json.dumps(sorted(self.drained)))

    def set_drain(self, service: str, backend: str, drained: bool) -> dict:
        """Drain (no new flows, existing flows stay) or undrain a backend."""
        svc = next((s for s in self.pool.services if s.name == service), None)
        if svc is None:
            return {"error": f"no service {service!r}; services: {', '.join(s.name for s in self.pool.services)}"}
        if not any(be.name == backend for be in svc.backends):
            return {"error": f"service {service!r} has no backend {backend!r}; "
                             f"backends: {', '.join(be.name for be in svc.backends)}"}
        key = (service, backend)
        changed = (key not in self.drained) if drained else (key in self.drained)
        if drained:
            self.drained.add(key)
        else:
            self.drained.discard(key)
        if changed:
            self._save_drained()
            log.info("%s %s of %s: %s", "drained" if drained else "undrained", backend, service,
                     "no new flows, existing flows keep flowing" if drained else "takes new flows again")
            self.sync()
        return {"ok": True, "changed": changed, "service": service, "backend": backend, "drained": drained}

    # ---- control socket ---------------------------------------------------

    async def _handle(self, reader, writer) -> None:
        try:
            line = await reader.readline()
            import json
            try:
                message = json.loads(line or b"{}")
                cmd = message.get("cmd")
            except ValueError:
                cmd = None
            if cmd == "ping":
                reply = {"ok": True}
            elif cmd == "status":
                reply = self.status()
            elif cmd == "reload":
                reply = self.reload("control socket")
            elif cmd in ("drain", "undrain"):
                reply = self.set_drain(str(message.get("service")), str(message.get("backend")), cmd == "drain")
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    def status(self) -> dict:
        service_ids = [a.id for a in self.applied.services.values()]
        backend_ids = [b.id for b in self.applied.backends.values()]
        stats = self.dp.read_stats(service_ids, backend_ids)
        services = []
        for svc in self.pool.services:
            applied = self.applied.services.get(svc.name)
            sc = stats.services.get(applied.id) if applied else None
            backends = []
            for be in svc.backends:
                h = self.health.get((svc.name, be.address), Health())
                ab = self.applied.backends.get((svc.name, str(be.address)))
                bc = stats.backends.get(ab.id) if ab else None
                mac = self.macs.get(be.address)
                last = self.telemetry.last_probe.get((svc.name, be.name))  # (ok, seconds, reason)
                backends.append({
                    "name": be.name, "address": str(be.address), "weight": be.weight,
                    "drained": be.weight == 0 or (svc.name, be.name) in self.drained,
                    "health": h.state.value, "since": h.since, "reason": h.reason,
                    "mac": mac.hex(":") if mac else None, "id": ab.id if ab else None,
                    "forwarding": bool(ab and ab.up),
                    "packets": bc.packets if bc else 0, "bytes": bc.bytes if bc else 0,
                    "new_flows": bc.new_flows if bc else 0,
                    "table_slots": applied.table.count(ab.id) if (applied and ab) else 0,
                    "probe_seconds": last[1] if last else None, "probe_ok": last[0] if last else None,
                })
            services.append({
                "name": svc.name, "vip": str(svc.vip), "port": svc.port, "protocol": svc.protocol,
                "persistence": svc.persistence, "check": svc.health.check,
                "id": applied.id if applied else None,
                "packets": sc.packets if sc else 0, "bytes": sc.bytes if sc else 0,
                "new_flows": sc.new_flows if sc else 0, "backends": backends,
            })
        return {
            "version": __version__, "interface": self.ifname, "mode": self.mode, "pid": os.getpid(),
            "pool": self.pool_path, "started": self.started, "ready": self.ready,
            "vips_added": sorted(str(v) for v in self.added_vips), "last_reload": self.last_reload,
            "services": services, "actions": stats.actions, "not_forwarded": stats.not_forwarded,
            "events": stats.events,
        }
