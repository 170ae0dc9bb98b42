"""``slicer-agent upload check|finalise|abort``: the guest half of the SDKs' chunked copy.

The official SDKs' ``CpToVMChunked`` sends a file (or a tar of a directory) as checksummed
chunks with ordinary ``POST /cp`` requests into a session directory next to the destination
(``<parent>/.slicer-upload-<32 hex>/chunks/NNNNNN.chunk``), then a ``manifest.json`` listing
them, and runs this helper (as root, through exec) to check every chunk against the manifest
and assemble the result. Nothing reaches the destination unless every chunk's size and
SHA-256 match: a binary file is written to a temporary file and renamed into place; a tar is
verified whole before it is extracted (with the same member checks as ``/cp?mode=tar``).

Manifest version 1 is spoken (``check`` prints ``chunked-copy-v1``; the SDKs then send v1).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator

from slicer.agent import files

SESSION_RE = re.compile(r"\.slicer-upload-[0-9a-f]{32}")
MAX_MANIFEST = 16 << 20  # 64-byte chunks of a 1 GiB file would still fit; a hostile one is refused
MAX_CHUNK = 64 << 20  # the SDKs' own limit
READ = 1 << 20


class UploadError(Exception):
    pass


def session_of(path: str) -> str | None:
    """The chunked-copy session directory ``path`` lies in (at most two levels below), if any."""
    parts = path.split("/")
    for i in range(len(parts) - 1, max(len(parts) - 4, 0), -1):
        if SESSION_RE.fullmatch(parts[i]):
            return "/".join(parts[: i + 1])
    return None


def make_session_dirs(path: str, uid: int | None, gid: int | None) -> None:
    """Create the session directory and ``chunks/`` a chunk upload names (the SDKs do not make
    them); only inside a session, whose own parent must already exist."""
    session = session_of(path)
    if session is None or not os.path.isdir(os.path.dirname(session)):
        return
    parent = os.path.dirname(path)
    for d in (session, parent):
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
            if uid is not None or gid is not None:
                os.chown(d, uid if uid is not None else -1, gid if gid is not None else -1)


def _manifest_path(raw: str, uid: int) -> tuple[str, str]:
    """(manifest path, session dir): the manifest must be ``<session>/manifest.json``."""
    try:
        path = files.require_path(raw, uid)
    except files.FileError as e:
        raise UploadError(str(e)) from None
    session = os.path.dirname(path)
    if os.path.basename(path) != "manifest.json" or not SESSION_RE.fullmatch(os.path.basename(session)):
        raise UploadError(f"{raw}: not a chunked-copy manifest (<dir>/.slicer-upload-<id>/manifest.json)")
    return path, session


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def load_manifest(path: str) -> dict:
    """Read and validate a manifest as the SDKs' ``CopyManifest.Validate`` does (version 1)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise UploadError(f"{path}: no such manifest") from None
    if len(data) > MAX_MANIFEST:
        raise UploadError(f"{path}: manifest larger than {MAX_MANIFEST} bytes")
    try:
        m = json.loads(data)
    except ValueError as e:
        raise UploadError(f"{path}: manifest is not JSON: {e}") from None
    if not isinstance(m, dict):
        raise UploadError("manifest must be a JSON object")
    if m.get("version") != 1:
        raise UploadError(f"unsupported copy manifest version: {m.get('version')!r} (this agent speaks 1)")
    if m.get("mode") not in ("binary", "tar"):
        raise UploadError(f"invalid copy mode: {m.get('mode')!r}")
    if not isinstance(m.get("destination"), str) or not m["destination"]:
        raise UploadError("copy destination is required")
    size = m.get("size")
    chunks = m.get("chunks")
    if not isinstance(size, int) or size < 0 or not isinstance(chunks, list):
        raise UploadError("manifest needs a size (>= 0) and a list of chunks")
    total = 0
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or chunk.get("index") != i:
            raise UploadError(f"chunk {i} is out of sequence")
        csize = chunk.get("size")
        if not isinstance(csize, int) or not 0 < csize <= MAX_CHUNK:
            raise UploadError(f"chunk {i} has invalid size {csize!r}")
        if not _is_sha256(chunk.get("sha256")):
            raise UploadError(f"chunk {i} has invalid SHA-256: {chunk.get('sha256')!r}")
        total += csize
    if total != size:
        raise UploadError(f"chunk sizes total {total} bytes, expected {size}")
    for key in ("uid", "gid"):
        if not isinstance(m.get(key, 0), int) or not 0 <= m.get(key, 0) < 2**32:
            raise UploadError(f"invalid {key}: {m.get(key)!r}")
    return m


def _chunk_file(session: str, chunk: dict) -> str:
    """The chunk's file: ``NNNNNN.chunk``, or the older SDKs' ``NNNNNN-<sha256>.chunk``."""
    base = os.path.join(session, "chunks", f"{chunk['index']:06d}")
    for candidate in (base + ".chunk", f"{base}-{chunk['sha256']}.chunk"):
        if os.path.isfile(candidate) and not os.path.islink(candidate):
            return candidate
    raise UploadError(f"chunk {chunk['index']} is missing ({base}.chunk)")


def stream(session: str, manifest: dict) -> Iterator[bytes]:
    """The chunks' bytes in order, each checked for size and SHA-256 as it is read; a chunk that
    does not match raises UploadError after its last byte (before the next is read)."""
    for chunk in manifest["chunks"]:
        digest, seen = hashlib.sha256(), 0
        with open(_chunk_file(session, chunk), "rb") as f:
            while block := f.read(min(READ, chunk["size"] + 1 - seen)):
                seen += len(block)
                if seen > chunk["size"]:
                    raise UploadError(f"chunk {chunk['index']} is larger than {chunk['size']} bytes")
                digest.update(block)
                yield block
        if seen != chunk["size"]:
            raise UploadError(f"chunk {chunk['index']} has {seen} bytes, expected {chunk['size']}")
        if digest.hexdigest() != chunk["sha256"]:
            raise UploadError(f"chunk {chunk['index']} does not match its SHA-256")


class _StreamReader(io.RawIOBase):
    """A file over :func:`stream`, for ``tarfile``."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._rest:
            self._rest = next(self._blocks, b"")
            if not self._rest:
                return 0
        n = min(len(b), len(self._rest))
        b[:n], self._rest = self._rest[:n], self._rest[n:]
        return n


def _write_binary(session: str, m: dict, dest: str, perms: int | None) -> dict:
    parent = os.path.dirname(dest)
    if os.path.isdir(dest):
        raise UploadError(f"{dest} is a directory; name the file")
    if not os.path.isdir(parent):
        raise UploadError(f"{parent}: no such directory")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".slicer-cp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for block in stream(session, m):
                f.write(block)
        os.chmod(tmp, perms if perms is not None else 0o644)
        os.chown(tmp, m.get("uid", 0), m.get("gid", 0))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"path": dest, "mode": "binary", "size": m["size"]}


def _extract(session: str, m: dict, dest: str, perms: int | None) -> dict:
    for _ in stream(session, m):  # every chunk checked before anything is extracted
        pass
    count = files.extract_tar(io.BufferedReader(_StreamReader(stream(session, m)), READ), dest, perms,
                              m.get("uid", 0), m.get("gid", 0))
    return {"path": dest, "mode": "tar", "entries": count}


def finalise(raw_manifest: str, uid: int) -> dict:
    path, session = _manifest_path(raw_manifest, uid)
    m = load_manifest(path)
    try:
        dest = files.require_path(m["destination"], m.get("uid", uid))
        perms = files.parse_permissions(m.get("permissions") or None)
    except files.FileError as e:
        raise UploadError(str(e)) from None
    if dest == session or dest.startswith(session + "/"):
        raise UploadError("the destination cannot be inside the upload session")
    try:
        result = (_write_binary if m["mode"] == "binary" else _extract)(session, m, dest, perms)
    except files.FileError as e:
        raise UploadError(str(e)) from None
    shutil.rmtree(session, ignore_errors=True)
    return result


def abort(raw_manifest: str, uid: int) -> dict:
    _, session = _manifest_path(raw_manifest, uid)
    existed = os.path.isdir(session)
    shutil.rmtree(session, ignore_errors=True)
    return {"session": session, "removed": existed}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slicer-agent", description="Guest helpers of the Slicer agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    upload = sub.add_parser("upload", help="assemble a chunked copy (the SDKs' CpToVMChunked)")
    steps = upload.add_subparsers(dest="step", required=True)
    steps.add_parser("check", help="print the chunked-copy protocol versions spoken here")
    for name in ("finalise", "abort"):
        step = steps.add_parser(name)
        step.add_argument("--manifest", required=True)
        step.add_argument("--uid", type=int, default=0)
        step.add_argument("--gid", type=int, default=0)
    args = parser.parse_args(argv)
    if args.step == "check":
        print("chunked-copy-v1")
        return 0
    try:
        result = (finalise if args.step == "finalise" else abort)(args.manifest, args.uid)
    except (UploadError, OSError, ValueError) as e:
        print(f"slicer-agent: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # tarfile errors and the like: one line, not a traceback
        print(f"slicer-agent: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
