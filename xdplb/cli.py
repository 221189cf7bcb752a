"""The xdplb command line (click).

`--help`, `check` and `status` never load BPF and never import bcc: the
kernel layer is imported only inside `attach` and `detach`.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
import time

import click

from . import __version__, control
from .addrtext import host_port
from .config import Pool, PoolError, describe, load_pool, warnings
from .modes import MODES


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException(f"{what} needs root: it loads BPF programs and changes interface addresses")


class PoolProblems(click.ClickException):
    """A bad pool file: every problem on its own "Error:" line, as `haproxy -c` lists them."""

    def __init__(self, err: PoolError) -> None:
        super().__init__(str(err))
        self.problems = err.problems

    def show(self, file=None) -> None:
        lines = list(self.problems)
        if len(lines) > 1:
            lines.append(f"{len(lines)} problems found; nothing was changed")
        for line in lines:
            click.echo(f"Error: {line}", file=file, err=file is None)


def _load(pool_path: str) -> Pool:
    try:
        return load_pool(pool_path)
    except PoolError as exc:
        raise PoolProblems(exc) from None


# The pool file is a positional argument (`xdplb check pacs.toml`); --pool FILE
# still works.  No click.Path checks: load_pool itself refuses a missing,
# unreadable or non-regular file, with one message and one exit status.
_POOL_ARGUMENT = click.argument("pool_argument", metavar="POOL", required=False)
_POOL_OPTION = click.option("--pool", "pool_option", metavar="FILE",
                            help="The pool file (TOML), instead of the POOL argument.")


def _pool_path(argument: str | None, option: str | None, command: str) -> str:
    if argument is not None and option is not None:
        raise click.UsageError("give the pool file once: as the POOL argument or with --pool, not both")
    if argument is None and option is None:
        raise click.UsageError(f"missing the pool file: {command} POOL (or --pool POOL)")
    return argument if argument is not None else option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xdplb")
def cli() -> None:
    """XDP load balancer for PACS and DICOM servers.

    \b
    Examples:
      xdplb check /etc/xdplb/eth0.toml
      sudo xdplb attach eth0 /etc/xdplb/eth0.toml
      sudo xdplb status --json
      sudo xdplb detach eth0
    """


@cli.command()
@click.argument("interface")
@_POOL_ARGUMENT
@_POOL_OPTION
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="XDP mode: native (driver), generic (skb), or auto (native where it is safe).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def attach(interface: str, pool_argument: str | None, pool_option: str | None, mode: str, verbose: bool) -> None:
    """Attach to INTERFACE and balance the services of the pool file POOL until signalled.

    SIGHUP re-reads the pool (a bad file changes nothing); SIGTERM or SIGINT
    detach cleanly, removing the program and the VIP addresses added.
    """
    pool_path = _pool_path(pool_argument, pool_option, "xdplb attach INTERFACE")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=f"xdplb[{interface}]: %(message)s")
    _load(pool_path)  # a bad pool is reported before root is even needed
    _need_root("xdplb attach")
    import asyncio

    from .daemon import AttachError, Daemon
    from .netlink import NetlinkProblem

    daemon = Daemon(interface, pool_path, mode)
    try:
        code = asyncio.run(daemon.run())
    except (PoolError, AttachError, NetlinkProblem, RuntimeError) as exc:
        raise click.ClickException(str(exc))
    sys.exit(code)


@cli.command()
@_POOL_ARGUMENT
@_POOL_OPTION
def check(pool_argument: str | None, pool_option: str | None) -> None:
    """Validate a pool file, POOL, and show what would be programmed. Needs no root.

    Every problem is listed, one line each with its line number.
    """
    from . import plan
    from .desired import desired_state
    from .health_fsm import Health, State

    from .tls import usable_certificates

    pool_path = _pool_path(pool_argument, pool_option, "xdplb check")
    pool = _load(pool_path)
    try:
        certificates = usable_certificates(pool, time.time())
    except PoolError as exc:
        raise PoolProblems(exc) from None
    click.echo(describe(pool), nl=False)
    click.echo(_flow_capacity_lines(pool))
    for text in warnings(pool) + list(certificates.warnings):
        click.echo(f"warning: {text}")
    # Assume every backend healthy and reachable: the table it would start with.
    health = {(s.name, b.address): Health(State.UP) for s in pool.services for b in s.backends}
    macs = {b.address: b"\x02" + b"\0" * 5 for s in pool.services for b in s.backends}
    result = plan.plan(plan.Applied(), desired_state(pool, health, macs, b"\0" * 6))
    click.echo("Maglev slots with every backend up:")
    for svc in pool.services:
        if svc.tls is not None:
            click.echo(f"  {svc.name}: none; HAProxy terminates its TLS, the XDP program passes it to the stack")
            continue
        applied = result.applied.services[svc.name]
        shares = []
        for be in svc.backends:
            bid = result.applied.backends[(svc.name, str(be.address))].id
            count = applied.table.count(bid)
            shares.append(f"{be.name} {count} ({100 * count / len(applied.table):.1f}%)")
        click.echo(f"  {svc.name}: " + ", ".join(shares))
    click.echo(_fingerprint_lines(pool))
    click.echo(f"ok: {pool_path} is valid ({len(result.ops)} map writes planned)")


def _fingerprint_lines(pool) -> str:
    """Per service, a short hash of its placement inputs (backends, weights,
    persistence, hash_seed, maglev_size): every node behind one VIP must print the same."""
    from .announce import placement_fingerprint

    lines = ["Placement fingerprints (identical on every node that serves the VIP):"]
    for svc in pool.services:
        lines.append(f"  {svc.name} {host_port(svc.vip, svc.port)}/{svc.protocol} {placement_fingerprint(pool.settings, svc)}")
    return "\n".join(lines)


def _flow_capacity_lines(pool) -> str:
    """The flow tables' sizes: flows, and flows6 with where its size comes from."""
    from . import pinning
    from .config import FLOW_TABLE_SIZE_RANGE, balances_ipv6

    st, specs, cpus = pool.settings, pinning.map_specs(pool.settings), pinning.possible_cpus()
    flows, flows6 = specs["flows"], specs["flows6"]
    if balances_ipv6(pool.services) and st.flows6_entries == st.flow_table_size:
        why = "as flow_table_size: the pool balances an IPv6 service"
    elif not balances_ipv6(pool.services) and st.flows6_entries == FLOW_TABLE_SIZE_RANGE[0]:
        why = ("the minimum: the pool balances no IPv6 service; the first one makes it flow_table_size, "
               "which needs a restart")
    else:
        why = "flow_table_size6"
    return "\n".join([
        pinning.describe_flow_capacity(flows.entries, flows.flags, cpus),
        pinning.describe_flow_capacity(flows6.entries, flows6.flags, cpus, table="IPv6 flow table") + f" ({why})",
    ])


def _instances(interface: str | None) -> list[str]:
    if interface:
        return [interface]
    directory = control.run_dir()
    return sorted(p.stem for p in directory.glob("*.sock")) if directory.is_dir() else []


def _age(since: float) -> str:
    if not since:
        return "-"
    seconds = int(time.time() - since)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _render_tls(svc: dict) -> list[str]:
    """A TLS service's lines: HAProxy's side of it, and each backend's HAProxy counters."""
    tls = svc["tls"]
    follows = f", verdicts of {tls['health_from']}" if tls["health_from"] else ""
    lines = [f"  tls: HAProxy {'running' if tls['haproxy'] else 'NOT RUNNING'}, cleartext {tls['backend_protocol']} "
             f"to port {tls['backend_port']}{follows}"]
    for cert in tls["certificates"]:
        lines.append(f"  certificate {cert['path']} serial {cert['serial']:x}, expires in "
                     f"{cert['expires_in'] / 86400:.0f} days")
    lines.append(f"  {'backend':<12} {'address':<15} {'health':<7} {'for':>6} {'wt':>3} {'haproxy':<8} {'now':>5} "
                 f"{'conns':>7} {'bytes in':>11} {'bytes out':>11} {'errors':>6}")
    for be in svc["backends"]:
        h = be.get("tls") or {}
        errors = h.get("connect_errors", 0) + h.get("response_errors", 0)
        lines.append(f"  {be['name']:<12} {be['address']:<15} {be['health']:<7} {_age(be['since']):>6} "
                     f"{be['weight']:>3} {h.get('status', '?'):<8} {h.get('current', 0):>5} {h.get('connections', 0):>7} "
                     f"{h.get('bytes_in', 0):>11} {h.get('bytes_out', 0):>11} {errors:>6}")
    return lines


def _render_announce(ann: dict | None) -> list[str]:
    """Several balancers: where the decisions go, and each VIP's decision with its reason."""
    if not ann or (ann["table"] is None and not ann["ready_file"]):
        return []
    where = ", ".join(([f"routes in table {ann['table']}"] if ann["table"] is not None else [])
                      + ([f"ready file {ann['ready_file']}"] if ann["ready_file"] else []))
    lines = [f"announce ({where}){': node drained' if ann['node_draining'] else ''}"
             f"{': failing, retrying: ' + ann['error'] if ann['error'] else ''}"]
    for vip, d in ann["vips"].items():
        lines.append(f"  {vip} {'announced' if d['announced'] else 'withdrawn'}: {d['reason']}")
    return lines


def _render_status(st: dict) -> str:
    lines = [f"xdplb {st['version']} on {st['interface']} ({st['mode']} mode), pid {st['pid']}, pool {st['pool']}"]
    for svc in st["services"]:
        lines.append(f"service {svc['name']} {host_port(svc['vip'], svc['port'])}/{svc['protocol']} persistence {svc['persistence']}: "
                     f"{svc['packets']} pkts, {svc['bytes']} bytes, {svc['new_flows']} flows")
        lines.append(f"  {'backend':<12} {'address':<15} {'health':<7} {'for':>6} {'wt':>3} {'slots':>6} {'mac':<17} "
                     f"{'packets':>9} {'bytes':>11} {'flows':>7}")
        if "tls" in svc:
            lines.extend(_render_tls(svc))
            continue
        for be in svc["backends"]:
            lines.append(f"  {be['name']:<12} {be['address']:<15} {be['health']:<7} {_age(be['since']):>6} {be['weight']:>3} "
                         f"{be['table_slots']:>6} {be['mac'] or '(unresolved)':<17} {be['packets']:>9} {be['bytes']:>11} "
                         f"{be['new_flows']:>7}")
    lines.append("xdp actions: " + ", ".join(f"{k} {v}" for k, v in st["actions"].items()))
    lines.append("not forwarded: " + ", ".join(f"{k} {v}" for k, v in st["not_forwarded"].items()))
    lines.extend(_render_announce(st.get("announce")))
    ev = st.get("events", {})
    lines.append(f"flow table: misses {ev.get('flow_miss', 0)}, placed without entry (flood guard) "
                 f"{ev.get('flood_no_entry', 0)}, kept on a down backend (grace) {ev.get('down_grace', 0)}, "
                 f"UDP expired {ev.get('udp_expired', 0)}")
    return "\n".join(lines)


@cli.command()
@click.option("-i", "--interface", help="Interface of the instance (default: every running instance).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(interface: str | None, as_json: bool) -> None:
    """Services, backends, health, MACs and counters of running instances."""
    names = _instances(interface)
    if not names:
        raise click.ClickException(f"no xdplb instance is running (no control socket in {control.run_dir()})")
    results = []
    for name in names:
        try:
            results.append(control.request(name, {"cmd": "status"}))
        except control.ControlError as exc:
            raise click.ClickException(str(exc))
    if as_json:
        click.echo(json.dumps(results[0] if interface else results, indent=2))
    else:
        click.echo("\n\n".join(_render_status(r) for r in results))


@cli.command()
@click.option("-i", "--interface", help="Interface of the instance (default: every running instance).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes; rates are over this interval.")
@click.option("--once", is_flag=True, help="Print one view (rates over one interval) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object per refresh).")
def top(interface: str | None, interval: float, once: bool, as_json: bool) -> None:
    """Live per-service and per-backend health, weight, pps, bps, new flows/s and probe latency."""
    from . import top as top_view

    names = _instances(interface)
    if not names:
        raise click.ClickException(f"no xdplb instance is running (no control socket in {control.run_dir()})")
    try:
        top_view.run(names, lambda name: control.request(name, {"cmd": "status"}), interval, once, as_json,
                     single=bool(interface), echo=click.echo, tty=sys.stdout.isatty())
    except control.ControlError as exc:
        raise click.ClickException(str(exc))
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("interface")
def detach(interface: str) -> None:
    """Remove a leftover xdplb program and its VIP addresses from INTERFACE."""
    _need_root("xdplb detach")
    from .netlink import Netlink, NetlinkProblem

    nl = Netlink()
    try:
        link = nl.link(interface)
    except NetlinkProblem as exc:
        raise click.ClickException(str(exc))
    try:
        # The instance lock, not a ping: a busy daemon may be slow to answer
        # but still owns the program and its maps. Held until detach is done,
        # so no attach can start half-way through.
        control.prepare_run_dir()
        lock = control.InstanceLock.acquire(interface)
    except control.AlreadyRunning:
        raise click.ClickException(f"an xdplb instance is running on {interface}: stop it with SIGTERM "
                                   f"(systemctl stop xdplb@{interface}) instead") from None
    except (control.UnsafeRunDir, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        _detach(interface, link, nl)
    finally:
        lock.release()


def _detach(interface: str, link, nl) -> None:
    from .dataplane import PROG_NAME, remove_program

    removed = []
    if link.xdp_prog_id:
        from .bpfsys import prog_name

        name = prog_name(link.xdp_prog_id)
        if name != PROG_NAME:
            raise click.ClickException(f"{interface} carries XDP program {name!r} (id {link.xdp_prog_id}), "
                                       f"not xdplb's; leaving it alone")
        remove_program(interface, link.xdp_mode)
        removed.append(f"XDP program id {link.xdp_prog_id} ({link.xdp_mode} mode)")
    import asyncio

    from .tlstier import stop_left_running

    haproxy = asyncio.run(stop_left_running(control.run_dir(), interface))
    if haproxy is not None:
        removed.append(f"the HAProxy left running (master pid {haproxy})")
    for vip in sorted(nl.vips(link.index), key=ipaddress.get_mixed_type_key):
        nl.del_vip(link.index, vip)
        removed.append(f"VIP {vip}")
    from . import pinning

    pins = pinning.pin_dir(interface)
    if pinning.remove(pins):
        removed.append(f"pinned maps {pins}")
    (control.run_dir() / f"{interface}.drained.json").unlink(missing_ok=True)
    removed.extend(_withdraw_leftover_routes(interface, nl))
    path = control.socket_path(interface)
    if path.exists():
        path.unlink()
        removed.append(f"stale socket {path}")
    click.echo(f"detached from {interface}: " + (", ".join(removed) if removed else "nothing of xdplb's was left"))


def _withdraw_leftover_routes(interface: str, nl) -> list[str]:
    """The VIP routes a dead instance left in its announce table (noted in the
    run directory), so BIRD stops announcing a node that no longer balances."""
    from .announce import record_path

    record = record_path(control.run_dir(), interface)
    try:
        table = int(record.read_text())
    except (OSError, ValueError):
        return []
    removed = []
    for vip in sorted(nl.announced(table)):
        nl.withdraw(table, vip)
        removed.append(f"VIP route {vip} (table {table})")
    record.unlink(missing_ok=True)
    return removed


def _one_instance(interface: str | None) -> str:
    names = _instances(interface)
    if not names:
        raise click.ClickException(f"no xdplb instance is running (no control socket in {control.run_dir()})")
    if len(names) > 1:
        raise click.ClickException(f"several instances are running ({', '.join(names)}): choose one with -i")
    return names[0]


def _ask(interface: str | None, message: dict) -> dict:
    name = _one_instance(interface)
    try:
        reply = control.request(name, message)
    except control.ControlError as exc:
        raise click.ClickException(str(exc))
    if "error" in reply:
        raise click.ClickException(reply["error"])
    return reply


def _backend_packets(interface: str | None, service: str, backend: str) -> int:
    st = _ask(interface, {"cmd": "status"})
    for svc in st["services"]:
        for be in svc["backends"]:
            if svc["name"] == service and be["name"] == backend:
                return be["packets"]
    raise click.ClickException(f"{service} {backend} is no longer in the running pool")


@cli.command()
@click.argument("service")
@click.argument("backend")
@click.option("-i", "--interface", help="Interface of the instance (needed when several run).")
@click.option("--wait", is_flag=True, help="Return only when the backend has carried no packets for --idle seconds.")
@click.option("--idle", type=click.FloatRange(min=0.5), default=30.0, show_default=True,
              help="Seconds without packets that count as drained.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Give up waiting after this many seconds (exit status 1).")
def drain(service: str, backend: str, interface: str | None, wait: bool, idle: float, timeout: float) -> None:
    """Send BACKEND of SERVICE no new flows; its existing flows keep flowing.

    With --wait, watch the data plane's packet counter for that backend and
    return once it has been still for --idle seconds: then no association is
    transferring and the server can be rebooted.
    """
    _ask(interface, {"cmd": "drain", "service": service, "backend": backend})
    click.echo(f"drained {backend} of {service}: no new flows")
    if not wait:
        return
    started = time.monotonic()
    last = _backend_packets(interface, service, backend)
    still_since = time.monotonic()
    while True:
        time.sleep(min(1.0, idle / 4))
        now = time.monotonic()
        packets = _backend_packets(interface, service, backend)
        if packets != last:
            last, still_since = packets, now
        if now - still_since >= idle:
            click.echo(f"{backend} of {service} carried no packets for {idle:g}s: safe to take down "
                       f"(waited {now - started:.0f}s)")
            return
        if now - started >= timeout:
            raise click.ClickException(f"{backend} of {service} still carries traffic after {timeout:g}s "
                                       f"(last packet {now - still_since:.0f}s ago)")


@cli.command()
@click.argument("service")
@click.argument("backend")
@click.option("-i", "--interface", help="Interface of the instance (needed when several run).")
def undrain(service: str, backend: str, interface: str | None) -> None:
    """Let BACKEND of SERVICE take new flows again."""
    _ask(interface, {"cmd": "undrain", "service": service, "backend": backend})
    click.echo(f"undrained {backend} of {service}: takes new flows again")


@cli.command("drain-node")
@click.option("-i", "--interface", help="Interface of the instance (needed when several run).")
@click.option("--idle", type=click.FloatRange(min=0.1, max=3600), default=2.0, show_default=True,
              help="Seconds without forwarded packets that count as drained.")
@click.option("--timeout", type=click.FloatRange(min=1, max=86400), default=60.0, show_default=True,
              help="Give up waiting after this many seconds (exit status 1); forwarding goes on.")
def drain_node(interface: str | None, idle: float, timeout: float) -> None:
    """Withdraw every VIP of this node from the routers (or keepalived) and wait.

    The program keeps forwarding what still arrives; the command returns once
    the node's forwarded-packet counters have been still for --idle seconds.
    Unlike `drain --wait`, this moves established flows: routers keep no
    flow state, so the other nodes take them at once, and only their
    identical Maglev placement keeps them alive. `undrain-node` announces again.
    """
    name = _one_instance(interface)
    try:
        reply = control.request(name, {"cmd": "drain-node", "idle": idle, "timeout": timeout},
                                timeout=timeout + control.REQUEST_TIMEOUT)
    except control.ControlError as exc:
        raise click.ClickException(str(exc))
    if "error" in reply:
        raise click.ClickException(reply["error"])
    if "warning" in reply:
        click.echo(f"warning: {reply['warning']}", err=True)
    vips = ", ".join(reply["withdrawn"]) or "no VIP (none was announced)"
    if not reply["still"]:
        raise click.ClickException(f"withdrew {vips}, but {name} still forwarded packets after {timeout:g}s "
                                   f"({reply['forwarded_during']} since the withdrawal)")
    click.echo(f"drained {name}: withdrew {vips}; no packet forwarded for {idle:g}s "
               f"(waited {reply['waited']:.1f}s, {reply['forwarded_during']} packets since the withdrawal)")


@cli.command("undrain-node")
@click.option("-i", "--interface", help="Interface of the instance (needed when several run).")
def undrain_node(interface: str | None) -> None:
    """Announce this node's VIPs again (those it can serve)."""
    reply = _ask(interface, {"cmd": "undrain-node"})
    click.echo("undrained: VIPs are announced again where a backend is up" if reply["changed"]
               else "the node was not drained")


@cli.command()
@click.option("-i", "--interface", help="Interface of the instance (needed when several run).")
def reload(interface: str | None) -> None:
    """Re-read the running instance's pool file (as SIGHUP does). A bad file changes nothing."""
    name = _one_instance(interface)
    try:
        reply = control.request(name, {"cmd": "reload"}, timeout=control.RELOAD_TIMEOUT)
    except control.ControlError as exc:
        raise click.ClickException(str(exc))
    if reply.get("result") != "applied":
        raise click.ClickException(f"reload rejected, nothing changed: {reply.get('error', reply)}")
    click.echo(f"reloaded the pool of {name}")


def main() -> None:  # pragma: no cover
    cli()
