"""cp (binary and tar, both ways) and fs/* against a real VM, including unsafe tars."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import tarfile
import time

import httpx
import pytest

from tests import chunked_copy

pytestmark = pytest.mark.vm


def sh(api, vm, cmd: str) -> str:
    r = api.post(f"/vm/{vm}/exec", params={"cmd": cmd, "buffered": "true"})
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_binary_round_trip_with_owner_and_permissions(api, vm):
    data = os.urandom(3 * 1024 * 1024 + 17)
    r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/blob.bin", "permissions": "0640", "uid": "1000", "gid": "1000"},
                 content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(data)
    assert sh(api, vm, "stat -c '%a %u %g' /tmp/blob.bin").split() == ["640", "1000", "1000"]
    assert sh(api, vm, "sha256sum /tmp/blob.bin").split()[0] == hashlib.sha256(data).hexdigest()
    back = api.get(f"/vm/{vm}/cp", params={"path": "/tmp/blob.bin"}, headers={"accept": "application/octet-stream"})
    assert back.status_code == 200 and back.content == data
    assert back.headers["x-slicer-file-mode"] == "0640"


def test_directory_round_trip_as_tar(api, vm, tmp_path):
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(70000), "sub/deeper/c": b""}
    members = [file_member(name, data, 0o600 if name == "a.txt" else 0o644) for name, data in files.items()]
    r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/tree", "uid": "1000"}, content=make_tar(members),
                 headers={"content-type": "application/x-tar"})
    assert r.status_code == 200, r.text
    assert sh(api, vm, "stat -c '%a %U' /tmp/tree/a.txt").split() == ["600", "ubuntu"]
    back = api.get(f"/vm/{vm}/cp", params={"path": "/tmp/tree"}, headers={"accept": "application/x-tar"})
    assert back.status_code == 200 and back.headers["content-type"].startswith("application/x-tar")
    with tarfile.open(fileobj=io.BytesIO(back.content)) as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    assert got == {f"tree/{k}": v for k, v in files.items()}


@pytest.mark.parametrize(
    "members, words",
    [
        ([file_member("../escape")], "'..'"),
        ([file_member("/etc/escape")], "absolute"),
        ([link_member("ln", "/etc")], "outside"),
        ([link_member("ln", "../../../etc")], "outside"),
        ([link_member("ln", "sub"), link_member("sub", "..")], "outside"),
        ([link_member("hard", "/etc/passwd", tarfile.LNKTYPE)], "outside"),
    ],
)
def test_unsafe_tars_are_refused(api, vm, members, words):
    target = f"/tmp/unsafe-{os.urandom(4).hex()}"
    r = api.post(f"/vm/{vm}/cp", params={"path": target, "mode": "tar"}, content=make_tar(members))
    assert r.status_code == 400 and r.json()["code"] == "unsafe_tar" and words in r.json()["error"]
    assert sh(api, vm, "ls /tmp/escape /etc/escape 2>&1; true").count("No such file") == 2


def test_symlink_placed_before_extraction_is_not_followed(api, vm):
    # a symlink already in the target directory must not lead a tar member outside it
    sh(api, vm, "rm -rf /tmp/pre && mkdir -p /tmp/pre && ln -s /etc /tmp/pre/etc")
    r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/pre", "mode": "tar"},
                 content=make_tar([file_member("etc/evil", b"owned")]))
    assert r.status_code == 400 and r.json()["code"] == "unsafe_tar"
    assert "No such file" in sh(api, vm, "ls /etc/evil 2>&1; true")


def test_missing_paths_are_404_json(api, vm):
    r = api.get(f"/vm/{vm}/cp", params={"path": "/no/such/file"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = api.post(f"/vm/{vm}/cp", params={"path": "/no/such/dir/file"}, content=b"x")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = api.get(f"/vm/{vm}/cp", params={"path": "relative/path"})
    assert r.status_code == 400


def test_fs_endpoints(api, vm):
    base = f"/tmp/fs-{os.urandom(4).hex()}"
    r = api.post(f"/vm/{vm}/fs/mkdir", json={"path": f"{base}/x/y", "recursive": True, "mode": "0750"})
    assert r.status_code == 200, r.text
    again = api.post(f"/vm/{vm}/fs/mkdir", json={"path": f"{base}/x/y"})
    assert again.status_code == 409 and again.json()["code"] == "exists"
    api.post(f"/vm/{vm}/cp", params={"path": f"{base}/x/file.txt"}, content=b"12345")
    entries = api.get(f"/vm/{vm}/fs/readdir", params={"path": f"{base}/x"}).json()
    assert [(e["name"], e["type"]) for e in entries] == [("file.txt", "file"), ("y", "directory")]
    st = api.get(f"/vm/{vm}/fs/stat", params={"path": f"{base}/x/file.txt"}).json()
    assert st["size"] == 5 and st["type"] == "file"
    mtime = datetime.datetime.strptime(st["mtime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    assert abs(mtime.timestamp() - time.time()) < 600  # RFC 3339, as both official SDKs parse it
    assert api.get(f"/vm/{vm}/fs/stat", params={"path": f"{base}/x/y"}).json()["mode"] == "0750"
    nonempty = api.delete(f"/vm/{vm}/fs/remove", params={"path": f"{base}/x"})
    assert nonempty.status_code == 400 and nonempty.json()["code"] == "not_empty"
    assert api.delete(f"/vm/{vm}/fs/remove", params={"path": base, "recursive": "true"}).status_code == 200
    gone = api.get(f"/vm/{vm}/fs/stat", params={"path": base})
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"
    assert api.post(f"/vm/{vm}/fs/mkdir", json={"path": 5}).status_code == 400


def test_fs_watch_streams_events_as_sse(api, vm):
    import json
    import threading

    base = f"/tmp/watch-{os.urandom(4).hex()}"
    api.post(f"/vm/{vm}/fs/mkdir", json={"path": f"{base}/sub", "recursive": True})
    events: list[dict] = []
    ready = threading.Event()

    def listen() -> None:
        params = [("paths", base), ("recursive", "true"), ("events", "create"), ("patterns", "*.txt"),
                  ("max_events", "2"), ("timeout", "90s")]
        with api.stream("GET", f"/vm/{vm}/fs/watch", params=params) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(":"):
                    ready.set()
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    t = threading.Thread(target=listen)
    t.start()
    assert ready.wait(60), "the watch never started"
    time.sleep(1)
    sh(api, vm, f"echo x > {base}/ignored.log; echo a > {base}/a.txt; sleep 0.5; echo b > {base}/sub/b.txt")
    t.join(90)
    assert not t.is_alive(), "max_events=2 must end the stream"
    assert [(e["type"], e["path"]) for e in events] == [("create", f"{base}/a.txt"), ("create", f"{base}/sub/b.txt")]
    assert [e["id"] for e in events] == [1, 2] and events[0]["isDir"] is False
    bad = api.get(f"/vm/{vm}/fs/watch", params={"paths": "/no/such/dir"})
    assert bad.status_code == 404 and bad.json()["code"] == "not_found"
    assert api.get(f"/vm/{vm}/fs/watch", params={"paths": base, "events": "explode"}).status_code == 400
    assert api.get(f"/vm/{vm}/fs/watch", params={"paths": base}, headers={"Last-Event-ID": "x"}).status_code == 400


def v1(api, vm, method: str, mode: str, path: str, body: bytes | None = None, **params):
    query = {"path": path, "mode": mode, "copy_semantics": "cp-v1", **params}
    if method == "POST":
        kind = "application/x-tar" if mode == "cp-v1-tar" else "application/octet-stream"
        return api.post(f"/vm/{vm}/cp", params=query, content=body, headers={"Content-Type": kind})
    return api.get(f"/vm/{vm}/cp", params=query)


def test_cp_v1_uploads_land_where_cp_would_put_them(api, vm):
    """The newest Go SDK's copy semantics: the destination is resolved as ``cp`` does."""
    sh(api, vm, "rm -rf /tmp/v1 && mkdir -p /tmp/v1/into")
    r = v1(api, vm, "POST", "cp-v1-binary", "/tmp/v1/into", b"one", source_name="a.txt", source_type="file")
    assert r.status_code == 200, r.text
    r = v1(api, vm, "POST", "cp-v1-binary", "/tmp/v1/renamed.txt", b"two", source_name="a.txt", source_type="file")
    assert r.status_code == 200, r.text
    r = v1(api, vm, "POST", "cp-v1-binary", "/tmp/v1/missing/", b"x", source_name="a.txt", source_type="file")
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    contents = make_tar([file_member("f.txt", b"F"), file_member("sub/g.txt", b"G"), file_member("x.log", b"L")])
    r = v1(api, vm, "POST", "cp-v1-tar", "/tmp/v1/into", contents, source_name="proj", source_type="directory",
           exclude="*.log")
    assert r.status_code == 200, r.text
    r = v1(api, vm, "POST", "cp-v1-tar", "/tmp/v1/into", contents, source_name="proj", source_type="directory",
           copy_contents="true")
    assert r.status_code == 200, r.text
    r = v1(api, vm, "POST", "cp-v1-tar", "/tmp/v1/newdir", contents, source_name="proj", source_type="directory")
    assert r.status_code == 200, r.text
    listing = sh(api, vm, "cd /tmp/v1 && find . -type f | sort && cat into/a.txt renamed.txt")
    assert listing.split() == [
        "./into/a.txt", "./into/f.txt", "./into/proj/f.txt", "./into/proj/sub/g.txt", "./into/sub/g.txt",
        "./into/x.log", "./newdir/f.txt", "./newdir/sub/g.txt", "./newdir/x.log", "./renamed.txt", "onetwo"]
    r = v1(api, vm, "POST", "cp-v1-tar", "/tmp/v1/renamed.txt", contents, source_name="proj", source_type="directory")
    assert r.status_code == 409 and r.json()["code"] == "not_a_directory"
    r = v1(api, vm, "POST", "cp-v1-bogus", "/tmp/v1/x", b"x")
    assert r.status_code == 400 and "invalid mode: cp-v1-bogus" in r.json()["error"], "the SDK's fallback cue"


def test_cp_v1_downloads_describe_their_source(api, vm):
    sh(api, vm, "rm -rf /tmp/v1d && mkdir -p '/tmp/v1d/my dir/sub' && echo hi > '/tmp/v1d/my dir/a.txt' && "
                "echo deep > '/tmp/v1d/my dir/sub/b.txt' && echo skip > '/tmp/v1d/my dir/c.log'")
    r = v1(api, vm, "GET", "cp-v1-binary", "/tmp/v1d/my dir/a.txt")
    assert r.status_code == 200 and r.content == b"hi\n"
    assert r.headers["x-slicer-source-type"] == "file" and r.headers["x-slicer-source-name"] == "a.txt"
    assert r.headers["x-slicer-source-name-base64"] == "YS50eHQ" and r.headers["x-slicer-file-mode"] == "0644"
    r = v1(api, vm, "GET", "cp-v1-tar", "/tmp/v1d/my dir", exclude="*.log")
    assert r.status_code == 200 and r.headers["x-slicer-source-type"] == "directory"
    assert r.headers["x-slicer-source-name-base64"] == "bXkgZGly"  # "my dir", URL-safe, unpadded
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        assert sorted(tf.getnames()) == ["a.txt", "sub", "sub/b.txt"], "the contents, no top-level folder"
    for path, kind in (("/tmp/v1d/my dir/a.txt", "file"), ("/tmp/v1d/my dir", "directory")):
        r = v1(api, vm, "GET", "cp-v1-recursive", path)
        assert r.status_code == 200 and r.headers["x-slicer-source-type"] == kind
    r = v1(api, vm, "GET", "cp-v1-binary", "/tmp/v1d/my dir")
    assert r.status_code == 400 and "must specify a file not a directory" in r.json()["error"]
    assert v1(api, vm, "GET", "cp-v1-tar", "/tmp/v1d/nothing").status_code == 404


def test_chunked_copy_as_the_official_sdks_do_it(api, vm, tmp_path):
    """``CpToVMChunked``: checksummed chunks, a manifest, then ``slicer-agent upload finalise``."""
    check = chunked_copy.helper(api, vm, "upload", "check")
    assert check["exit_code"] == 0 and {"chunked-copy-v1", "chunked-copy-v2"} <= set(check["stdout"].split()), check
    # a file, to a home-relative path (the SDK's ~ forms), in uneven chunks, owned by a user
    data = os.urandom(5 * 1024 * 1024 + 123)
    home = sh(api, vm, "getent passwd 1000 | cut -d: -f6").strip()
    # the session's data file (chunk i at i x 64 MiB) becomes the file, its gaps cut out in place: nothing is copied
    first: list[str] = []
    result, session = chunked_copy.upload(
        api, vm, data, "~/chunked.bin", chunk_size=2 * 1024 * 1024, uid=1000, permissions="0640",
        before_finalise=lambda s: first.append(
            sh(api, vm, f"stat -c %i {s.replace('~', home, 1)}/chunks/data").strip()))
    assert result["exit_code"] == 0, result
    assert sh(api, vm, f"sha256sum {home}/chunked.bin").split()[0] == hashlib.sha256(data).hexdigest()
    assert first[0] and sh(api, vm, f"stat -c %i {home}/chunked.bin").strip() == first[0]
    assert sh(api, vm, f"stat -c '%a %u %g' {home}/chunked.bin").split() == ["640", "1000", "1000"]
    assert sh(api, vm, f"ls -a {home} | grep -c slicer-upload || true").strip() == "0", "session left behind"
    # a directory as a tar, extracted only after every chunk checked out
    tree = make_tar([file_member("proj/a.txt", b"alpha"), file_member("proj/sub/b.txt", b"beta" * 50_000)])
    result, _ = chunked_copy.upload(api, vm, tree, "/tmp/chunked-tree", mode="tar", chunk_size=64 * 1024)
    assert result["exit_code"] == 0, result
    assert sh(api, vm, "cat /tmp/chunked-tree/proj/a.txt") == "alpha"
    assert sh(api, vm, "wc -c < /tmp/chunked-tree/proj/sub/b.txt").strip() == "200000"
    # one damaged chunk: refused, nothing at the destination (binary or tar), the session kept for abort
    for mode, payload, dest in (("binary", data, "/tmp/damaged.bin"), ("tar", tree, "/tmp/damaged-tree")):
        result, session = chunked_copy.upload(api, vm, payload, dest, mode=mode, chunk_size=64 * 1024, corrupt=1)
        assert result["exit_code"] == 1 and "chunk 1 does not match its SHA-256" in result["stderr"], result
        assert sh(api, vm, f"ls -d {dest} 2>/dev/null || echo absent").strip() == "absent"
        # every chunk is checked before anything is written: the session's first chunk is as it came
        assert sh(api, vm, f"head -c 65536 {session}/chunks/data | sha256sum").split()[0] == \
            hashlib.sha256(payload[:64 * 1024]).hexdigest()
        aborted = chunked_copy.helper(api, vm, "upload", "abort", "--manifest", f"{session}/manifest.json",
                                      "--uid", "0", "--gid", "0")
        assert aborted["exit_code"] == 0, aborted
        assert sh(api, vm, f"ls -d {session} 2>/dev/null || echo gone").strip() == "gone"
    # A chunk sent alone goes on the bulk port with the host's SHA-256, recorded beside it: finalise
    # does not read it. The data file changed in the guest after the chunks landed (same size,
    # its mtime set back) loses that: the chunks are read, and the changed one refused.
    other = data[65536 + 7] ^ 0xFF  # a byte that differs from the one it replaces (a fixed one matched 1 in 256)

    def tamper(session: str) -> None:
        assert sh(api, vm, f"ls {session}/chunks").split() == [f"{i:06d}.chunk.slot" for i in range(3)] + [
            "data", "data.stamp"]
        sh(api, vm, f"f={session}/chunks/data; t=$(stat -c %y $f); printf '\\{other:03o}' | "
                    f"dd of=$f bs=1 seek=$((64 * 1024 * 1024 + 7)) conv=notrunc status=none; touch -d \"$t\" $f")
    result, _ = chunked_copy.upload(api, vm, data[:3 * 65536], "/tmp/tampered.bin", chunk_size=65536,
                                    before_finalise=tamper)
    assert result["exit_code"] == 1 and "chunk 1 does not match its SHA-256" in result["stderr"], result
    result, _ = chunked_copy.upload(api, vm, data[:3 * 65536], "/tmp/untampered.bin", chunk_size=65536)
    assert result["exit_code"] == 0, result
    assert sh(api, vm, "sha256sum /tmp/untampered.bin").split()[0] == hashlib.sha256(data[:3 * 65536]).hexdigest()
    # the SDKs' own chunks (64 MiB, a slot each): the data file is the file as it lies, on the guest's tmpfs too
    big, slots = os.urandom((64 << 20) + 5), []
    result, _ = chunked_copy.upload(api, vm, big, "/tmp/slots.bin", chunk_size=64 << 20,
                                    before_finalise=lambda s: slots.append(sh(api, vm, f"stat -c %i {s}/chunks/data")))
    assert result["exit_code"] == 0, result
    assert sh(api, vm, "sha256sum /tmp/slots.bin").split()[0] == hashlib.sha256(big).hexdigest()
    assert sh(api, vm, "stat -c %i /tmp/slots.bin") == slots[0]
    # a manifest outside a session, or a hostile one, is refused with a reason
    result = chunked_copy.helper(api, vm, "upload", "finalise", "--manifest", "/etc/passwd")
    assert result["exit_code"] == 1 and "not a chunked-copy manifest" in result["stderr"], result
    session = "/tmp/.slicer-upload-" + "0" * 32
    for bad, words in (({"version": 9}, "unsupported copy manifest version"),
                       ({"version": 1, "mode": "binary", "destination": "/tmp/x", "size": 5, "chunks": []},
                        "chunk sizes total 0 bytes, expected 5")):
        chunked_copy.post_chunk(api, vm, f"{session}/manifest.json", json.dumps(bad).encode())
        result = chunked_copy.helper(api, vm, "upload", "finalise", "--manifest", f"{session}/manifest.json")
        assert result["exit_code"] == 1 and words in result["stderr"], result


def test_chunked_copy_v2_puts_things_where_cp_would(api, vm):
    """Manifest version 2 (the newest Go SDK's): a file into an existing directory keeps its name,
    to a new path it is renamed; a directory goes in under its name, or only its contents."""
    sh(api, vm, "rm -rf /tmp/v2 && mkdir -p /tmp/v2/into")
    data = os.urandom(300_000)
    result, _ = chunked_copy.upload(api, vm, data, "/tmp/v2/into", chunk_size=128 * 1024,
                                    source=("file", "tool.bin", False))
    assert result["exit_code"] == 0, result
    assert sh(api, vm, "sha256sum /tmp/v2/into/tool.bin").split()[0] == hashlib.sha256(data).hexdigest()
    # into /tmp itself, a tmpfs: the session sits at / on the disk, so its chunks cross filesystems
    result, _ = chunked_copy.upload(api, vm, data, "/tmp", chunk_size=128 * 1024, source=("file", "across.bin", False))
    assert result["exit_code"] == 0, result
    assert sh(api, vm, "sha256sum /tmp/across.bin").split()[0] == hashlib.sha256(data).hexdigest()
    assert sh(api, vm, "ls -a / | grep -c slicer-upload || true").strip() == "0", "session left behind"
    result, _ = chunked_copy.upload(api, vm, b"renamed", "/tmp/v2/new-name", source=("file", "tool.bin", False))
    assert result["exit_code"] == 0 and sh(api, vm, "cat /tmp/v2/new-name") == "renamed", result
    tree = make_tar([file_member("a.txt", b"alpha"), file_member("sub/b.txt", b"beta")])
    result, _ = chunked_copy.upload(api, vm, tree, "/tmp/v2/into", mode="tar", chunk_size=4096,
                                    source=("directory", "proj", False))
    assert result["exit_code"] == 0, result
    assert sh(api, vm, "cat /tmp/v2/into/proj/a.txt /tmp/v2/into/proj/sub/b.txt") == "alphabeta"
    result, _ = chunked_copy.upload(api, vm, tree, "/tmp/v2/into", mode="tar", source=("directory", "", True))
    assert result["exit_code"] == 0 and sh(api, vm, "cat /tmp/v2/into/a.txt") == "alpha", result
    # the SDK's own checks, made again in the guest
    for source, mode, words in ((("file", "x", True), "binary", "without copy_contents"),
                                (("directory", "d", False), "binary", "require tar mode"),
                                (("file", "../up", False), "binary", "invalid copy source name")):
        result, _ = chunked_copy.upload(api, vm, b"x", "/tmp/v2/bad", mode=mode, source=source)
        assert result["exit_code"] == 1 and words in result["stderr"], result
    assert sh(api, vm, "ls /tmp/v2").split() == ["into", "new-name"]


def test_chunked_copy_cannot_be_turned_against_root(api, vm):
    """A guest user who plants or rewrites a session cannot make the root-run helper write for it."""
    # a session a non-root user made, with a manifest aiming at /etc as root: refused (not root's)
    fake = "/tmp/.slicer-upload-" + "1" * 32
    manifest = json.dumps({"version": 1, "mode": "binary", "destination": "/etc/evil", "uid": 0, "gid": 0,
                           "size": 0, "chunks": []})
    sh(api, vm, f"rm -rf {fake}; su -s /bin/sh -c 'mkdir -p {fake}/chunks && chmod 700 {fake} && "
                f"cat > {fake}/manifest.json' ubuntu <<'EOF'\n{manifest}\nEOF")
    result = chunked_copy.helper(api, vm, "upload", "finalise", "--manifest", f"{fake}/manifest.json")
    assert result["exit_code"] == 1 and "not this upload's" in result["stderr"], result
    assert sh(api, vm, "ls /etc/evil 2>/dev/null || echo absent").strip() == "absent"
    # ... and a chunk upload into it as root is refused too (409), as into a symlink named like a session
    r = chunked_copy.post_chunk(api, vm, f"{fake}/chunks/000000.chunk", b"x")
    assert r.status_code == 409 and r.json()["code"] == "unsafe_session", r.text
    link = "/tmp/.slicer-upload-" + "2" * 32
    sh(api, vm, f"rm -rf {link}; ln -s /etc {link}")
    r = chunked_copy.post_chunk(api, vm, f"{link}/chunks/000000.chunk", b"x")
    assert r.status_code == 409 and r.json()["code"] == "unsafe_session", r.text
    assert sh(api, vm, "ls /etc/chunks 2>/dev/null || echo absent").strip() == "absent"
    # a chunk's name must be chunks/NNNNNN.chunk (its slot in the session's data file)
    for name in ("000000.chunk", "chunks/016384.chunk"):
        r = chunked_copy.post_chunk(api, vm, f"/tmp/.slicer-upload-{'5' * 32}/{name}", b"x")
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    # a session's data file the user made a link to root's file: never written through (409)
    mine = "/tmp/.slicer-upload-" + "4" * 32
    sh(api, vm, f"rm -rf {mine}; su -s /bin/sh -c 'mkdir -p {mine}/chunks && chmod 700 {mine} {mine}/chunks && "
                f"ln -s /etc/passwd {mine}/chunks/data' ubuntu")
    before = sh(api, vm, "sha256sum /etc/passwd")
    r = chunked_copy.post_chunk(api, vm, f"{mine}/chunks/000000.chunk", b"x", uid=1000)
    assert r.status_code == 409 and r.json()["code"] == "unsafe_session", r.text
    assert sh(api, vm, "sha256sum /etc/passwd") == before
    # a user's own upload: the manifest's owner must be the one finalise runs as, the destination beside
    data = b"mine"
    result, session = chunked_copy.upload(api, vm, data, "/tmp/mine.bin", uid=1000)
    assert result["exit_code"] == 0 and sh(api, vm, "stat -c %U /tmp/mine.bin").strip() == "ubuntu", result
    for manifest, words in (({"uid": 0, "gid": 0}, "are not --uid/--gid"),
                            ({"destination": "/root/elsewhere.bin"}, "is not beside its session")):
        result, _ = chunked_copy.upload(api, vm, data, "/tmp/mine.bin", uid=1000, manifest=manifest)
        assert result["exit_code"] == 1 and words in result["stderr"], result
    # a gid the user does not have (the SDK's GID 0 next to UID 1000) is refused, not handed over
    result, _ = chunked_copy.upload(api, vm, data, "/tmp/mine.bin", uid=1000, manifest={"gid": 0},
                                    finalise_gid=0)
    assert result["exit_code"] == 1 and "gid 0 is not a group of uid 1000" in result["stderr"], result
    # a directory the user cannot write: refused at the first chunk, before anything is sent
    r = chunked_copy.post_chunk(api, vm, "/opt/.slicer-upload-" + "3" * 32 + "/chunks/000000.chunk", b"x", uid=1000)
    assert r.status_code == 409 and r.json()["code"] == "permission_denied", r.text
    assert "not writable by uid 1000" in r.json()["error"], r.text
    sh(api, vm, "rm -rf /tmp/.slicer-upload-*")


def test_root_does_not_follow_a_users_links(api, vm):
    """Writes as root into a user's directory: no set-id bits inherited from a planted file, no
    symlink of the user's followed (binary or tar)."""
    sh(api, vm, "su -s /bin/sh -c 'rm -rf ~/tool ~/sub ~/proj; touch ~/tool && chmod 4755 ~/tool && "
                "ln -s /etc ~/sub && ln -s /etc ~/proj' ubuntu")
    r = api.post(f"/vm/{vm}/cp", params={"path": "/home/ubuntu/tool"}, content=b"#!/bin/sh\n")
    assert r.status_code == 200, r.text
    assert sh(api, vm, "stat -c '%a %U' /home/ubuntu/tool").split() == ["755", "root"]
    r = api.post(f"/vm/{vm}/cp", params={"path": "/home/ubuntu/sub/planted"}, content=b"x")
    assert r.status_code == 409 and r.json()["code"] == "unsafe_path", r.text
    r = api.post(f"/vm/{vm}/cp", params={"path": "/home/ubuntu/proj", "mode": "tar"},
                 content=make_tar([file_member("planted", b"x")]))
    assert r.status_code == 409 and r.json()["code"] == "unsafe_path", r.text
    assert sh(api, vm, "ls /etc/planted /etc/sub 2>/dev/null || echo absent").strip() == "absent"
    sh(api, vm, "rm -rf /home/ubuntu/tool /home/ubuntu/sub /home/ubuntu/proj")


def test_home_relative_paths(api, vm):
    """``~`` in cp and fs paths is the home of the request's uid (root's without one)."""
    r = api.post(f"/vm/{vm}/cp", params={"path": "~/tilde.txt"}, content=b"root-home")
    assert r.status_code == 200 and r.json()["path"] == "/root/tilde.txt", r.text
    assert api.get(f"/vm/{vm}/cp", params={"path": "~/tilde.txt"}).content == b"root-home"
    assert api.get(f"/vm/{vm}/fs/stat", params={"path": "~/tilde.txt"}).json()["size"] == 9
    r = api.post(f"/vm/{vm}/cp", params={"path": "relative.txt"}, content=b"x")
    assert r.status_code == 400 and "absolute or start with ~/" in r.json()["error"]
    r = api.post(f"/vm/{vm}/cp", params={"path": "~/x", "uid": "4242"}, content=b"x")
    assert r.status_code == 400 and "uid 4242 has no home directory" in r.json()["error"], r.text


def _copies(api, direction: str, via: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(api.get("/metrics").text):
        for s in family.samples:
            if s.name == "slicer_copies_total" and s.labels == {"direction": direction, "via": via}:
                return s.value
    return 0.0


def test_copies_take_the_bulk_port_and_broken_ones_spoil_nothing(api, vm):
    """A copy's bytes go on the VM's bulk port (slicer.channel.bulk), one copy per direction at a
    time: a second one meanwhile goes through the channel, but a chunk of the SDKs' chunked copy
    waits for the port a little first (BULK_WAIT). A copy broken off midway (its client gone)
    leaves nothing at its destination and nothing that spoils the next copy."""
    import concurrent.futures

    data = os.urandom(24 << 20)
    counts = {(d, v): _copies(api, d, v) for d in ("in", "out") for v in ("bulk", "channel")}
    r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/bulk.bin"}, content=data)
    assert r.status_code == 200 and r.json()["size"] == len(data), r.text
    assert _copies(api, "in", "bulk") == counts["in", "bulk"] + 1
    assert sh(api, vm, "sha256sum /tmp/bulk.bin").split()[0] == hashlib.sha256(data).hexdigest()
    with api.stream("GET", f"/vm/{vm}/cp", params={"path": "/tmp/bulk.bin"}) as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(data)
        assert hashlib.sha256(b"".join(r.iter_raw())).digest() == hashlib.sha256(data).digest()
    assert _copies(api, "out", "bulk") == counts["out", "bulk"] + 1

    def slowly(blob: bytes, pause: float):
        for at in range(0, len(blob), 1 << 20):
            time.sleep(pause)
            yield blob[at:at + (1 << 20)]

    def overlapping(first: bytes, pause: float, second: bytes, second_path: str, landed: str = "") -> None:
        """``first`` sent slowly, and ``second`` while it is under way; both land whole (``second``
        at the start of ``landed``: a chunk's slot in its session's data file)."""
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(api.post, f"/vm/{vm}/cp", params={"path": "/tmp/first.bin"},
                               content=slowly(first, pause))
            time.sleep(0.3)
            quick = api.post(f"/vm/{vm}/cp", params={"path": second_path}, content=second)
            assert quick.status_code == 200 and slow.result().status_code == 200, (quick.text, slow.result().text)
        assert sh(api, vm, f"sha256sum /tmp/first.bin; head -c {len(second)} {landed or second_path} | sha256sum"
                  ).split()[::2] == [
            hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]

    # held about 1 s: a plain copy meanwhile takes the channel at once; a chunk (BULK_WAIT is 3 s)
    # waits for the port and takes it after the first
    before = {v: _copies(api, "in", v) for v in ("bulk", "channel")}
    overlapping(os.urandom(4 << 20), 0.25, os.urandom(3 << 20), "/tmp/second.bin")
    assert (_copies(api, "in", "bulk"), _copies(api, "in", "channel")) == (before["bulk"] + 1, before["channel"] + 1)
    session = "/root/.slicer-upload-" + "ab" * 16
    overlapping(os.urandom(4 << 20), 0.25, os.urandom(3 << 20), f"{session}/chunks/000000.chunk",
                f"{session}/chunks/data")
    assert (_copies(api, "in", "bulk"), _copies(api, "in", "channel")) == (before["bulk"] + 3, before["channel"] + 1)
    sh(api, vm, f"rm -rf {session}")

    def broken(blob: bytes):
        yield blob[:3 << 20]
        raise OSError("the client goes away")

    for _ in range(2):
        with pytest.raises((httpx.HTTPError, OSError)):
            api.post(f"/vm/{vm}/cp", params={"path": "/tmp/broken.bin"}, content=broken(data))
        with api.stream("GET", f"/vm/{vm}/cp", params={"path": "/tmp/bulk.bin"}) as r:
            next(r.iter_raw())  # a download left after its first chunk
        r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/after.bin"}, content=data[:5 << 20])
        assert r.status_code == 200, r.text
        assert sh(api, vm, "sha256sum /tmp/after.bin").split()[0] == hashlib.sha256(data[:5 << 20]).hexdigest()
        with api.stream("GET", f"/vm/{vm}/cp", params={"path": "/tmp/after.bin"}) as r:
            assert hashlib.sha256(b"".join(r.iter_raw())).digest() == hashlib.sha256(data[:5 << 20]).digest()
    assert sh(api, vm, "ls /tmp/broken.bin 2>/dev/null || echo absent").strip() == "absent"
    # A copy right after a broken one may find the port still held, and take the channel; the
    # broken ones let go of it within seconds (their guest side notices its request is gone).
    for direction in ("in", "out"):
        deadline = time.monotonic() + 20
        while True:
            before = _copies(api, direction, "bulk")
            if direction == "in":
                r = api.post(f"/vm/{vm}/cp", params={"path": "/tmp/again.bin"}, content=b"x" * 1000)
                assert r.status_code == 200, r.text
            else:
                assert api.get(f"/vm/{vm}/cp", params={"path": "/tmp/again.bin"}).content == b"x" * 1000
            if _copies(api, direction, "bulk") == before + 1 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert _copies(api, direction, "bulk") == before + 1, f"the bulk port ({direction}) stays held"
