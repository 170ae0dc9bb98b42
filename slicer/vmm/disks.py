"""qcow2 layers on the host: overlays, rebases and backing chains (``qemu-img``).

A qcow2 names its backing file in its own header, and the VMM writing the file can rewrite that
header (an escaped QEMU holds its disk open read-write). So the daemon never takes a chain from
the headers: beside every overlay it makes it writes a record of what it put below it
(``<disk>.backing``, 0600, in directories no VMM can write), and :func:`verified_chain` walks
those records, checking each header against them; a mismatch is refused before any privileged
step (chown, chmod, qemu-img on the chain) touches a file the header names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from slicer.vmm.base import VMMError
from slicer.vmm.handoff import Layer

__all__ = ["PART", "Layer", "chain_paths", "copy_disk", "create_overlay", "move_disk", "rebase", "recorded_chain",
           "remove_disk", "verified_chain", "virtual_size"]

log = logging.getLogger(__name__)
MAX_DEPTH = 16  # image, template, commits of commits...
HEADER_TIMEOUT = 30.0


class TamperedDisk(VMMError):
    """A disk's header does not name the backing file the daemon made it on."""


async def _run(*argv: str, timeout: float | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise VMMError(f"{argv[0]} {argv[1]} did not finish within {timeout:g}s") from None
    except asyncio.CancelledError:  # a daemon that stops: no copy goes on writing behind it
        proc.kill()
        raise
    if proc.returncode:
        raise VMMError(f"{argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()}")
    return out


async def _qemu_img(*args: str, timeout: float | None = None) -> bytes:
    return await _run("qemu-img", *args, timeout=timeout)


# -- the daemon's records ----------------------------------------------------------------------
def _record_path(disk: Path) -> Path:
    return disk.with_name(disk.name + ".backing")


def record_backing(disk: Path, backing: Path | None, fmt: str = "qcow2",
                   also: tuple[Path, str] | None = None) -> None:
    """Write down (atomically, 0600) that ``disk`` was made on ``backing`` (None: on nothing);
    ``also``: another backing its header may name for now (a rebase under way)."""
    data = json.dumps({"path": str(backing) if backing is not None else None, "format": fmt,
                       **({"also": [str(also[0]), also[1]]} if also else {})})
    rec = _record_path(disk)
    tmp = rec.with_name(rec.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, rec)


def _read_record(disk: Path) -> dict | None:
    try:
        data = json.loads(_record_path(disk).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("format"), str):
            raise ValueError("not a record")
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise VMMError(f"{disk}: its backing record is unreadable ({e})") from e


def recorded_backing(disk: Path) -> tuple[Path | None, str] | None:
    """What the daemon made ``disk`` on: (path or None, its format); None if it has no record."""
    data = _read_record(disk)
    if data is None:
        return None
    return (Path(data["path"]) if data["path"] else None), data["format"]


def _accepted_backings(disk: Path) -> list[tuple[Path | None, str]] | None:
    data = _read_record(disk)
    if data is None:
        return None
    found = [((Path(data["path"]) if data["path"] else None), data["format"])]
    if isinstance(data.get("also"), list) and len(data["also"]) == 2:
        found.append((Path(data["also"][0]), str(data["also"][1])))
    return found


def recorded_chain(disk: Path) -> list[Layer]:
    """``disk`` and what lies below it, from the daemon's records alone (no header is read)."""
    chain = [Layer(disk, "qcow2")]
    while len(chain) <= MAX_DEPTH:
        below = recorded_backing(chain[-1].path)
        if below is None or below[0] is None:
            return chain
        chain.append(Layer(below[0], below[1]))
        if below[1] != "qcow2":
            return chain
    raise VMMError(f"{disk}: its backing chain is deeper than {MAX_DEPTH}")


async def _header(path: Path, fmt: str) -> dict:
    """One layer's own header, read as ``fmt`` (never probed: a VMM could turn its disk into a
    format that names other files), without opening anything it names."""
    if not path.exists():
        raise VMMError(f"{path} is missing")
    try:
        info = json.loads(await _qemu_img("info", "-f", fmt, "-U", "--output=json", str(path), timeout=HEADER_TIMEOUT))
        return info if isinstance(info, dict) else {}
    except ValueError as e:
        raise VMMError(f"qemu-img info {path}: unexpected answer ({e})") from e
    except VMMError as e:  # it exists but does not read as what the daemon made
        raise TamperedDisk(f"{path} is not a {fmt} image any more ({str(e)[-300:]}): refusing to use it") from e


def _named_backing(header: dict) -> tuple[Path | None, str | None]:
    name = header.get("full-backing-filename") or header.get("backing-filename")
    return (Path(name).resolve() if name else None), header.get("backing-filename-format")


async def _legacy_backing(path: Path, header: dict, roots: tuple[Path, ...]) -> list[tuple[Path | None, str]]:
    """A disk made before the daemon kept records: its header is believed once, only if it names
    a file inside the daemon's own layer directories, and the record is written from then on."""
    backing, fmt = _named_backing(header)
    if backing is not None and not any(backing.is_relative_to(r.resolve()) for r in roots):
        raise TamperedDisk(f"{path} has no backing record and its header names {backing}, outside the daemon's "
                           "image, template and commit directories: refusing it (restore the disk or remove it)")
    log.warning("%s: no backing record (made by an older daemon); recording %s", path, backing)
    record_backing(path, backing, fmt or "qcow2")
    return [(backing, fmt or "qcow2")]


def _check_header(layer: Layer, header: dict) -> None:
    """What the daemon never makes: another format, or an external data file (qemu-img would
    write to it as root when it rebases)."""
    if header.get("format") != layer.format:
        raise TamperedDisk(f"{layer.path} is not a {layer.format} image any more (its header says "
                           f"{str(header.get('format'))[:40]!r}): refusing to use it")
    data = (header.get("format-specific") or {}).get("data") or {}
    if isinstance(data, dict) and data.get("data-file"):
        raise TamperedDisk(f"{layer.path}: its header names an external data file "
                           f"({str(data['data-file'])[:300]!r}); the daemon never makes one: refusing to use it")


async def verified_chain(disk: Path, legacy_roots: tuple[Path, ...] = (), fmt: str = "qcow2") -> list[Layer]:
    """``disk`` (of format ``fmt``) and its backing chain as the daemon's records say, each
    header checked against them (format, backing file, no data file): :class:`TamperedDisk` on
    any mismatch. Nothing a header names is opened."""
    chain = [Layer(disk, fmt)]
    while True:
        layer = chain[-1]
        header = await _header(layer.path, layer.format)
        _check_header(layer, header)
        if layer.format != "qcow2":
            return chain
        accepted = _accepted_backings(layer.path)
        if accepted is None:
            accepted = await _legacy_backing(layer.path, header, legacy_roots)
        actual, actual_fmt = _named_backing(header)
        match = next((b for b in accepted if (b[0].resolve() if b[0] is not None else None) == actual
                      and (actual is None or (actual_fmt or b[1]) == b[1])), None)
        if match is None:
            raise TamperedDisk(f"{layer.path}: its header names {str(actual)[:300]!r} as its backing file, but the "
                               f"daemon made it on {accepted[0][0]}: the file was changed outside the daemon; "
                               "refusing to use it")
        if match[0] is None:
            return chain
        if len(chain) > MAX_DEPTH:
            raise TamperedDisk(f"{disk}: its backing chain is deeper than {MAX_DEPTH}")
        chain.append(Layer(match[0], match[1]))


async def virtual_size(path: Path, fmt: str) -> int:
    """The size a layer's guest sees (from its own header, read as ``fmt``)."""
    size = (await _header(path, fmt)).get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise VMMError(f"{path}: no virtual size in its header")
    return size


# -- making and changing layers ----------------------------------------------------------------
async def create_overlay(path: Path, backing: Path, backing_format: str = "qcow2", size: int | None = None,
                         legacy_roots: tuple[Path, ...] = (), verified: bool = False) -> None:
    """An empty qcow2 at ``path`` whose reads fall through to ``backing`` (its size, or ``size``).
    ``backing``'s chain is verified first (``verified``: the caller did), and qemu-img is told not
    to open it (``-u``): it would follow whatever its header names."""
    if not verified:
        await verified_chain(backing, legacy_roots, backing_format)
    if size is None:
        size = await virtual_size(backing, backing_format)
    record_backing(path, backing, backing_format)
    await _qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(backing), "-F", backing_format, str(path),
                    str(size))


PART = ".part"  # a copy under way (:func:`copy_disk`): what a crash left of one is removed at start


async def copy_disk(src: Path, dst: Path) -> None:
    """A copy of a qcow2 overlay (sparse; shared extents where the filesystem can), with its
    record; it appears whole under ``dst`` or not at all (made as ``dst.part``, then renamed)."""
    part = dst.with_name(dst.name + PART)
    try:
        copy_record(src, part)
        await _run("cp", "--reflink=auto", "--sparse=always", str(src), str(part))
        move_disk(part, dst)
    except BaseException:
        remove_disk(part)
        raise


async def copy_files(files: list[Path], into: Path, timeout: float) -> None:
    """Copies of ``files`` in the directory ``into``: sparse, sharing extents where the filesystem
    can, modes kept (a template's files, records included)."""
    await _run("cp", "--preserve=mode", "--reflink=auto", "--sparse=always", "--", *map(str, files), str(into),
               timeout=timeout)


def copy_record(src: Path, dst: Path) -> None:
    """``dst`` is (or will be) the same layer as ``src`` (a copy or a hard link)."""
    below = recorded_backing(src)
    if below is not None:
        record_backing(dst, below[0], below[1])


def move_disk(src: Path, dst: Path) -> None:
    """Rename a layer over another; the record first (a crash between leaves the old file under a
    record for the new one, which a start that finishes the move expects)."""
    below = recorded_backing(src)
    if below is not None:
        record_backing(dst, below[0], below[1])
    os.replace(src, dst)
    _record_path(src).unlink(missing_ok=True)


def remove_disk(path: Path) -> None:
    path.unlink(missing_ok=True)
    _record_path(path).unlink(missing_ok=True)


async def rebase(path: Path, backing: Path, backing_format: str, legacy_roots: tuple[Path, ...] = ()) -> None:
    """Make ``backing`` the backing file of ``path``, copying into it every cluster that reads
    differently (safe mode): ``path`` reads the same afterwards. Both chains are checked first:
    qemu-img runs as root and reads the old chain the header names. The record accepts the old
    backing and the new one while qemu-img rewrites the header (a crash between leaves either)."""
    old = (await verified_chain(path, legacy_roots))[1]
    await verified_chain(backing, legacy_roots, backing_format)
    record_backing(path, backing, backing_format, also=(old.path, old.format))
    await _qemu_img("rebase", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_format, str(path))
    record_backing(path, backing, backing_format)


async def chain_paths(path: Path, legacy_roots: tuple[Path, ...] = ()) -> list[Path]:
    """The files ``path`` reads through, itself first, resolved: its verified chain, or for a
    disk whose header was changed, what the daemon's records say it was made on."""
    try:
        chain = await verified_chain(path, legacy_roots)
    except TamperedDisk:
        chain = recorded_chain(path)
    return [layer.path.resolve() for layer in chain]
