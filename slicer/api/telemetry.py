"""``/metrics``: API requests and latency by route, plus the core's VM metrics and the host's.

Slicer's own names are exported (``slicer_api_requests_total{code}``, ``slicer_vm_launch_total``,
``slicer_vm_running``, ``slicer_system_*``); ours stay beside them where they say more (VMs by
status, starts by kind, each VM's meter)."""

from __future__ import annotations

import contextlib
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from slicer.core.manager import Manager
from slicer.core.telemetry import REGISTRY, host_meminfo
from slicer.proxy.audit import read_counters

REQUESTS = Counter("slicer_api_requests_total", "API requests by HTTP status code", ["method", "route", "code"],
                   registry=REGISTRY)
LATENCY = Histogram("slicer_api_request_duration_seconds", "API request duration (to the last byte)",
                    ["method", "route"], registry=REGISTRY)


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streamed responses stay streamed."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        start = time.perf_counter()

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUESTS.labels(scope["method"], route, str(status["code"])).inc()
            LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)


class NodeCollector:
    """VMs by group and status, and each VM's latest meter snapshot, read at scrape time."""

    GAUGES = {
        "loadAvg1": ("slicer_vm_load1", "1-minute load average in the guest"),
        "memoryUsed": ("slicer_vm_memory_used_bytes", "Guest memory in use"),
        "totalMemory": ("slicer_vm_memory_total_bytes", "Guest memory"),
        "diskSpaceUsed": ("slicer_vm_disk_used_bytes", "Root filesystem space used"),
        "diskSpaceTotal": ("slicer_vm_disk_total_bytes", "Root filesystem size"),
    }
    COUNTERS = {
        "networkReadTotal": ("slicer_vm_network_receive_bytes", "Bytes received by the guest"),
        "networkWriteTotal": ("slicer_vm_network_transmit_bytes", "Bytes sent by the guest"),
        "diskReadTotal": ("slicer_vm_disk_read_bytes", "Bytes read from disk by the guest"),
        "diskWriteTotal": ("slicer_vm_disk_written_bytes", "Bytes written to disk by the guest"),
    }

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def collect(self):
        vms = GaugeMetricFamily("slicer_vms", "VMs by host group and status", labels=["hostgroup", "status"])
        running = GaugeMetricFamily("slicer_vm_running", "VMs running, by host group", labels=["hostgroup"])
        counts: dict[tuple[str, str], int] = {}
        for node in self.manager.list():
            key = (node.record.hostgroup, node.status)
            counts[key] = counts.get(key, 0) + 1
        for (group, status), n in sorted(counts.items()):
            vms.add_metric([group, status], n)
        for group in sorted({g for g, _ in counts} | {g.name for g in self.manager.config.host_groups}):
            running.add_metric([group], counts.get((group, "Running"), 0))
        yield vms
        yield running
        yield from system_metrics()
        families = {k: GaugeMetricFamily(name, doc, labels=["hostname", "hostgroup"])
                    for k, (name, doc) in self.GAUGES.items()}
        families |= {k: CounterMetricFamily(name, doc, labels=["hostname", "hostgroup"])
                     for k, (name, doc) in self.COUNTERS.items()}
        for node in self.manager.list():
            snap = node.last_snapshot
            if not snap:
                continue
            for key, family in families.items():
                value = snap.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):  # the guest's word: numbers only
                    with contextlib.suppress(OverflowError):
                        family.add_metric([node.hostname, node.record.hostgroup], float(value))
        yield from families.values()
        yield from self._pools()
        yield self._proxy()

    def _proxy(self) -> CounterMetricFamily:
        """What the proxies (``slicer proxy up``) decided, from the counts they leave in the data dir."""
        family = CounterMetricFamily("slicer_proxy_decisions", "Egress proxy decisions by client: allow, deny, close",
                                     labels=["decision", "client"])
        for (decision, client), n in sorted(read_counters(self.manager.data_dir).items()):
            family.add_metric([decision, client], n)
        return family

    def _pools(self):
        stats = self.manager.pool.stats()
        gauges = {"size": GaugeMetricFamily("slicer_warm_pool_size", "VMs a host group's warm pool keeps",
                                            labels=["hostgroup"]),
                  "ready": GaugeMetricFamily("slicer_warm_pool_ready", "Pooled VMs ready to be handed out",
                                             labels=["hostgroup"])}
        counters = {"hits": CounterMetricFamily("slicer_warm_pool_hits", "Creates served by the warm pool",
                                                labels=["hostgroup"]),
                    "misses": CounterMetricFamily("slicer_warm_pool_misses",
                                                  "Creates the warm pool could have served but had none ready",
                                                  labels=["hostgroup"])}
        for group, s in sorted(stats.items()):
            for key, family in (gauges | counters).items():
                family.add_metric([group], getattr(s, key))
        yield from gauges.values()
        yield from counters.values()


def system_metrics():
    """The host's: CPUs, load, memory and uptime (Slicer's ``slicer_system_*``)."""
    cpus = GaugeMetricFamily("slicer_system_cpus", "CPUs of the host")
    cpus.add_metric([], os.cpu_count() or 0)
    yield cpus
    for minutes, value in zip((1, 5, 15), os.getloadavg(), strict=True):
        load = GaugeMetricFamily(f"slicer_system_load{minutes}", f"{minutes}-minute load average of the host")
        load.add_metric([], value)
        yield load
    meminfo = host_meminfo()
    for key, name in (("MemTotal", "total"), ("MemAvailable", "available")):
        if key in meminfo:
            gauge = GaugeMetricFamily(f"slicer_system_memory_{name}_bytes", f"Host memory ({name})")
            gauge.add_metric([], meminfo[key])
            yield gauge
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        gauge = GaugeMetricFamily("slicer_system_uptime_seconds", "Seconds since the host booted")
        gauge.add_metric([], uptime)
        yield gauge


def render_metrics(manager: Manager) -> tuple[bytes, str]:
    nodes = CollectorRegistry(auto_describe=False)
    nodes.register(NodeCollector(manager))
    return generate_latest(REGISTRY) + generate_latest(nodes), CONTENT_TYPE_LATEST
