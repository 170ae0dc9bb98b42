"""How much of the data disk pulling one image may take: a bound checked before anything is
unpacked, and enforced while skopeo and umoci write.

Two walls, because a layer is someone else's bytes:

1. ``scan_layers`` reads every layer's tar headers, decompressing as it streams, before umoci
   writes anything, and stops at the first header that takes the total past the bound: a
   20 MiB layer holding a 3 GiB file of zeros is refused after reading one header, with nothing
   written. Each entry costs at least one 4 KiB block (so a million empty files cost 4 GiB), a
   regular file its size rounded up to blocks, a sparse member its full size (umoci writes its
   holes as zeros), a hard link nothing (it shares its target's blocks). Layers add up: a file
   a later layer deletes still counts (the bound is an upper bound of what umoci writes at
   its peak, not of the final tree).
2. ``run_bounded`` runs the tool that writes (skopeo copying blobs, umoci unpacking) with each
   file capped at the bound (``RLIMIT_FSIZE``, via ``prlimit``) and a watcher that sums the
   blocks allocated under its output directory (hard links counted once) and kills it beyond
   the bound: what a parser difference between Python's ``tarfile`` and Go's ``archive/tar``
   might let past the first wall is stopped within one poll of the watcher.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BLOCK = 4096
SLACK = 16 << 20  # the watcher's allowance for what the tool writes besides the tree (metadata, temporaries)


@dataclass(frozen=True)
class Bound:
    """At most ``limit`` bytes of the data disk; ``what`` names where the number comes from
    (``host group tiny's storage_size 40M``)."""

    limit: int
    what: str


class TooLarge(Exception):
    """The image does not fit in its bound; the message says by how much it would not."""


class BadLayer(Exception):
    """A layer this module cannot read (unknown compression, not a tar)."""


def footprint(member: tarfile.TarInfo) -> int:
    """What unpacking ``member`` may allocate on the host's disk (an upper bound, in bytes)."""
    if member.islnk():
        return 0
    if member.isreg():  # GNU and PAX sparse members report their full size here
        return max(BLOCK, -(-member.size // BLOCK) * BLOCK)
    return BLOCK


@contextlib.contextmanager
def layer_stream(blob: Path, media_type: str) -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of one layer blob."""
    if media_type.endswith(("+gzip", ".gzip")):
        with gzip.open(blob, "rb") as f:
            yield f
    elif media_type.endswith(("+zstd", ".zstd")):
        proc = subprocess.Popen(["zstd", "-dcq", "--", str(blob)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.kill()
            proc.stdout.close()
            proc.wait()
    elif media_type.endswith((".tar", "layer.v1.tar")):
        with open(blob, "rb") as f:
            yield f
    else:
        raise BadLayer(f"unknown layer media type {media_type!r}")


def layers_of(layout: Path, manifest_digest: str) -> list[tuple[Path, str]]:
    """The blob and media type of every layer of the manifest ``manifest_digest`` in ``layout``."""
    manifest = json.loads((layout / "blobs" / manifest_digest.replace(":", "/")).read_text())
    found = []
    for layer in manifest["layers"]:
        algo, _, hexdigest = str(layer["digest"]).partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise BadLayer(f"layer digest {layer['digest']!r}")
        found.append((layout / "blobs" / "sha256" / hexdigest, str(layer.get("mediaType", ""))))
    return found


def scan_layers(layout: Path, manifest_digest: str, bound: Bound) -> int:
    """The bytes unpacking the image may take (``footprint`` of every entry of every layer);
    raises ``TooLarge`` at the first entry past ``bound``, ``BadLayer`` for an unreadable layer."""
    total = 0
    for blob, media_type in layers_of(layout, manifest_digest):
        try:
            with layer_stream(blob, media_type) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
                for member in tf:
                    total += footprint(member)
                    if total > bound.limit:
                        raise TooLarge(f"unpacks to more than {bound.what} ({bound.limit >> 20} MiB): "
                                       f"{total >> 20} MiB at {member.name[:200]!r} and counting")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise BadLayer(f"layer {blob.name[:12]} is not a readable tar ({e})") from None
    return total


def disk_usage(root: Path) -> int:
    """Bytes allocated under ``root`` (each inode once); tolerant of a tree changing meanwhile."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(root)]
    while stack:
        path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total


def run_bounded(cmd: list[str], watch: Path, bound: Bound, progress: Callable[[str], None] | None = None,
                interval: float = 0.1) -> tuple[int, list[str]]:
    """Run ``cmd`` with every file it writes capped at the bound and the tree at ``watch``
    (with what was there before) kept within it: killed and ``TooLarge`` beyond. Returns its
    exit status and its last output lines."""
    limit = bound.limit + SLACK
    proc = subprocess.Popen(["prlimit", f"--fsize={limit}", "--", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            del lines[:-40]
            if progress is not None and line.strip():
                progress(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    used = 0
    try:
        while True:
            try:
                proc.wait(interval)
                break
            except subprocess.TimeoutExpired:
                pass
            started = time.monotonic()
            used = disk_usage(watch)
            if used > limit:
                proc.kill()
                proc.wait()
                raise TooLarge(f"takes more than {bound.what} ({bound.limit >> 20} MiB): stopped at "
                               f"{used >> 20} MiB")
            interval = min(2.0, max(0.1, 4 * (time.monotonic() - started)))  # a big tree: walk it less often
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    if proc.returncode == -signal.SIGXFSZ or any("file too large" in line.lower() for line in lines[-4:]) \
            or (proc.returncode == 0 and disk_usage(watch) > limit):
        raise TooLarge(f"takes more than {bound.what} ({bound.limit >> 20} MiB)")
    return proc.returncode, lines
