"""The run's figures as Prometheus metrics (`Manager(metrics_port=)`, `vinehpc run --metrics-port`).

prometheus_client does the HTTP side and the exposition format; a custom collector turns what
the manager's I/O thread publishes into metric families when scraped: the counts as of its last
loop turn (Server.stats, what m.stats reads), and per category, node and transfer from the
snapshot it builds once a second (Server.snapshot, what `vinehpc status` shows).  Nothing is
updated per task, and a scrape never calls into the I/O thread.
"""
from __future__ import annotations

import logging

log = logging.getLogger("vinehpc.manager")

# figures that only grow (exposed as counters, "_total"), then those that go up and down
COUNTERS = {
    "tasks_submitted": "tasks submitted", "tasks_done": "tasks handed back (failures included)",
    "tasks_succeeded": "tasks that succeeded", "tasks_failed": "tasks that failed",
    "tasks_cancelled": "tasks cancelled", "tasks_retried": "attempts run again (retry, requeue, fast abort)",
    "tasks_dispatched": "attempts sent to workers", "workers_joined": "workers that joined",
    "workers_lost": "workers lost before the run's end", "bytes_sent": "file bytes sent to workers",
    "bytes_received": "output bytes received from workers",
}
GAUGES = {
    "tasks_waiting": "tasks not running yet", "tasks_running": "tasks running on workers",
    "tasks_on_workers": "tasks sent to workers (running, or waiting there)",
    "workers_connected": "workers connected", "workers_busy": "workers running a task",
    "workers_idle": "workers running nothing", "total_cores": "cores of connected workers",
    "committed_cores": "cores given to running tasks", "total_memory": "memory of connected workers (MB)",
    "total_gpus": "gpus of connected workers", "tasks_per_second": "tasks ended per second, last minute",
    "tasks_per_second_average": "tasks ended per second since the start",
}


class _Collector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        counts = self.server.stats
        snap = self.server.snapshot       # None during the first second
        for k, help_ in COUNTERS.items():
            yield CounterMetricFamily("vinehpc_" + k, help_, value=counts.get(k) or 0)
        for k, help_ in GAUGES.items():
            yield GaugeMetricFamily("vinehpc_" + k, help_, value=counts.get(k) or 0)
        if not snap:
            return
        g = GaugeMetricFamily("vinehpc_category_tasks", "tasks of a category by state", labels=["category", "state"])
        for cat, c in snap["categories"].items():
            for state in ("waiting", "running", "done", "failed", "retried"):
                g.add_metric([cat, state], c[state])
        yield g
        for key, help_ in (("cores", "cores of a node's workers"), ("busy_cores", "cores given to tasks on a node"),
                           ("workers", "workers on a node"), ("tasks", "tasks running on a node")):
            g = GaugeMetricFamily("vinehpc_node_" + key, help_, labels=["host"])
            for n in snap["nodes"]:
                g.add_metric([n["host"]], n[key])
            yield g
        g = GaugeMetricFamily("vinehpc_transfers_in_flight", "files being sent or received", labels=["direction"])
        for d, v in snap["transfers"].items():
            g.add_metric([d], v)
        yield g
        oldest = snap["oldest_running"]
        yield GaugeMetricFamily("vinehpc_oldest_running_seconds", "how long the oldest running task has run",
                                value=(oldest or {}).get("running_for") or 0)


class Endpoint:
    """An HTTP server for one manager's metrics (its own registry: managers do not mix)."""

    def __init__(self, server, port, host):
        from prometheus_client import CollectorRegistry, start_http_server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(server))
        server.want_snapshot = True
        self.httpd, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.httpd.server_port

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(server, port: int, host: str = "127.0.0.1", name=None) -> Endpoint | None:
    """Start the endpoint; a port already taken (a second manager under one `vinehpc run`) or a
    missing prometheus_client is said and the run goes on without metrics."""
    try:
        ep = Endpoint(server, port, host)
    except ImportError:
        log.warning("vinehpc: metrics need prometheus_client (pip install 'vinehpc[metrics]'); running without")
        return None
    except OSError as e:
        log.warning("vinehpc: cannot serve metrics on %s:%s (%s); running without", host, port, e)
        return None
    log.info("vinehpc: metrics of %s at http://%s:%d/metrics", name or "this run", host, ep.port)
    return ep
