"""Choose KVM or TCG by booting the guest kernel once under KVM (cached).

``/dev/kvm`` existing proves nothing: under PVM (nested, pagetable based) a stock kernel hangs
or QEMU aborts with ``failed to set MSR``. So we boot the real kernel with ``slicer.probe``
(the initramfs prints a marker and powers off) and trust KVM only if the marker appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
PROBE_MARKER = "SLICER-PROBE-OK"
PROBE_TIMEOUT = 20.0


def tsc_khz() -> int | None:
    """The host TSC frequency in kHz; the guest needs it under TCG (no PIT to calibrate)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except OSError:
        pass
    return None


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def _probe_kvm(binary: str, kernel: Path, initrd: Path) -> tuple[bool, str]:
    cmd = [
        binary, "-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", "host", "-m", "256",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 slicer.probe=1 panic=-1",
    ]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return PROBE_MARKER in out, "timed out"
    return PROBE_MARKER in out, out.strip().splitlines()[-1] if out.strip() else f"exit {r.returncode}"


def choose_accelerator(binary: str, kernel: Path, initrd: Path, cache: Path) -> str:
    """``kvm`` or ``tcg``. ``SLICER_ACCEL`` forces one; otherwise a cached probe decides."""
    forced = os.environ.get("SLICER_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = hashlib.sha256(
        "|".join([qemu_version(binary), str(kernel.resolve()), platform.release()]).encode()
    ).hexdigest()[:16]
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["accelerator"]
    except (OSError, ValueError, KeyError):
        pass
    ok, detail = _probe_kvm(binary, kernel, initrd)
    accel = "kvm" if ok else "tcg"
    log.info("KVM probe: %s (%s); using %s", "booted" if ok else "failed", detail, accel)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # its own per process: daemons may probe at once
    tmp.write_text(json.dumps({"key": key, "accelerator": accel, "detail": detail}))
    tmp.replace(cache)
    return accel
