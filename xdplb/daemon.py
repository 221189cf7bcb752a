"""The `xdplb attach` daemon: wires the pool, the probe scheduler, the
reconciler, the status view and the control requests together, and handles
signals.

Everything it decides comes from pure modules (config, health_fsm, desired,
plan, modes); everything it changes goes through two injected objects, a
dataplane (xdplb/dataplane.py) and a netlink handle (xdplb/netlink.py), which
tests replace with fakes. Its parts, each owning one thing:

  scheduler.ProbeScheduler  probe tasks and health verdicts; one "desired
                            changed" signal per probe result that moved any
  reconciler.Reconciler     what the maps hold: plans on a worker thread,
                            writes, retries with backoff, repairs drift
  supervisor.Supervisor     restarts any long-running task that crashes
  status                    the one join behind `status`, `top` and /metrics
  tlstier.HaproxyTier       the TLS services' supervised HAProxy, fed the same
                            verdicts and drains through its runtime API

The event loop never waits on the kernel: the compile, Maglev planning, map
writes and netlink calls run in threads, so probes keep their timing.

  start:  load pool -> compile -> first probe round -> program maps ->
          attach -> add VIPs -> control socket -> "ready"
          (SIGTERM at any point stops before the next step)
  events: a verdict change, a neighbour MAC change, a drain, SIGHUP (reload)
          -> the reconciler's next pass
  announce: after every map pass, per VIP, a route in [xdplb] announce_table
          and the ready file (xdplb/announce.py), so BIRD or keepalived
          route to this node only while it can serve
  stop:   SIGTERM/SIGINT -> (with stop_drain) withdraw every VIP and wait for
          the counters to go still -> withdraw, detach the program, remove
          the VIPs it added, remove the control socket; every step runs and
          logs its failure. SIGUSR1 leaves the routes and the ready file.
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import time

from . import __version__, control, modes, probes, status
from .announce import Announcer, decide, record_path, wait_until_still
from .config import Pool, PoolError, load_pool
from .dataplane import PROG_NAME
from .desired import desired_state, keep_running_flows6, restart_needed
from .drains import Drains, identities
from .haproxy import server_states
from .plan import Applied, PlanError, retire_due
from .reconciler import Reconciler
from .scheduler import ProbeScheduler
from .supervisor import Supervisor
from .telemetry import Telemetry
from .tls import usable_certificates
from .tlstier import HaproxyTier, TlsTierError

log = logging.getLogger("xdplb")

MAC_REFRESH_SECONDS = 1.0
EXIT_LEFT_RUNNING = 75        # EX_TEMPFAIL: systemd's RestartForceExitStatus restarts on it
EXIT_CLEANUP_FAILED = 1

__all__ = ["AttachError", "Daemon", "PROG_NAME", "EXIT_LEFT_RUNNING"]


class AttachError(RuntimeError):
    pass


class _Stopped(Exception):
    """SIGTERM/SIGINT arrived during start-up: stop before the next step."""


class Daemon:
    def __init__(self, ifname: str, pool_path: str, mode: str = "auto", *,
                 dataplane_factory=None, netlink=None, probe=probes.run_probe, prog_name_lookup=None):
        self.ifname = ifname
        self.pool_path = pool_path
        self.requested_mode = mode
        self._dataplane_factory = dataplane_factory
        self.netlink = netlink
        self.pool: Pool | None = None
        self.link = None
        self.dp = None
        self.mode: str | None = None
        self.macs: dict = {}
        self.added_vips: set = set()
        self.started = time.time()
        self.ready = False
        self.stopping = False
        self.last_reload: dict = {"result": "none"}
        self.telemetry = Telemetry()
        self.supervisor = Supervisor()
        self.scheduler = ProbeScheduler(probe, self.telemetry, self.supervisor, self._desired_changed)
        self.reconciler: Reconciler | None = None
        self._stop = asyncio.Event()
        self._server = None
        self._socket_path = None
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._lock = None             # control.InstanceLock: held for the daemon's life
        self.exporter = None          # xdplb/exporter.py's Exporter while metrics are served
        self.adopting = False         # an earlier xdplb program is attached: replace it, adopt its maps
        self.leave_running = False    # SIGUSR1: exit without detaching
        self.drains = Drains(control.run_dir() / f"{ifname}.drained.json")
        self.tls = HaproxyTier(control.run_dir(), ifname, self.supervisor, self._tls_states)
        self.cleanup_errors: list[str] = []
        self.node_draining = False    # drain-node or a stop: every VIP withdrawn, forwarding goes on
        self.announcer: Announcer | None = None
        if prog_name_lookup is None:
            from .bpfsys import prog_name as prog_name_lookup
        self._prog_name = prog_name_lookup

    # ---- what the parts share (the status view and the exporter read these) --

    @property
    def health(self) -> dict:
        return self.scheduler.health

    @property
    def applied(self) -> Applied:
        return self.reconciler.applied if self.reconciler is not None else Applied()

    @property
    def slots(self) -> dict:
        return self.reconciler.slots if self.reconciler is not None else {}

    @property
    def map_write_errors(self) -> int:
        return self.reconciler.errors_total if self.reconciler is not None else 0

    def _desired(self):
        return desired_state(self.pool, self.health, self.macs, self.link.mac, self.drained)

    def _service_names(self) -> dict:
        return {s.key: s.name for s in self.pool.services}

    def _tls_states(self, pool) -> dict:
        return server_states(pool, self.health, self.drains.within(pool))

    def _decisions(self) -> dict:
        return decide(self.pool, self.health, serving=self.ready and self.mode is not None,
                      draining=self.node_draining)

    def _announce_soon(self) -> None:
        if self.announcer is not None:
            self.announcer.trigger()

    def _desired_changed(self) -> None:
        if self.ready and self.reconciler is not None:
            self.reconciler.trigger()
        self.tls.trigger()

    # ---- start and stop ---------------------------------------------------

    async def run(self) -> int:
        """Run until signalled. Returns the exit code: 0 after a clean stop,
        EXIT_LEFT_RUNNING after SIGUSR1 (program, maps and VIPs left in place
        for the next `xdplb attach` to adopt), EXIT_CLEANUP_FAILED when a
        clean-up step failed (each is logged)."""
        self.pool = load_pool(self.pool_path)  # PoolError: nothing has changed yet
        self.tls.certificates = usable_certificates(self.pool, time.time()).certificates
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
        self._socket_path, self._lock = control.prepare(self.ifname)
        st = self.pool.settings
        self.announcer = Announcer(self.netlink, st.announce_table, st.ready_file, self._decisions,
                                   record=record_path(control.run_dir(), self.ifname))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._leave_running)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._in_background(self.reload("SIGHUP")))
        try:
            await self._first_announcement()
            await self._start()
            await self._stop.wait()
            if not self.leave_running:
                await self._drain_on_stop()
        except _Stopped as stopped:
            log.info("stopped during start-up (%s): nothing further is attached or added", stopped)
        finally:
            try:
                await self._cleanup()
            finally:
                self._lock.release()
        if self.leave_running:
            return EXIT_LEFT_RUNNING
        return EXIT_CLEANUP_FAILED if self.cleanup_errors else 0

    async def _first_announcement(self) -> None:
        """Taking over a running program (a hitless restart): its routes and
        ready file stay until this process decides. A fresh start: nothing is
        attached yet, so routes a dead instance left are withdrawn."""
        try:
            if self.adopting:
                await self.announcer.adopt()
            else:
                await self.announcer.withdraw_all()
        except Exception as exc:  # a route we cannot read or remove: retried by the first pass
            log.error("cannot read or withdraw earlier VIP routes: %s", exc)

    async def _drain_on_stop(self) -> None:
        """SIGTERM with [xdplb] stop_drain: withdraw every VIP and keep forwarding
        until the counters are still (or stop_drain runs out), then detach."""
        st = self.pool.settings
        if not (st.stop_drain and self.ready and (st.announce_table is not None or st.ready_file)):
            return
        log.info("stopping: withdrawing every VIP and forwarding until the counters are still for %gs "
                 "(at most %gs)", st.stop_drain_idle, st.stop_drain)
        reply = await self.drain_node(st.stop_drain_idle, st.stop_drain)
        log.info("stop drain: %s after %.1fs (%d packets forwarded meanwhile)",
                 "counters still" if reply["still"] else "time is up", reply["waited"], reply["forwarded_during"])

    def _leave_running(self) -> None:
        log.info("SIGUSR1: exiting for a restart; the XDP program, its pinned maps, the VIPs and HAProxy stay")
        self.leave_running = True
        self.tls.leave_running()
        self._stop.set()

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_stop(self, step: str) -> None:
        if self._stop.is_set():
            raise _Stopped(f"signalled {step}")

    async def _start(self) -> None:
        factory = self._dataplane_factory
        if factory is None:
            from .dataplane import BccDataplane as factory
        from . import pinning

        problem = await self._nat_forwarding_refusal(self.pool)   # before anything changes
        if problem:
            raise AttachError(problem)
        try:
            tls_config = await self.tls.prepare(self.pool)  # haproxy -c, before anything changes
        except TlsTierError as exc:
            raise AttachError(str(exc)) from None
        pin_dir = pinning.pin_dir(self.ifname)
        log.info("compiling the XDP program (maglev_size %d), maps pinned at %s",
                 self.pool.settings.maglev_size, pin_dir)
        # In a thread: the loop stays free to hear SIGTERM during the compile.
        # Adopting: where nothing is pinned, the dataplane takes the maps from the attached program.
        self.dp = await asyncio.to_thread(factory, self.pool.settings, pin_dir=pin_dir,
                                          attached_prog_id=self.link.xdp_prog_id if self.adopting else None)
        self._check_stop("during the compile")
        self._keep_compiled_flows6()
        for note in getattr(self.dp, "notes", []):
            log.warning("%s", note)
        log.info("compiled and loaded in %.1fs", getattr(self.dp, "compile_seconds", 0.0))
        self.reconciler = Reconciler(self.dp, self._desired, self._service_names, self.telemetry,
                                     on_applied=self._announce_soon)
        if getattr(self.dp, "adopted", False):
            await self._adopt()
        await self._refresh_macs()
        self.scheduler.sync(self.pool)
        timeout = max((s.health.timeout for s in self.pool.services), default=1.0) + 1.0
        await self._wait_or_stop(self.scheduler.first_verdicts.wait(), timeout,
                                 "not every backend answered its first probe within %.1fs" % timeout)
        self._check_stop("during the first probes")
        await self._refresh_macs()
        error = await self.reconciler.reconcile()
        if error is not None:
            raise AttachError(f"programming the maps failed: {error}")
        self._check_stop("while programming the maps")
        self.mode = await asyncio.to_thread(self._attach)
        self._check_stop("while attaching")
        await self._sync_vips()
        await self.tls.commit(self.pool, tls_config)  # HAProxy binds the VIPs just added
        self._server = await control.ControlServer(self._socket_path, self.handle_request).start()
        self.supervisor.start("neighbour refresh", self._mac_loop)
        self.supervisor.start("reconciler", self.reconciler.run)
        self.supervisor.start("announcer", self.announcer.run)
        from .exporter import serve as serve_metrics

        self.exporter = await serve_metrics(self, self.pool)  # logs and returns None if it cannot listen
        self.ready = True
        self.reconciler.trigger()  # verdicts that changed while starting
        self.announcer.trigger()
        log.info("ready on %s in %s mode: %d service(s), %d of %d backend(s) up",
                 self.ifname, self.mode, len(self.pool.services), self.scheduler.up_count(), len(self.health))

    def _keep_compiled_flows6(self) -> None:
        """The running pool holds the flows6 size the program was compiled with
        (a restart keeps the pinned one where flow_table_size6 is unset and
        IPv6 services are still programmed), so later reloads compare with it."""
        compiled = getattr(getattr(self.dp, "settings", None), "flow_table_size6", None)
        if compiled is not None and compiled != self.pool.settings.flow_table_size6:
            self.pool = dataclasses.replace(
                self.pool, settings=dataclasses.replace(self.pool.settings, flow_table_size6=compiled))

    async def _wait_or_stop(self, awaitable, timeout: float, warning: str) -> None:
        """Wait for `awaitable` at most `timeout` seconds, or until stopped."""
        waiting = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self._stop.wait())
        done, pending = await asyncio.wait({waiting, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not done:
            log.warning("%s", warning)

    async def _adopt(self) -> None:
        """Take over the maps an earlier instance left pinned: keep its ids, so
        its flow entries stay valid, and its VIP addresses and drain marks."""
        kernel = await self.reconciler.adopt_kernel()
        self.added_vips = set(await asyncio.to_thread(self.netlink.vips, self.link.index))
        self.drains.load(self.pool)
        flows = len(await asyncio.to_thread(self.dp.flows)) if hasattr(self.dp, "flows") else 0
        log.info("adopted pinned maps: %d service(s), %d backend id(s), %d flow(s), VIPs %s",
                 len(kernel.services), len(kernel.backends), flows,
                 ", ".join(sorted(map(str, self.added_vips))) or "none")

    def _attach(self) -> str:
        if self.adopting:
            # Same mode as the program being replaced: a second program in
            # the other mode would not replace it.
            mode = self.link.xdp_mode
            problem = self._vlan_strip_refusal(mode)
            if problem:  # the running program has the same problem; refusing would only stop its controller
                log.warning("%s", problem)
            self.dp.attach(self.ifname, mode, replace=True)
            log.info("replaced the running xdplb program on %s in %s mode without a gap", self.ifname, mode)
            return mode
        errors = []
        for mode, why in modes.attempts(self.requested_mode, self.link.kind):
            problem = self._vlan_strip_refusal(mode)
            if problem:
                raise AttachError(problem)
            try:
                self.dp.attach(self.ifname, mode)
            except Exception as exc:  # the kernel layer reports driver refusals as LoadError
                errors.append(f"{mode}: {exc}")
                continue
            log.info("attached to %s in %s mode (%s)", self.ifname, mode, why)
            return mode
        raise AttachError(f"could not attach to {self.ifname}: " + "; ".join(errors))

    async def _nat_forwarding_refusal(self, pool: Pool) -> str | None:
        """Why `pool` must not run with the attached interface's IP
        forwarding, or None (read only for the IP versions of the pool's NAT
        services)."""
        problems = []
        for version in (4, 6):
            nat = [s.name for s in pool.services if s.forwarding == "nat" and s.vip.version == version]
            if nat:
                on = await asyncio.to_thread(self.netlink.ip_forwarding, version, self.ifname)
                problems.append(modes.nat_forwarding_refusal(nat, on, version, self.ifname))
        return "; ".join(p for p in problems if p) or None

    def _vlan_strip_refusal(self, mode: str) -> str | None:
        if mode != "native":
            return None
        return modes.vlan_strip_refusal(self.ifname, self.link.kind, self.netlink.active_features(self.ifname))

    async def _cleanup(self) -> None:
        """Stop. Every step runs even when an earlier one failed; each failure is logged."""
        self.stopping = True
        self.ready = False
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP while stopping: ignored"))
        await self._step("stopping the probe, neighbour and reconciler tasks", self.supervisor.stop_all)
        for task in list(self._background):
            task.cancel()
        if self._server is not None:
            await self._step("closing the control socket", self._server.close)
        if self.exporter is not None:
            await self._step("stopping the metrics exporter", self.exporter.stop)
            self.exporter = None
        if self.leave_running:
            await self._step("saving the drained backends", self.drains.save)
            log.info("left running on %s: program, pinned maps and VIPs stay for the next xdplb attach",
                     self.ifname)
        elif self.adopting and self.mode is None:
            # Taking over failed before our program went in: the earlier
            # program still runs on the pinned maps and VIPs; leave them be.
            log.error("start-up failed while taking over %s; the running xdplb program is left in place",
                      self.ifname)
        else:
            if self.announcer is not None:
                # Routers and keepalived first, while the program still forwards.
                await self._step("withdrawing the VIP routes", self.announcer.withdraw_all)
            log.info("stopping: detaching from %s", self.ifname)
            if self.dp is not None and getattr(self.dp, "attached", None):
                if await self._step("detaching the XDP program", self.dp.detach, thread=True):
                    log.info("detached the XDP program from %s", self.ifname)
            if self.dp is not None and hasattr(self.dp, "unpin"):
                if await self._step("removing the pinned maps", self.dp.unpin, thread=True) is True:
                    log.info("removed the pinned maps")
            for vip in sorted(self.added_vips, key=ipaddress.get_mixed_type_key):
                if await self._step(f"removing VIP {vip}", self.netlink.del_vip, self.link.index, vip, thread=True):
                    self.added_vips.discard(vip)
                    log.info("removed VIP %s from %s", vip, self.ifname)
            await self._step("removing the drain file", self.drains.remove)
            if self.announcer is not None and self.announcer.table is not None and not self.cleanup_errors:
                self.announcer.forget_record()
        if self._socket_path is not None:
            await self._step("removing the control socket", self._socket_path.unlink, missing_ok=True)
        if self.reconciler is not None:
            self.reconciler.close()

    async def _step(self, what: str, fn, *args, thread: bool = False, **kwargs):
        """One clean-up step: its failure is logged and the next step still runs.
        Returns the step's result, True for None, or False when it failed."""
        try:
            if thread:
                result = await asyncio.to_thread(fn, *args, **kwargs)
            else:
                result = fn(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    result = await result
        except Exception as exc:
            self.cleanup_errors.append(f"{what}: {exc}")
            log.error("clean-up: %s failed: %s", what, exc)
            return False
        return True if result is None else result

    def stop(self) -> None:
        self._stop.set()

    # ---- VIP addresses --------------------------------------------------------

    def _wanted_vips(self) -> set:
        if not self.pool.settings.manage_vips:
            return set()
        return {s.vip for s in self.pool.services}

    async def _sync_vips(self) -> None:
        wanted = self._wanted_vips()
        index = self.link.index
        for vip in sorted(wanted - self.added_vips, key=ipaddress.get_mixed_type_key):
            if await asyncio.to_thread(self.netlink.add_vip, index, vip):
                self.added_vips.add(vip)
                log.info("added VIP %s/%d to %s", vip, vip.max_prefixlen, self.ifname)
            else:
                log.info("VIP %s is already on %s; leaving it as configured", vip, self.ifname)
        for vip in sorted(self.added_vips - wanted, key=ipaddress.get_mixed_type_key):
            await asyncio.to_thread(self.netlink.del_vip, index, vip)
            self.added_vips.discard(vip)
            log.info("removed VIP %s from %s", vip, self.ifname)

    # ---- announcing and node drain ---------------------------------------------

    async def _reannounce(self, pool: Pool) -> None:
        """After a reload: a new table or ready file takes over from the old one."""
        st, ann = pool.settings, self.announcer
        if (st.announce_table, st.ready_file) != (ann.table, ann.ready_file):
            try:
                await ann.withdraw_all()
            except Exception as exc:
                log.error("reload: withdrawing the VIP routes of table %s failed: %s", ann.table, exc)
            ann.forget_record()
            ann.configure(st.announce_table, st.ready_file)
        ann.trigger()

    def _forwarded(self) -> int:
        """Packets the program forwarded (XDP_TX and redirects): the node's traffic, not its own."""
        actions = status.read_stats(self).actions
        return actions.get("tx", 0) + actions.get("redirect", 0)

    async def drain_node(self, idle: float, timeout: float) -> dict:
        """Withdraw every VIP; keep forwarding until the forwarded-packet counters
        have been still for `idle` seconds or `timeout` has passed."""
        before = set(self.announcer.announced)
        self.node_draining = True
        error = await self.announcer.sync()
        waited = await wait_until_still(self._forwarded, idle, timeout)
        still = waited["still"]
        reply = {"ok": True, "withdrawn": sorted(str(v) for v in before), "still": still,
                 "waited": waited["waited"], "forwarded_during": waited["moved"]}
        if error is not None:
            reply["warning"] = f"withdrawing failed, retrying: {error}"
        log.info("node drain: VIPs withdrawn, %s", "counters still for %gs" % idle if still
                 else "still forwarding after %gs" % timeout)
        return reply

    def undrain_node(self) -> dict:
        changed = self.node_draining
        self.node_draining = False
        self._announce_soon()
        if changed:
            log.info("node undrained: VIPs are announced again where they can be served")
        return {"ok": True, "changed": changed}

    def _announce_status(self) -> dict:
        ann = self.announcer
        decisions = ann.decisions if ann is not None else {}
        return {"table": ann.table if ann else None, "ready_file": ann.ready_file if ann else "",
                "node_draining": self.node_draining, "error": ann.error if ann else None,
                "vips": {str(vip): {"announced": d.announce, "reason": d.reason} for vip, d in decisions.items()}}

    # ---- neighbours -------------------------------------------------------

    def _read_neighbours(self, pool: Pool, known: dict) -> dict:
        """The backends' MACs from one neighbour dump (runs in a thread).
        An unresolved backend is solicited and keeps its last known MAC: a
        failed probe, not a missing entry, takes a dead host out."""
        found = self.netlink.neighbour_macs(self.link.index)
        macs = {}
        for address in sorted({be.address for s in pool.services for be in s.backends},
                              key=ipaddress.get_mixed_type_key):
            mac = found.get(address)
            if mac is None:
                self.netlink.solicit(address)
                mac = known.get(address)
            if mac is not None:
                macs[address] = mac
        nat_versions = {s.vip.version for s in pool.services if s.forwarding == "nat"}
        if nat_versions:
            self._resolve_next_hops(found, nat_versions)
        return macs

    def _resolve_next_hops(self, found: dict, versions: set[int]) -> None:
        """NAT replies leave through bpf_fib_lookup, which drops a reply whose
        next hop has no neighbour entry (bpf/nat.h, bpf/nat6.h): keep the
        routers towards the clients of each NAT family resolved, soliciting
        each that is not (an IPv6 router is often a link-local address)."""
        for gateway in sorted(self.netlink.route_gateways(self.link.index, versions),
                              key=ipaddress.get_mixed_type_key):
            if gateway not in found:
                self.netlink.solicit(gateway, self.link.index)

    def _take_macs(self, macs: dict) -> bool:
        changed = macs != self.macs
        for address, mac in macs.items():
            old = self.macs.get(address)
            if old is not None and old != mac:
                log.info("backend %s moved from MAC %s to %s", address, old.hex(":"), mac.hex(":"))
        self.macs = macs
        return changed

    async def _refresh_macs(self) -> bool:
        pool = self.pool
        macs = await asyncio.to_thread(self._read_neighbours, pool, self.macs)
        return pool is self.pool and self._take_macs(macs)

    async def _refresh_link_mac(self) -> bool:
        """Re-read the interface's own MAC (the program balances only frames
        sent to it); True when it changed."""
        link = await asyncio.to_thread(self.netlink.link, self.ifname)
        if link.mac == self.link.mac:
            return False
        log.info("%s changed its MAC from %s to %s", self.ifname, self.link.mac.hex(":"), link.mac.hex(":"))
        self.link = link
        return True

    async def _mac_loop(self) -> None:
        while True:
            await asyncio.sleep(MAC_REFRESH_SECONDS)
            try:
                link_changed = await self._refresh_link_mac()
            except Exception as exc:  # a vanished or renamed link must not stop the neighbour refresh
                log.warning("cannot re-read %s: %s", self.ifname, exc)
                link_changed = False
            # Both refreshes run every round; a retired backend whose grace
            # has passed is cleared by the next plan.
            macs_changed = await self._refresh_macs()
            if macs_changed or link_changed or retire_due(self.reconciler.applied, time.monotonic_ns()):
                self._desired_changed()

    # ---- reload -----------------------------------------------------------

    async def reload(self, trigger: str) -> dict:
        """Re-read the pool file. A bad file changes nothing; a pool whose
        writes fail is rolled back (the maps are repaired to the running
        pool). The caller gets the outcome either way."""
        if self.stopping or not self.ready:
            why = "xdplb is stopping" if self.stopping else "xdplb is still starting; reload once it is ready"
            log.info("reload (%s) ignored: %s", trigger, why)
            return {"result": "rejected", "error": why, "at": time.time()}
        async with self._reload_lock:
            return await self._reload(trigger)

    def _finish_reload(self, result: str, error: str | None = None) -> dict:
        self.last_reload = {"result": result, "at": time.time(), **({"error": error} if error else {})}
        self.telemetry.reload(result)
        return self.last_reload

    async def _reload(self, trigger: str) -> dict:
        try:
            new = keep_running_flows6(self.pool, await asyncio.to_thread(load_pool, self.pool_path))
            blocked = restart_needed(self.pool, new)
            if blocked:
                raise PoolError(f"{self.pool_path}: changing {', '.join(blocked)} needs a restart of xdplb")
            problem = await self._nat_forwarding_refusal(new)
            if problem:
                raise PoolError(problem)
            certificates = usable_certificates(new, time.time()).certificates
            tls_config = await self.tls.prepare(new)
            # MACs first, so the dry run plans with them and is the plan applied.
            macs = await asyncio.to_thread(self._read_neighbours, new, self.macs)
            drained = self.drains.within(new)
            # Dry run: the new pool must fit the compiled maps before anything changes.
            prepared = await self.reconciler.prepare(
                desired_state(new, self.health, macs, self.link.mac, drained))
        except (PoolError, PlanError, TlsTierError) as exc:
            log.error("reload (%s) rejected, keeping the running configuration: %s", trigger, exc)
            return self._finish_reload("rejected", str(exc))
        except Exception as exc:  # whatever else reading it raised: an answer, never a dead handler
            # Unexpected: the traceback goes to the log, the caller gets one sentence.
            log.exception("reload (%s) rejected, keeping the running configuration: checking the new pool "
                          "failed unexpectedly: %s: %s", trigger, type(exc).__name__, exc)
            return self._finish_reload("rejected", f"{self.pool_path}: {exc}")
        old = (self.pool, self.macs, self.drains.keys)
        self.pool, self.macs, self.drains.keys = new, macs, drained
        error = await self.reconciler.reconcile(prepared)
        if error is not None:
            # The maps may hold part of the new pool: go back to the running
            # pool; the reconciler rebuilds from the kernel and repairs them.
            self.pool, self.macs, self.drains.keys = old
            self.reconciler.trigger()
            log.error("reload (%s) failed while writing the maps, keeping the running configuration: %s",
                      trigger, error)
            return self._finish_reload("failed", f"writing the maps failed: {error}")
        self.scheduler.sync(new)
        self.tls.certificates = certificates
        try:
            await self.tls.commit(new, tls_config)
        except TlsTierError as exc:  # checked by haproxy -c: only a crash or a hang gets here
            log.error("reload (%s): reloading haproxy failed, its supervisor restarts it: %s", trigger, exc)
        self.telemetry.prune({(service, str(address)) for service, address in identities(new)})
        if drained != old[2]:
            self.drains.save()
        await self._sync_vips()
        await self._reannounce(new)
        log.info("reload (%s) applied: %d service(s)", trigger, len(new.services))
        return self._finish_reload("applied")

    # ---- drain --------------------------------------------------------------

    @property
    def drained(self) -> set:
        return self.drains.keys

    def set_drain(self, service: str, backend: str, drained: bool) -> dict:
        """Drain (no new flows, existing flows stay) or undrain a backend,
        named by its name or its address."""
        found = self.drains.find(self.pool, service, backend)
        if isinstance(found, str):
            return {"error": found}
        key, name = found
        changed = self.drains.set(key, drained)
        if changed:
            log.info("%s %s of %s: %s", "drained" if drained else "undrained", name, service,
                     "no new flows, existing flows keep flowing" if drained else "takes new flows again")
            self._desired_changed()
        return {"ok": True, "changed": changed, "service": service, "backend": name, "drained": drained}

    # ---- control requests -----------------------------------------------------

    async def handle_request(self, message: dict) -> dict:
        """One control request (a parsed JSON object) -> its reply. The socket
        server (framing, limits, peer check) calls this."""
        cmd = message.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "status":
            return await self.status_async()
        if cmd == "reload":
            return await self.reload("control socket")
        if cmd in ("drain", "undrain"):
            reply = self.set_drain(str(message.get("service")), str(message.get("backend")), cmd == "drain")
            if reply.get("changed") and self.reconciler is not None:
                error = await self.reconciler.reconcile()
                if error is not None:
                    reply["warning"] = f"writing the maps failed, retrying: {error}"
            return reply
        if cmd == "drain-node":
            if not self.ready:
                return {"error": "xdplb is still starting or stopping; nothing to drain"}
            try:
                idle, timeout = float(message.get("idle", 2.0)), float(message.get("timeout", 60.0))
            except (TypeError, ValueError):
                return {"error": "drain-node: idle and timeout must be numbers of seconds"}
            if not (0 < idle <= 3600 and 0 < timeout <= 86400):
                return {"error": "drain-node: idle must be in (0, 3600] and timeout in (0, 86400] seconds"}
            return await self.drain_node(idle, timeout)
        if cmd == "undrain-node":
            if self._stop.is_set():
                return {"error": "xdplb is stopping; its VIPs stay withdrawn"}
            return self.undrain_node()
        return {"error": f"unknown command {cmd!r}"}


    # ---- status -----------------------------------------------------------------

    def _status(self, stats) -> dict:
        reconcile = self.reconciler
        return {
            "version": __version__, "interface": self.ifname, "mode": self.mode, "pid": os.getpid(),
            "pool": self.pool_path, "started": self.started, "ready": self.ready,
            "vips_added": sorted(str(v) for v in self.added_vips), "last_reload": self.last_reload,
            "map_writes": {"error": reconcile.error if reconcile else None,
                           "errors_total": reconcile.errors_total if reconcile else 0},
            "services": status.rows(self, stats), "actions": stats.actions, "not_forwarded": stats.not_forwarded,
            "events": stats.events, "announce": self._announce_status(),
        }

    def status(self) -> dict:
        return self._status(status.read_stats(self))

    async def status_async(self) -> dict:
        """status() with the counter read (map lookups) off the loop."""
        stats = await asyncio.to_thread(status.read_stats, self)
        return self._status(stats)
