"""What every figure is measured on: kernel, CPU, load, versions."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

from . import parse

REPO = Path(__file__).resolve().parents[2]
SHARED_NOTE = ("the client, the balancer, the backends and anything else running on this machine "
               "share its CPUs; figures from a busy machine are lower and noisier")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _bcc_version() -> str:
    try:
        import bcc
        return getattr(bcc, "__version__", "unknown")
    except ImportError:
        return "not installed"


def loadavg() -> float:
    text = _read("/proc/loadavg").split()
    return float(text[0]) if text else -1.0


def machine() -> dict:
    """Facts about this machine and this checkout, for every suite's JSON."""
    return {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": parse.cpu_model(_read("/proc/cpuinfo")),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "bpf_jit_enable": _read("/proc/sys/net/core/bpf_jit_enable").strip() or "unknown",
        "bcc": _bcc_version(),
        "python": platform.python_version(),
        "xdplb_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": loadavg(),
        "shared_machine": SHARED_NOTE,
    }
