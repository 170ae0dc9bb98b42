"""The client's extraction of guest-made tars: crafted archives land nothing outside."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from slicer.client._tar import UnsafeArchive, extract


def archive(*members: tuple[str, str, str | bytes]) -> io.BytesIO:
    """(kind, name, payload): kind file (payload bytes), dir, sym / hard (payload = link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "dev": tarfile.CHRTYPE}[kind]
            info.linkname = str(payload)
            tf.addfile(info)
    buf.seek(0)
    return buf


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original\n")
    return tmp_path / "dest", outside


def untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["victim"] and (outside / "victim").read_text() == "original\n"


@pytest.mark.parametrize("members", [
    [("file", "/etc/evil", "x")],
    [("file", "../outside/evil", "x")],
    [("file", "a/../../outside/evil", "x")],
    [("sym", "link", "OUTSIDE"), ("file", "link/evil", "x")],  # link, then a file through it
    [("sym", "link", "OUTSIDE/victim"), ("file", "link", "x")],  # a file over a link: replaced, not followed
    [("sym", "a", "."), ("sym", "a/b", "OUTSIDE"), ("file", "a/b/evil", "x")],  # a chain
    [("sym", "up", ".."), ("file", "up/outside/evil", "x")],
    [("hard", "h", "OUTSIDE/victim")],
    [("sym", "s", "OUTSIDE/victim"), ("hard", "h", "s"), ("file", "h", "x")],  # hard link via a symlink
    [("fifo", "f", ""), ("dev", "d", "")],
])
def test_crafted_archives_land_nothing_outside(box, members):
    dest, outside = box
    fixed = [(k, n, p.replace("OUTSIDE", str(outside)) if isinstance(p, str) else p) for k, n, p in members]
    try:
        extract(archive(*fixed), dest)
    except UnsafeArchive:
        pass
    assert untouched(outside)


def test_a_plain_tree_extracts(box):
    dest, outside = box
    n = extract(archive(("dir", "d", ""), ("file", "d/a.txt", "hello"), ("sym", "d/l", "a.txt"),
                        ("hard", "d/h", "d/a.txt"), ("file", "d/a.txt", "again")), dest)
    assert n == 5
    # d/a.txt was replaced (unlinked, then written), not written through: the hard link keeps the old bytes
    assert (dest / "d/l").read_text() == "again" and (dest / "d/h").read_text() == "hello"
    assert untouched(outside)
