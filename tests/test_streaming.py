"""Streams stay streams: memory stays flat on big copies, and a stalled stream does not
slow the others (flow control end to end). Real VMs."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest

pytestmark = pytest.mark.vm
MiB = 1 << 20


def peak_rss_kib(status_text: str) -> int:
    """VmHWM (peak resident set) from a /proc/<pid>/status text."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def daemon_peak(daemon) -> int:
    return peak_rss_kib(open(f"/proc/{daemon.proc.pid}/status").read())


def agent_peaks(api, vm) -> dict[str, int]:
    """Peak RSS of every agent process in the guest (demux and HTTP server)."""
    out = api.post(f"/vm/{vm}/exec", params={
        "cmd": "for p in $(pgrep -f 'slicer.agent'); do echo \"$p $(grep VmHWM /proc/$p/status)\"; done",
        "buffered": "true"}).json()["stdout"]
    return {line.split()[0]: int(line.split()[2]) for line in out.splitlines() if "VmHWM" in line}


def test_512_mib_copy_in_and_out_keeps_memory_flat(api, daemon, vm):
    size = 512 * MiB
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(size // MiB):
        digest.update(block)
    daemon_before, agent_before = daemon_peak(daemon), agent_peaks(api, vm)

    def body():
        for _ in range(size // MiB):
            yield block

    r = api.post(f"/vm/{vm}/cp", params={"path": "/root/big.bin"}, content=body(),
                 headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["size"] == size, r.text
    got = hashlib.sha256()
    n = 0
    with api.stream("GET", f"/vm/{vm}/cp", params={"path": "/root/big.bin"}) as resp:
        for chunk in resp.iter_raw(MiB):
            got.update(chunk)
            n += len(chunk)
    assert n == size and got.hexdigest() == digest.hexdigest()
    api.delete(f"/vm/{vm}/fs/remove", params={"path": "/root/big.bin"})
    grew = (daemon_peak(daemon) - daemon_before) // 1024
    assert grew < 48, f"the daemon's peak memory grew by {grew} MiB for a 512 MiB copy"
    for pid, after in agent_peaks(api, vm).items():
        if pid in agent_before:
            grew = (after - agent_before[pid]) // 1024
            assert grew < 48, f"agent process {pid} grew by {grew} MiB for a 512 MiB copy"


def test_a_stalled_stream_does_not_block_a_copy(api, daemon, vm):
    """An exec printing without end that nobody reads, while a 16 MiB copy runs on the same VM."""
    stalled = api.stream("POST", f"/vm/{vm}/exec", params={"cmd": "yes stalled-output-line"})
    resp = stalled.__enter__()
    try:
        first = json.loads(next(resp.iter_lines()))
        assert first["type"] == "started"
        time.sleep(2)  # let every window and buffer on the stalled path fill up
        payload = bytes(range(256)) * 4096 * 16
        result: dict = {}

        def copy() -> None:
            r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/iso.bin"}, content=payload)
            result["status"] = r.status_code
            back = api.get(f"/vm/{vm}/cp", params={"path": "/tmp/iso.bin"})
            result["same"] = back.content == payload

        worker = threading.Thread(target=copy)
        worker.start()
        worker.join(180)
        assert not worker.is_alive(), "the copy hung behind the stalled stream"
        assert result == {"status": 200, "same": True}
        assert api.get(f"/vm/{vm}/health").status_code == 200
    finally:
        stalled.__exit__(None, None, None)
