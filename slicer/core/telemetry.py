"""Counters the core keeps for Prometheus (rendered by the API at ``/metrics``)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)


def host_meminfo() -> dict[str, int]:
    """The host's ``/proc/meminfo`` in bytes (for /metrics and a fork's memory check)."""
    out = {}
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out

BOOT_SECONDS = Histogram(
    "slicer_vm_boot_seconds", "Seconds from starting QEMU to an answering agent", ["hostgroup"],
    buckets=(0.5, 1, 2, 4, 6, 8, 10, 15, 20, 30, 60, 120), registry=REGISTRY,
)
QEMU_EXITS = Counter(
    "slicer_qemu_exits_total", "QEMU processes that ended without being asked to (crash: non-zero exit)",
    ["hostgroup", "kind"], registry=REGISTRY,
)
START_PHASE_SECONDS = Histogram(
    "slicer_vm_start_phase_seconds",
    "Seconds of each phase of a create that waited for its VM (alloc, template, attach, disks, jail, spawn, load, "
    "resume, identity, setup, ready), by how the VM came to be (boot, template, pool)",
    ["hostgroup", "boot", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120), registry=REGISTRY,
)
VM_STARTS = Counter("slicer_vm_starts_total", "VMs started", ["hostgroup", "kind"], registry=REGISTRY)
COPIES = Counter("slicer_copies_total", "Copies into (in) and out of (out) VMs, by the path their bytes took "
                 "(bulk: the VM's bulk port; channel: the agent's channel)", ["direction", "via"], registry=REGISTRY)
VM_LAUNCHES = Counter("slicer_vm_launch_total", "VMs launched (Slicer's name; by kind: slicer_vm_starts_total)",
                      ["hostgroup"], registry=REGISTRY)
RESTORES = Counter(
    "slicer_vm_restores_total", "VMs restored from a saved state: a template (source=template) or their own",
    ["hostgroup", "source", "result"], registry=REGISTRY,
)
