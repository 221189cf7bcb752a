"""A real Prometheus (Debian's `prometheus` binary) inside one of a lab's namespaces.

It scrapes xdplb where xdplb serves its metrics, on loopback inside the lb
namespace, so nothing is exposed outside the lab. Its HTTP API is reached
with curl run in the same namespace (the test process lives in the initial
namespace, and Python 3.11 has no os.setns).

    prom = Prometheus(lab, "lb", workdir, targets=["127.0.0.1:9742"], rules=[path]).start()
    prom.wait_ready()
    prom.query_range('rate(xdplb_backend_packets_total[10s])', start, end)
    prom.stop()

`render_panels` draws a dashboard's time-series panels from Prometheus data
with matplotlib: a stand-in picture where Grafana itself cannot be installed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

PROMETHEUS = "prometheus"
CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files: {rules}
scrape_configs:
  - job_name: xdplb
    static_configs:
      - targets: {targets}
"""


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, lab, host: str, workdir: Path, targets: list[str], rules: list[Path] = (),
                 port: int = 9090, interval: str = "1s"):
        self.lab, self.host, self.workdir, self.port = lab, host, Path(workdir), port
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(CONFIG.format(interval=interval, rules=json.dumps([str(r) for r in rules]),
                                             targets=json.dumps(list(targets))))
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        if shutil.which(PROMETHEUS) is None:
            raise PrometheusError("prometheus not found: install the Debian package prometheus (tools/setup.sh does)")
        self._log = open(self.log_path, "ab")
        self.proc = self.lab.popen(
            self.host, PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            out = self.lab.run(self.host, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{self.url}/-/ready",
                               check=False)
            if out.stdout.strip() == "200":
                return
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path> with URL-encoded params; the `data` of a success reply."""
        argv = ["curl", "-sS", "-G", f"{self.url}/api/v1/{path}"]
        for key, value in params.items():
            argv += ["--data-urlencode", f"{key.rstrip('_')}={value}"]
        result = self.lab.run(self.host, *argv, check=False)
        try:
            reply = json.loads(result.stdout)
        except ValueError:
            raise PrometheusError(f"GET {path} {params}: no JSON reply: {result.stdout[:300]} {result.stderr[:300]}") from None
        if reply.get("status") != "success":
            raise PrometheusError(f"GET {path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def label_values(self, label: str, match: str) -> list:
        return self.api(f"label/{label}/values", **{"match[]": match})

    def alerts(self) -> list:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()


def render_panels(dashboard: dict, series_of, path: Path, start: float, title: str = "") -> None:
    """Draw every time-series and state-timeline panel of a Grafana dashboard, in grid order.

    `series_of(expr)` returns Prometheus query_range results for an expression
    with the dashboard's variables already substituted by the caller; the
    time axis counts seconds from `start`.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard["panels"] if p["type"] in ("timeseries", "state-timeline")]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        stacked = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("stacking", {}).get("mode") == "normal"
        for target in panel["targets"]:
            for s in series_of(target["expr"]):
                legend = target.get("legendFormat", "")
                for key, value in s["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                t = [float(v[0]) - start for v in s["values"]]
                y = [float(v[1]) for v in s["values"]]
                ax.plot(t, y, label=legend or "value", drawstyle="steps-post" if panel["type"] == "state-timeline" else "default")
        ax.set_xlabel("seconds into the test", fontsize=7)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"].replace("$service", "all services") + (" (stacked in Grafana)" if stacked else ""),
                     fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or dashboard["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
