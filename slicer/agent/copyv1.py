"""The "cp-v1" copy semantics of Slicer's newer SDKs: ``cp``-like destinations and metadata.

Upload (``POST /cp?mode=cp-v1-binary|cp-v1-tar&copy_semantics=cp-v1&source_name=&source_type=
&copy_contents=``): the body is a file, or a tar of a directory's *contents*; the agent picks
the destination as ``cp`` would: into an existing directory under the source's name (its
contents only with ``copy_contents``), or to ``path`` itself when it does not exist (a file
renamed, a directory made).

Download (``GET /cp?mode=cp-v1-binary|cp-v1-tar|cp-v1-recursive``): a file's bytes, or a tar of
a directory's contents (``recursive``: whichever the path is), described by
``X-Slicer-Source-Type`` (``file``/``directory``) and ``X-Slicer-Source-Name-Base64`` (URL-safe
base64 without padding; the plain ``X-Slicer-Source-Name`` too when it is printable ASCII).
``exclude`` patterns (repeatable; ``**`` allowed; without ``/`` they match any base name)
leave entries out of tars both ways.
"""

from __future__ import annotations

import base64
import os
import stat

from slicer.agent.files import FileError, not_found
from slicer.agent.paths import lstat

MODES = ("cp-v1-binary", "cp-v1-tar", "cp-v1-recursive")


def upload_target(path: str, source_type: str, source_name: str, copy_contents: bool) -> tuple[str, str]:
    """Where an upload goes, as ``cp`` would put it: (``file`` path | ``directory`` to extract into)."""
    if source_type not in ("file", "directory"):
        raise FileError("source_type must be file or directory", "invalid_request")
    if source_name and (source_name in (".", "..") or "/" in source_name or "\\" in source_name):
        raise FileError(f"invalid source_name {source_name!r}", "invalid_request")
    dir_only = path.endswith("/")  # "dir/" names a directory, which must exist for a file
    path = path.rstrip("/") or "/"
    st = lstat(path)  # the agent's rule for paths (slicer.agent.paths)
    exists_dir = st is not None and stat.S_ISDIR(st.st_mode)
    if source_type == "file":
        if exists_dir:
            if not source_name:
                raise FileError("source_name is needed to copy a file into a directory", "invalid_request")
            return "file", os.path.join(path, source_name)
        if dir_only:
            raise not_found(path + "/")
        return "file", path
    if st is not None and not exists_dir:
        raise FileError(f"{path} exists and is not a directory", "not_a_directory", 409)
    if exists_dir and not copy_contents:
        if not source_name:
            raise FileError("source_name is needed to copy a directory into a directory", "invalid_request")
        return "directory", os.path.join(path, source_name)
    return "directory", path  # its contents into it; made if missing (a copy under a new name)


def source_headers(path: str, kind: str) -> dict[str, str]:
    name = os.path.basename(os.path.normpath(path)) if os.path.normpath(path) != "/" else ""
    headers = {"X-Slicer-Source-Type": kind,
               "X-Slicer-Source-Name-Base64": base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")}
    if name.isascii() and name.isprintable():
        headers["X-Slicer-Source-Name"] = name  # older SDKs read it plain
    return headers


def download_kind(path: str, mode: str) -> str:
    """``file`` or ``directory``: what a download of ``path`` in ``mode`` sends, or FileError."""
    st = lstat(path)  # the agent's rule for paths (slicer.agent.paths)
    if st is None:
        raise not_found(path)
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    if mode == "cp-v1-binary" and kind == "directory":
        raise FileError(f"{path} is a directory: must specify a file not a directory (mode=cp-v1-tar)",
                        "is_directory")
    if mode == "cp-v1-tar" and kind == "file":
        raise FileError(f"{path} is a file: use mode=cp-v1-binary", "not_a_directory")
    return kind
