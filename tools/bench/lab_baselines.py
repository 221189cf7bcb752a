"""Configuration text for the lab suite's balancers and servers. Pure.

What each balancer is told to do, side by side:
  xdplb     the pool file `xdplb attach` reads (DSR: backends answer the client)
  nftables  DNAT in the lb's prerouting hook; replies come back through the
            lb (the backends route the client via the lb) so conntrack can
            undo the DNAT. DSR is not possible with DNAT.
  HAProxy   TCP mode (layer 4 proxy), its default threads (one per CPU)
The long stream (iperf3: a control and a data connection that must reach the
same server) is balanced by client address everywhere; the short connections
(HTTP) by flow or round robin.
"""
from __future__ import annotations

IPERF_PORT = 5201
HTTP_PORT = 8081          # the fast HTTP responder on every backend (HAProxy, see responder_cfg)
HEALTH_PORT = 9000        # tools/lab_backend.py's sink: xdplb's health checks go there

_XDPLB_SERVICE = """
[[service]]
name = "{name}"
vip = "{vip}"
port = {port}
persistence = "{persistence}"
{forwarding}  [service.health]
  port = {health_port}
  interval = 1.0
  timeout = 0.5
  rise = 1
  fall = 2
{backends}"""

_XDPLB_BACKEND = """  [[service.backend]]
  name = "{name}"
  address = "{address}"
"""


def xdplb_pool(vip: str, backends: dict[str, str]) -> str:
    """Pool with the stream service (by client address) and the HTTP service (by flow)."""
    listed = "".join(_XDPLB_BACKEND.format(name=n, address=a) for n, a in backends.items())
    text = '[xdplb]\nmetrics = ""\n'
    for name, port, persistence in (("iperf", IPERF_PORT, "client"), ("http", HTTP_PORT, "flow")):
        text += _XDPLB_SERVICE.format(name=name, vip=vip, port=port, persistence=persistence, forwarding="",
                                      health_port=HEALTH_PORT, backends=listed)
    return text


def nft_ruleset(table: str, vip: str, addresses: list[str]) -> str:
    """DNAT VIP:5201 by jhash of the client address, VIP:8081 round robin (numgen)."""
    n = len(addresses)
    targets = ", ".join(f"{i} : {a}" for i, a in enumerate(addresses))
    return (
        f"table ip {table} {{\n"
        f"  chain prerouting {{\n"
        f"    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr {vip} tcp dport {IPERF_PORT} counter dnat to jhash ip saddr mod {n} map {{ {targets} }}\n"
        f"    ip daddr {vip} tcp dport {HTTP_PORT} counter dnat to numgen inc mod {n} map {{ {targets} }}\n"
        f"  }}\n"
        f"}}\n"
    )


def haproxy_lb_cfg(vip: str, backends: dict[str, str]) -> str:
    """HAProxy as a TCP (layer 4) proxy: source hashing for the stream, round robin for HTTP."""
    def servers(port: int) -> str:
        return "".join(f"    server {n} {a}:{port}\n" for n, a in backends.items())

    return (
        "global\n"
        "    maxconn 8000\n"           # 2 × maxconn file descriptors must fit the default limit of 20000

        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 2s\n"
        "    timeout client 60s\n"
        "    timeout server 60s\n"
        f"frontend stream\n    bind {vip}:{IPERF_PORT}\n    default_backend stream\n"
        f"backend stream\n    balance source\n{servers(IPERF_PORT)}"
        f"frontend http\n    bind {vip}:{HTTP_PORT}\n    default_backend http\n"
        f"backend http\n    balance roundrobin\n{servers(HTTP_PORT)}"
    )


def responder_cfg(name: str, ipv6: bool = False) -> str:
    """A backend's HTTP server for the connection-rate test: answers every request with its name.

    HAProxy answering by itself (`http-request return`) is a C server that
    keeps up with a client on the same machine; the lab's Python server
    would cap every balancer at its own rate and hide their differences.
    ``ipv6`` also binds it on IPv6 (the NAT suite's IPv6 rows).
    """
    if not name.isalnum():
        raise ValueError(f"backend name {name!r}: only letters and digits go into the responder config")
    return (
        "global\n"
        "    nbthread 1\n"
        "    maxconn 8000\n"           # 2 × maxconn file descriptors must fit the default limit of 20000

        "defaults\n"
        "    mode http\n"
        "    timeout connect 2s\n"
        "    timeout client 10s\n"
        "    timeout server 10s\n"
        "frontend responder\n"
        f"    bind 0.0.0.0:{HTTP_PORT}\n"
        + (f"    bind [::]:{HTTP_PORT} v6only\n" if ipv6 else "")
        +        f'    http-request return status 200 content-type text/plain string "{name}"\n'
    )



def xdplb_nat_pool(vip: str, backends: dict[str, str], dicom_port: int, pacs_port: int) -> str:
    """The NAT suite's pool: the stream (by client address), HTTP (by flow) and
    DICOM (by flow, VIP:dicom_port to every PACS's pacs_port), all in NAT mode."""
    text = '[xdplb]\nmetrics = ""\n'
    for name, port, persistence, backend_port in (("iperf", IPERF_PORT, "client", IPERF_PORT),
                                                  ("http", HTTP_PORT, "flow", HTTP_PORT),
                                                  ("dicom", dicom_port, "flow", pacs_port)):
        listed = "".join(_XDPLB_BACKEND.format(name=n, address=a) + f"  port = {backend_port}\n"
                         for n, a in backends.items())
        text += _XDPLB_SERVICE.format(name=name, vip=vip, port=port, persistence=persistence,
                                      forwarding='forwarding = "nat"\n', health_port=HEALTH_PORT, backends=listed)
    return text
