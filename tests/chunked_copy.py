"""The official SDKs' chunked copy (``CpToVMChunked``), request for request, over raw HTTP.

Shared by the tests of the project's image and of users' images: the session directory next
to the destination, one ``POST /cp`` per chunk, the manifest, then ``slicer-agent upload
finalise`` (or ``abort``) through a buffered exec as root.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
from collections.abc import Callable

import httpx

HELPER = "/usr/local/bin/slicer-agent"


def helper(api: httpx.Client, vm: str, *args: str) -> dict:
    """``ExecBuffered`` of the helper as the Go SDK sends it (uid 0, no shell given)."""
    r = api.post(f"/vm/{vm}/exec", params={"cmd": HELPER, "args": list(args), "uid": "0", "gid": "0",
                                           "stdout": "true", "stderr": "true", "buffered": "true"})
    assert r.status_code == 200, r.text
    return r.json()


def post_chunk(api: httpx.Client, vm: str, path: str, data: bytes, uid: int = 0) -> httpx.Response:
    return api.post(f"/vm/{vm}/cp", params={"path": path, "mode": "binary", "permissions": "0600",
                                            "uid": str(uid), "gid": str(uid)},
                    content=data, headers={"content-type": "application/octet-stream"})


def upload(api: httpx.Client, vm: str, data: bytes, dest: str, mode: str = "binary", chunk_size: int = 1 << 20,
           uid: int = 0, permissions: str = "", corrupt: int | None = None,
           manifest: dict | None = None, finalise_gid: int | None = None,
           source: tuple[str, str, bool] | None = None,
           before_finalise: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """Send ``data`` to ``dest`` in chunks; returns (finalise's exec result, the session dir).
    ``corrupt``: the index of a chunk whose uploaded bytes differ from the manifest's hash;
    ``manifest``: fields that replace the manifest's own (a tampered one); ``source``: a version 2
    manifest (the newest SDKs') for a source of this (type, name, copy_contents);
    ``before_finalise(session)``: called once everything is sent."""
    session = posixpath.join(posixpath.dirname(posixpath.normpath(dest)), ".slicer-upload-" + secrets.token_hex(16))
    chunks = []
    for index, offset in enumerate(range(0, len(data), chunk_size)):
        part = data[offset:offset + chunk_size]
        chunks.append({"index": index, "size": len(part), "sha256": hashlib.sha256(part).hexdigest()})
        sent = bytes([part[0] ^ 1]) + part[1:] if index == corrupt else part
        r = post_chunk(api, vm, f"{session}/chunks/{index:06d}.chunk", sent, uid)
        assert r.status_code == 200, r.text
    body = {"version": 1, "mode": mode, "destination": dest, "uid": uid, "gid": uid, "size": len(data),
            "chunks": chunks, **({"permissions": permissions} if permissions else {})}
    if source:
        body.update(version=2, copy_semantics="cp-v1", source_type=source[0], source_name=source[1],
                    **({"copy_contents": True} if source[2] else {}))
    body.update(manifest or {})
    r = post_chunk(api, vm, f"{session}/manifest.json", json.dumps(body).encode(), uid)
    assert r.status_code == 200, r.text
    if before_finalise is not None:
        before_finalise(session)
    gid = uid if finalise_gid is None else finalise_gid
    return helper(api, vm, "upload", "finalise", "--manifest", f"{session}/manifest.json",
                  "--uid", str(uid), "--gid", str(gid)), session
