"""How an address is written next to a port, in URLs, Host headers, logs
and the status screens: an IPv6 address in brackets ([fd00::11]:104,
RFC 3986 and RFC 5952 section 6), so its port stays apart. Pure."""
from __future__ import annotations


def host_port(address, port: int | None = None) -> str:
    """"10.0.0.1:104", "[fd00::11]:104"; without a port, "[fd00::11]" (a Host header)."""
    text = str(address)
    host = f"[{text}]" if ":" in text else text
    return host if port is None else f"{host}:{port}"
