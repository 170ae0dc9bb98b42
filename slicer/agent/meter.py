"""slicer-vmmeter: one snapshot of what the guest consumes, read from /proc and statvfs."""

from __future__ import annotations

import os
import platform
import socket
from datetime import UTC, datetime


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _meminfo() -> dict[str, int]:
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def _disk_io() -> tuple[int, int, int]:
    """Bytes read, bytes written and I/Os in flight over whole disks (not partitions)."""
    read = written = inflight = 0
    for line in _read("/proc/diskstats").splitlines():
        f = line.split()
        name = f[2]
        if not os.path.exists(f"/sys/block/{name}") or name.startswith(("loop", "ram")):
            continue
        read += int(f[5]) * 512
        written += int(f[9]) * 512
        inflight += int(f[11])
    return read, written, inflight


def _network() -> tuple[int, int]:
    rx = tx = 0
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            continue
        f = rest.split()
        rx += int(f[0])
        tx += int(f[8])
    return rx, tx


def _open_connections() -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        count += sum(1 for line in lines if line.split()[3] == "01")  # ESTABLISHED
    return count


def _uptime(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{sec}s"


def snapshot() -> dict:
    mem = _meminfo()
    total = mem.get("MemTotal", 0)
    available = mem.get("MemAvailable", mem.get("MemFree", 0))
    used = total - available
    load1, load5, load15 = (float(x) for x in _read("/proc/loadavg").split()[:3])
    disk_read, disk_write, inflight = _disk_io()
    rx, tx = _network()
    vfs = os.statvfs("/")
    disk_total = vfs.f_blocks * vfs.f_frsize
    disk_free = vfs.f_bavail * vfs.f_frsize
    disk_used = disk_total - vfs.f_bfree * vfs.f_frsize
    return {
        "hostname": socket.gethostname(),
        "arch": platform.machine(),
        "timestamp": datetime.now(UTC).isoformat(),
        "uptime": _uptime(float(_read("/proc/uptime").split()[0])),
        "totalCpus": os.cpu_count() or 1,
        "totalMemory": total,
        "memoryUsed": used,
        "memoryAvailable": available,
        "memoryUsedPercent": used * 100.0 / total if total else 0.0,
        "loadAvg1": load1,
        "loadAvg5": load5,
        "loadAvg15": load15,
        "diskReadTotal": disk_read,
        "diskWriteTotal": disk_write,
        "networkReadTotal": rx,
        "networkWriteTotal": tx,
        "diskIOInflight": inflight,
        "openConnections": _open_connections(),
        "openFiles": int(_read("/proc/sys/fs/file-nr").split()[0]),
        "entropy": int(_read("/proc/sys/kernel/random/entropy_avail").strip()),
        "diskSpaceTotal": disk_total,
        "diskSpaceUsed": disk_used,
        "diskSpaceFree": disk_free,
        "diskSpaceUsedPercent": disk_used * 100.0 / disk_total if disk_total else 0.0,
    }
