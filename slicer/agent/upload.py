"""``slicer-agent upload check|finalise|abort``: the guest half of the SDKs' chunked copy.

The official SDKs' ``CpToVMChunked`` sends a file (or a tar of a directory) as checksummed
chunks with ordinary ``POST /cp`` requests into a session directory next to the destination
(``<parent>/.slicer-upload-<32 hex>/chunks/NNNNNN.chunk``), then a ``manifest.json`` listing
them, and runs this helper (as root, through exec) to check every chunk against the manifest
and assemble the result. Nothing reaches the destination unless every chunk's size and
SHA-256 match (checked here, or by the host as it sent the chunk: below): a binary file is made
under a temporary name and renamed into place; a tar is verified whole before it is extracted
(with the same member checks as ``/cp?mode=tar``).

Guest users are not trusted with each other's files: the helper works as ``--uid``/``--gid``
(it drops root's privileges first), so a manifest rewritten by that user can only do what the
user could. Session directories are made by the agent for that owner (root's are 0700 and
cannot be entered by anyone else) and read through descriptors opened without following
symlinks, so renaming or replacing them midway changes nothing. The destination must sit
beside the session, where the SDKs put it.

The agent lands every chunk at its slot of one sparse data file (slicer.agent.stripe), so with
the SDKs' 64 MiB chunks that file already is the new file: finalise links it beside the
destination and renames it into place. Smaller chunks of whole filesystem blocks are closed up
first (``FALLOC_FL_COLLAPSE_RANGE``, put back if finalise fails later); others, or where the
filesystem cannot (tmpfs), are copied with ``copy_file_range``. A chunk whose recorded digest (the
host's, for one that came on the bulk port) still stands is not read again; the others are read
and hashed before anything is written. Under TCG that reading and copying was most of finalise's time.

Manifest versions 1 and 2 are spoken (``check`` prints ``chunked-copy-v1 chunked-copy-v2``; the
newest SDKs then send v2). Version 1 writes the file to, or extracts the tar into, the
destination itself. Version 2 adds the "cp-v1" semantics of ``POST /cp`` (slicer.agent.copyv1):
``source_type`` (file or directory), ``source_name`` and ``copy_contents`` say where ``cp`` would
put the source — into an existing directory under its own name, or at the destination itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import stat
import sys
from collections.abc import Iterator

from slicer.agent import copyv1, files, paths, stripe
from slicer.agent.assemble import READ, Chunks, StreamReader, UploadError
from slicer.agent.sessions import HEX_DIGITS, VERSIONS, is_session_name, session_of

# The helper starts once or twice per chunked copy, and under TCG each import is felt (argparse,
# hashlib and shutil took ~0.25 s of its ~0.5 s start): what only some runs need is imported there.

MAX_MANIFEST = 16 << 20  # ~170k chunk entries; a hostile one is refused (and one of over stripe.MAX_SLOTS chunks)
MAX_CHUNK = stripe.SLOT  # the SDKs' own limit, a slot of the data file
NON_ROOT_USER = 2**32 - 1  # the Go SDK's NonRootUser


def real_ids(uid: int, gid: int) -> tuple[int, int]:
    """``uid``/``gid`` with the Go SDK's ``NonRootUser`` ("not given": its chunks went as root)
    read as root, and a missing gid as the uid's."""
    uid = 0 if uid == NON_ROOT_USER else uid
    return uid, uid if gid == NON_ROOT_USER else gid


class SessionMissing(UploadError):
    pass


# -- the agent's side: chunk uploads into a session ---------------------------------------------
def _owned_dir(name: str, dir_fd: int | None, uid: int, gid: int, make: bool) -> int:
    """Open directory ``name`` (made for ``uid:gid`` with mode 0700 if missing and ``make``);
    refused unless it is a real directory of that owner that nobody else may write."""
    if make:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            fd = os.open(name, paths.DIR_FLAGS, dir_fd=dir_fd)
            try:
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
    try:
        fd = os.open(name, paths.DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise files.not_found(name) from None
    except OSError as e:  # ELOOP: a symlink in its place
        raise files.FileError(f"{name}: not a directory of this upload ({e.strerror})", "unsafe_session", 409) from None
    st = os.fstat(fd)
    if st.st_uid != uid or st.st_mode & 0o022:
        os.close(fd)
        raise files.FileError(f"{name}: owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}, not "
                              f"this upload's (uid {uid}, 0700)", "unsafe_session", 409)
    return fd


@contextlib.contextmanager
def upload_path(path: str, uid: int | None, gid: int | None) -> Iterator[tuple[int | None, str]]:
    """Where a ``POST /cp`` of ``path`` writes, as ``(dir_fd, name)``: ``(None, path)`` itself, or
    for a file of a chunked-copy session (whose directories the SDKs do not make) its name in the
    descriptor of its verified directory, made here on the way for the upload's owner."""
    session = session_of(path)
    if session is None:
        yield None, path
        return
    owner, group = uid or 0, gid if gid is not None else (uid or 0)
    beside = os.path.dirname(session)
    fds = [files.open_dir(beside)]  # under the agent's rule for paths (slicer.agent.paths)
    try:
        if owner and not _writable_by(fds[0], owner, group):  # finalise will work as that user
            raise files.FileError(f"{beside} is not writable by uid {owner}: the copy could not be finished there",
                                  "permission_denied", 403)
        for name in os.path.relpath(os.path.dirname(path), beside).split("/"):
            fds.append(_owned_dir(name, fds[-1], owner, group, make=True))
        yield fds[-1], os.path.basename(path)
    finally:
        for fd in fds:
            os.close(fd)


def _groups_of(uid: int, gid: int) -> set[int]:
    """The groups ``uid`` has in the guest (only ``gid`` when it has no passwd entry)."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return {gid}
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


def _writable_by(dir_fd: int, uid: int, gid: int) -> bool:
    """Whether ``uid`` (in ``gid`` and its own groups) may create entries in directory ``dir_fd``
    (mode bits; ACLs aside)."""
    st = os.fstat(dir_fd)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o200)
    if st.st_gid in _groups_of(uid, gid) | {gid}:
        return bool(st.st_mode & 0o020)
    return bool(st.st_mode & 0o002)


# -- the helper's side: finalise and abort ------------------------------------------------------
class Session:
    """A session directory held by descriptor, checked to be the caller's own."""

    def __init__(self, raw_manifest: str, uid: int) -> None:
        try:
            manifest = files.require_path(raw_manifest, uid)
        except files.FileError as e:
            raise UploadError(str(e)) from None
        self.path = os.path.dirname(manifest)
        self.name = os.path.basename(self.path)
        if os.path.basename(manifest) != "manifest.json" or not is_session_name(self.name):
            raise UploadError(f"{raw_manifest}: not a chunked-copy manifest (<dir>/.slicer-upload-<id>/manifest.json)")
        try:
            self.beside = files.open_dir(os.path.dirname(self.path))  # the agent's rule (slicer.agent.paths)
        except files.FileError as e:
            raise (SessionMissing if e.code == "not_found" else UploadError)(str(e)) from None
        try:
            self.fd = _owned_dir(self.name, self.beside, os.geteuid(), os.getegid(), make=False)
        except files.FileError as e:
            os.close(self.beside)
            raise (SessionMissing if e.code == "not_found" else UploadError)(str(e)) from None

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.beside)

    def open(self, name: str, dir_fd: int | None = None) -> io.BufferedReader:
        """A regular file of the session (no symlink, FIFO or device), for reading."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd if dir_fd is None else dir_fd)
        except FileNotFoundError:
            raise UploadError(f"{self.path}: {name} is missing") from None
        except OSError as e:
            raise UploadError(f"{self.path}: {name}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UploadError(f"{self.path}: {name} is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb")

    def remove(self) -> bool:
        """Remove the session; whether it is gone."""
        import shutil

        shutil.rmtree(self.name, ignore_errors=True, dir_fd=self.beside)  # by descriptor: never through a symlink
        try:
            os.stat(self.name, dir_fd=self.beside, follow_symlinks=False)
        except FileNotFoundError:
            return True
        return False


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and HEX_DIGITS.issuperset(value.lower())


def load_manifest(session: Session) -> dict:
    """Read and validate a manifest as the SDKs' ``CopyManifest.Validate`` does (versions 1, 2)."""
    with session.open("manifest.json") as f:
        data = f.read(MAX_MANIFEST + 1)
    if len(data) > MAX_MANIFEST:
        raise UploadError(f"manifest larger than {MAX_MANIFEST} bytes")
    try:
        m = json.loads(data)
    except ValueError as e:
        raise UploadError(f"manifest is not JSON: {e}") from None
    if not isinstance(m, dict):
        raise UploadError("manifest must be a JSON object")
    if m.get("version") not in VERSIONS or isinstance(m.get("version"), bool):
        raise UploadError(f"unsupported copy manifest version: {m.get('version')!r} (this agent speaks 1 and 2)")
    if m.get("mode") not in ("binary", "tar"):
        raise UploadError(f"invalid copy mode: {m.get('mode')!r}")
    if m["version"] == 2:
        _check_semantics(m)
    if not isinstance(m.get("destination"), str) or not m["destination"]:
        raise UploadError("copy destination is required")
    if not isinstance(m.get("permissions", ""), str):
        raise UploadError("permissions must be an octal string like 0644")
    chunks = m.get("chunks")
    if not _is_int(m.get("size"), 0, 1 << 62) or not isinstance(chunks, list):
        raise UploadError("manifest needs a size (>= 0) and a list of chunks")
    total = 0
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or not _is_int(chunk.get("index"), i, i + 1):
            raise UploadError(f"chunk {i} is out of sequence")
        if not _is_int(chunk.get("size"), 1, MAX_CHUNK + 1):
            raise UploadError(f"chunk {i} has invalid size {chunk.get('size')!r}")
        if not _is_sha256(chunk.get("sha256")):
            raise UploadError(f"chunk {i} has invalid SHA-256: {chunk.get('sha256')!r}")
        chunk["sha256"] = chunk["sha256"].lower()
        total += chunk["size"]
    if total != m["size"]:
        raise UploadError(f"chunk sizes total {total} bytes, expected {m['size']}")
    for key in ("uid", "gid"):
        if not _is_int(m.get(key, 0), 0, 2**32):
            raise UploadError(f"invalid {key}: {m.get(key)!r}")
    m["uid"], m["gid"] = real_ids(m.get("uid", 0), m.get("gid", 0))
    return m


def _check_semantics(m: dict) -> None:
    """Version 2's fields, as the SDK's ``Validate`` checks them."""
    if m.get("copy_semantics") != "cp-v1":
        raise UploadError(f"invalid copy semantics: {m.get('copy_semantics')!r} (cp-v1)")
    kind, name, contents = m.get("source_type"), m.get("source_name", ""), m.get("copy_contents", False)
    if kind not in ("file", "directory"):
        raise UploadError(f"invalid copy source type: {kind!r} (file or directory)")
    if not isinstance(contents, bool) or not isinstance(name, str):
        raise UploadError("copy_contents must be a boolean and source_name a string")
    if not contents and (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name):
        raise UploadError(f"invalid copy source name: {name!r}")
    if kind == "file" and (m["mode"] != "binary" or contents):
        raise UploadError("file copy semantics require binary mode without copy_contents")
    if kind == "directory" and m["mode"] != "tar":
        raise UploadError("directory copy semantics require tar mode")


def _write_binary(session: Session, m: dict, dest: str, perms: int | None) -> dict:
    with Chunks(session.fd, session.path, m) as chunks:
        chunks.check()
        taken = False

        def adopt(dir_fd: int, tmp: str) -> int | None:
            nonlocal taken
            fd = chunks.take(dir_fd, tmp)
            taken = fd is not None
            return fd

        try:
            with files.atomic_file(dest, perms, m["uid"], m["gid"], fsync=True,
                                   adopt=adopt if chunks.parts else None) as f:
                if not taken:
                    chunks.copy_to(f)
        except BaseException:
            with contextlib.suppress(UploadError):  # the error that brought us here is the one to tell
                chunks.give_back()
            raise
    return {"path": dest, "mode": "binary", "size": m["size"]}


def _extract(session: Session, m: dict, dest: str, perms: int | None) -> dict:
    with Chunks(session.fd, session.path, m) as chunks:
        chunks.check()  # every chunk checked before anything is extracted
        from slicer.agent import tars  # tarfile and shutil: only for a tar

        count = tars.extract_tar(io.BufferedReader(StreamReader(chunks.stream()), READ), dest, perms,
                                  m["uid"], m["gid"])
    return {"path": dest, "mode": "tar", "entries": count}


def finalise(session: Session, uid: int, gid: int) -> dict:
    m = load_manifest(session)
    if (m["uid"], m["gid"]) != (uid, gid):
        raise UploadError(f"the manifest's uid/gid ({m['uid']}/{m['gid']}) are not --uid/--gid "
                          f"({uid}/{gid})")
    try:
        dest = files.require_path(m["destination"], uid)
        perms = files.parse_permissions(m.get("permissions") or None)
    except files.FileError as e:
        raise UploadError(str(e)) from None
    beside = os.path.dirname(session.path)
    if dest == session.path or (dest != beside and os.path.dirname(dest) != beside):
        raise UploadError(f"the destination {dest} is not beside its session {session.path}")
    try:
        if m["version"] == 2:  # where cp would put it: maybe inside dest, under the source's name
            trailing = "/" if m["destination"].endswith("/") else ""
            _, dest = copyv1.upload_target(dest + trailing, m["source_type"], m.get("source_name", ""),
                                           m.get("copy_contents", False))
        result = (_write_binary if m["mode"] == "binary" else _extract)(session, m, dest, perms)
    except files.FileError as e:
        raise UploadError(str(e)) from None
    session.remove()
    return result


def _become(uid: int, gid: int) -> None:
    """Work as the upload's owner: what it writes, that user could have written. The group must
    be one of the user's (``gid`` 0 for uid 1000 would hand it root's group)."""
    if os.geteuid() != 0 or uid == 0:
        return
    if gid not in _groups_of(uid, uid):
        raise UploadError(f"gid {gid} is not a group of uid {uid} in the guest: give the user's own gid")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    import argparse  # here: ``upload check`` is answered before this module is imported (slicer.agent.helper)

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
    if args.step != "check":
        args.uid, args.gid = real_ids(args.uid, args.gid)
    if args.step == "check":
        print(" ".join(f"chunked-copy-v{v}" for v in VERSIONS))
        return 0
    try:
        _become(args.uid, args.gid)
        try:
            session = Session(args.manifest, args.uid)
        except SessionMissing:
            if args.step == "finalise":
                raise
            print(json.dumps({"removed": False}))  # nothing to abort: done
            return 0
        try:
            if args.step == "finalise":
                result = finalise(session, args.uid, args.gid)
            else:
                result = {"session": session.path, "removed": session.remove()}
        finally:
            session.close()
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
