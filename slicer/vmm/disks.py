"""qcow2 layers on the host: overlays, rebases and backing chains (``qemu-img``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from slicer.vmm.base import VMMError
from slicer.vmm.handoff import Layer, backing_chain

__all__ = ["Layer", "backing_chain", "chain_paths", "copy_disk", "create_overlay", "rebase"]


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise VMMError(f"{argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()}")


async def _qemu_img(*args: str) -> None:
    await _run("qemu-img", *args)


async def create_overlay(path: Path, backing: Path, backing_format: str = "qcow2", size: int | None = None) -> None:
    """An empty qcow2 at ``path`` whose reads fall through to ``backing`` (its size, or ``size``)."""
    await _qemu_img("create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_format, str(path),
                    *([str(size)] if size is not None else []))


async def copy_disk(src: Path, dst: Path) -> None:
    """A copy of a qcow2 overlay (sparse; shared extents where the filesystem can)."""
    await _run("cp", "--reflink=auto", "--sparse=always", str(src), str(dst))


async def rebase(path: Path, backing: Path, backing_format: str) -> None:
    """Make ``backing`` the backing file of ``path``, copying into it every cluster that reads
    differently (safe mode): ``path`` reads the same afterwards."""
    await _qemu_img("rebase", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_format, str(path))


async def chain_paths(path: Path) -> list[Path]:
    """The files ``path`` reads through, itself first, resolved."""
    return [layer.path.resolve() for layer in await backing_chain(path)]
