"""Chunked copy benchmark: the official SDKs' ``CpToVMChunked`` (checksummed chunks, a manifest,
``slicer-agent upload finalise``) against one streamed ``POST /cp`` of the same file, rounds
interleaved on one VM so both see the same machine noise.

Prints JSON: seconds and MB/s of each (median of the rounds), their ratio, and how the chunked
time splits into sending the chunks (four at once, as the SDK does) and finalising (checking
what no recorded digest vouches for, making the session's data file the new file, fsync). The
SHA-256 of what landed is checked every round. Usage: ``python3 bench/chunked_copy.py
[--size-mb 256] [--chunk-mb 64] [--runs 3]`` (as root, image built; 64 MiB is the SDKs' chunk).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from boot import private_network, start_daemon  # noqa: E402

from tests import chunked_copy  # noqa: E402  (the SDK's request sequence, shared with the tests)

IMAGES = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
CONFIG = """
config:
  host_groups:
  - name: vm
    count: 1
    vcpu: 2
    ram_mb: 1024
    storage_size: 4G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth: {enabled: false}  # loopback of the benchmark's own network namespace
"""


def sha_in_guest(client, path: str) -> str:
    r = client.post("/vm/vm-1/exec", params={"cmd": f"sha256sum {path}", "buffered": "true"})
    r.raise_for_status()
    return r.json()["stdout"].split()[0]


def plain(client, data: bytes) -> float:
    t = time.monotonic()
    r = client.post("/vm/vm-1/cp", params={"path": "/root/plain.bin"}, content=data,
                    headers={"content-type": "application/octet-stream"})
    r.raise_for_status()
    return time.monotonic() - t


def chunked(client, data: bytes, chunk: int, workers: int = 4) -> tuple[float, float]:
    """(seconds sending the chunks and manifest, seconds finalising): the SDK's sequence, with
    its concurrency (four uploads at once)."""
    t = time.monotonic()
    session = "/root/.slicer-upload-" + os.urandom(16).hex()
    parts = [(i, data[off:off + chunk]) for i, off in enumerate(range(0, len(data), chunk))]
    entries = [{"index": i, "size": len(p), "sha256": hashlib.sha256(p).hexdigest()} for i, p in parts]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for r in pool.map(lambda ip: chunked_copy.post_chunk(client, "vm-1", f"{session}/chunks/{ip[0]:06d}.chunk",
                                                              ip[1]), parts):
            r.raise_for_status()
    manifest = {"version": 1, "mode": "binary", "destination": "/root/chunked.bin", "uid": 0, "gid": 0,
                "size": len(data), "chunks": entries}
    body = json.dumps(manifest).encode()
    chunked_copy.post_chunk(client, "vm-1", f"{session}/manifest.json", body).raise_for_status()
    sent = time.monotonic() - t
    t = time.monotonic()
    result = chunked_copy.helper(client, "vm-1", "upload", "finalise", "--manifest", f"{session}/manifest.json",
                                 "--uid", "0", "--gid", "0")
    if result["exit_code"] != 0:
        raise SystemExit(f"finalise failed: {result}")
    return sent, time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    private_network()
    data = os.urandom(args.size_mb << 20)
    want = hashlib.sha256(data).hexdigest()
    plain_s: list[float] = []
    sent_s: list[float] = []
    final_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="slb-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        (work / "images/current").symlink_to((IMAGES / "images/current").resolve())
        daemon, client = start_daemon(work, CONFIG)
        try:
            for _ in range(600):
                if client.get("/vm/vm-1/health").status_code == 200:
                    break
                time.sleep(0.5)
            for _ in range(args.runs):
                plain_s.append(plain(client, data))
                assert sha_in_guest(client, "/root/plain.bin") == want
                sent, final = chunked(client, data, args.chunk_mb << 20)
                sent_s.append(sent)
                final_s.append(final)
                assert sha_in_guest(client, "/root/chunked.bin") == want
        finally:
            daemon.terminate()
            daemon.wait(120)
    p = statistics.median(plain_s)
    c = statistics.median([s + f for s, f in zip(sent_s, final_s, strict=True)])
    mb = args.size_mb * 1.048576
    print(json.dumps({
        "size_mb": args.size_mb, "chunk_mb": args.chunk_mb, "runs": args.runs,
        "plain_cp": {"median_s": round(p, 2), "mb_per_s": round(mb / p, 1), "all": [round(x, 2) for x in plain_s]},
        "chunked": {"median_s": round(c, 2), "mb_per_s": round(mb / c, 1),
                    "send_median_s": round(statistics.median(sent_s), 2),
                    "finalise_median_s": round(statistics.median(final_s), 2)},
        "ratio_chunked_over_plain": round(c / p, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
