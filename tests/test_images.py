"""Users' OCI images end to end: a real registry on loopback, images made here (busybox only;
Debian minbase without Python), real VMs booting them with the agent from our runtime disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from slicer.client import SlicerClient
from slicer.net import buildns
from tests import chunked_copy
from tests.conftest import IMAGE_DATA_DIR, Daemon, free_port, wait_agent
from tests.oci_images import (
    Registry,
    busybox_root,
    debian_root,
    kernel_root,
    pack,
    sparse_image,
    systemd_root,
    zeros_image,
)

pytestmark = pytest.mark.vm

CONFIG = """
config:
  host_groups:
  - name: bb
    count: 1
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
    image: BB_REF
  - name: deb
    count: 0
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
    image: DEB_REF
  - name: sysd
    count: 0
    vcpu: 1
    ram_mb: 512
    storage_size: 2G
    image: SYSTEMD_REF
    init: image
    boot: cold
  - name: tiny
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 40M
    image: BB_REF
  - name: broken
    count: 1
    vcpu: 1
    ram_mb: 256
    image: MISSING_REF
  - name: vm
    count: 0
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth:
      enabled: true
"""


@pytest.fixture(scope="module")
def refs(guest_image):
    """The registry with the test images: busybox, Debian minbase, and one for arm64."""
    registry = Registry()
    work = Path(tempfile.mkdtemp(prefix="slt-oci-"))
    try:
        bb = pack(busybox_root(work / "bb-root"), work, "bb")
        deb = pack(debian_root(work / "deb-root", guest_image), work, "deb", cmd="/bin/bash")
        arm = pack(work / "bb-root", work, "arm", arch="arm64")
        (work / "bb-root/etc/motd").write_text("extra\n")
        pack(work / "bb-root", work, "extra")  # pulled from the layout by the CLI test only
        systemd = pack(systemd_root(work / "systemd-root"), work, "systemd", cmd="/sbin/init")
        shutil.rmtree(work / "systemd-root")
        kernel = pack(kernel_root(work / "kernel-root", guest_image), work, "kernel")
        no_blk = pack(kernel_root(work / "kernel-noblk", guest_image, leave_out="virtio_blk"), work, "noblk")
        hostile = pack(work / "bb-root", work, "hostile")
        subprocess.run(["umoci", "raw", "add-layer", "--image", hostile, str(hostile_layer(work))], check=True)
        zeros = zeros_image(work, "zeros", 3 << 30)
        sparse = sparse_image(work, "sparse", 3 << 30)
        yield {"bb": registry.push(bb, "test/busybox:1"), "zeros": registry.push(zeros, "test/zeros:1"),
               "sparse": registry.push(sparse, "test/sparse:1"),
               "hostile": registry.push(hostile, "test/hostile:1"), "deb": registry.push(deb, "test/debian:minbase"),
               "arm": registry.push(arm, "test/busybox-arm:1"), "registry": registry.address,
               "systemd": registry.push(systemd, "test/systemd:1"),
               "kernel": registry.push(kernel, "test/kernel:1"), "kernel_noblk": registry.push(no_blk, "test/kernel:2"),
               "layout": str(work / "layout")}
    finally:
        registry.close()
        shutil.rmtree(work, ignore_errors=True)


ESCAPES = ("/var/tmp/slicer-escape-dotdot", "/var/tmp/slicer-escape-link/through")


def hostile_layer(work: Path) -> Path:
    """A layer that tries to write outside the root: a ``..`` path, and a file through an
    absolute symlink to the host's /var/tmp (not /tmp: a guest's /tmp is a tmpfs)."""
    path = work / "hostile.tar"
    with tarfile.open(path, "w") as tf:
        data = b"escaped\n"
        for name in ("../../../.." + ESCAPES[0], "var/tmp/slicer-escape-link"):
            info = tarfile.TarInfo(name)
            if name.endswith("link"):
                info.type, info.linkname = tarfile.SYMTYPE, "/var/tmp"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("var/tmp/slicer-escape-link/through")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def own_cache_dir() -> Path:
    """A data directory with an image cache of its own (the project's image shared as usual)."""
    data_dir = Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp"))
    (data_dir / "images").mkdir()
    (data_dir / "images/current").symlink_to((IMAGE_DATA_DIR / "images/current").resolve())
    return data_dir


def image_daemon(refs: dict) -> Daemon:
    data_dir = own_cache_dir()
    config = CONFIG.replace("BB_REF", refs["bb"]).replace("DEB_REF", refs["deb"])
    config = config.replace("SYSTEMD_REF", refs["systemd"])
    config = config.replace("MISSING_REF", f"{refs['registry']}/test/missing:1")
    return Daemon(config, data_dir)


@pytest.fixture(scope="module")
def daemon_(refs):
    d = image_daemon(refs).start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def client(daemon_):
    with SlicerClient(daemon_.url, token=daemon_.token) as c:
        yield c


def run(client: SlicerClient, host: str, cmd: str, **kw) -> str:
    result = client.exec(host, cmd, **kw)
    assert result.exit_code == 0, (cmd, result)
    return result.stdout


def shell_echo(client: SlicerClient, host: str) -> str:
    """Run ``echo`` in an interactive shell on a PTY; returns what came back."""
    with client.shell(host) as ws:
        ws.send(struct.pack(">BI", 1, 20) + b"echo SHELL-$((6*7))\n")
        out = b""
        while b"SHELL-42" not in out:
            msg = ws.recv(timeout=60)
            if msg[0] == 1:
                out += msg[5:]
        ws.send(struct.pack(">BI", 1, 5) + b"exit\n")
    return out.decode(errors="replace")


def forward_echo(client: SlicerClient, host: str) -> str:
    """One TCP connection through ``/vm/{h}/forward`` to a one-shot echo server in the guest
    (busybox's nc: the image's, or for an image without it the runtime's)."""
    has_busybox = client.exec(host, "test -x /bin/busybox").exit_code == 0
    busybox = "/bin/busybox" if has_busybox else "/run/slicer/rt/opt/slicer/bin/busybox"
    client.exec_background(host, f"{busybox} nc -l -p 18080 -e /bin/cat")
    for _ in range(50):
        try:
            ws = client.forward(host, "127.0.0.1:18080")
        except Exception:
            time.sleep(0.2)  # the server is not listening yet
            continue
        with ws:
            ws.send(b"forwarded\n")
            got = b""
            while b"\n" not in got:
                got += ws.recv(timeout=30)
            return got.decode()
    raise AssertionError(f"no forward to {host}:18080")


def check_managed(client: SlicerClient, host: str, tmp_path: Path) -> None:
    """Everything the agent does, in an image that brings none of what it needs."""
    assert run(client, host, "echo $((6*7))") == "42\n"
    assert client.exec(host, "test -e /usr/bin/python3").exit_code == 1  # no Python in the image
    assert run(client, host, "id -u", uid=1000) == "1000\n"
    # files: one file in and out, a tree in and out, fs operations
    payload = os.urandom(300_000)
    client.upload(host, payload, "/tmp/blob")
    assert client.download(host, "/tmp/blob") == payload
    assert run(client, host, "wc -c < /tmp/blob").strip() == "300000"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/a.txt").write_text("alpha\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tree, arcname=".")
    client.upload(host, buf.getvalue(), "/srv/tree", tar=True)
    assert run(client, host, "cat /srv/tree/sub/a.txt") == "alpha\n"
    out = tmp_path / "out"
    out.mkdir()
    client.download(host, "/srv/tree", out, tar=True)
    assert (out / "tree/sub/a.txt").read_text() == "alpha\n"
    client.mkdir(host, "/srv/made/deep", recursive=True)
    assert "deep" in [e["name"] for e in client.readdir(host, "/srv/made")]
    assert client.stat(host, "/tmp/blob")["size"] == 300_000
    # an interactive shell on a PTY, the image's own shell (or ours if it has none)
    assert "SHELL-42" in shell_echo(client, host)
    # a port forward to a server of the image's (nc, from busybox or Debian's bash /dev/tcp echo)
    assert "forwarded" in forward_echo(client, host)
    # stats and health come from the agent
    stats = client.stats(host)
    assert stats.error is None and stats.snapshot and stats.snapshot["totalMemory"] > 0, stats
    assert client.health(host).hostname == host


def test_busybox_image_boots_and_is_managed(client, daemon_, refs, tmp_path):
    with daemon_.client() as api:
        wait_agent(api, "bb-1")
    check_managed(client, "bb-1", tmp_path)
    assert run(client, "bb-1", "cat /etc/motd") == "busybox test image\n"
    assert run(client, "bb-1", "readlink /bin/sh") == "busybox\n"
    # the runtime disk (read-only) carries the agent byte-compiled for the guest's paths: flags 3, checked-hash
    pyc = "/run/slicer/rt/opt/slicer/slicer/agent/__pycache__/demux.cpython-3*.pyc"
    assert run(client, "bb-1", f"od -An -tu4 -N8 {pyc}").split()[1] == "3"
    # the SDKs' chunked copy: the image has no /usr/local/bin/slicer-agent; the runtime's answers
    payload = os.urandom(250_000)
    with daemon_.client() as api:
        result, _ = chunked_copy.upload(api, "bb-1", payload, "/srv/chunked.bin", chunk_size=100_000)
    assert result["exit_code"] == 0, result
    assert run(client, "bb-1", "sha256sum /srv/chunked.bin").split()[0] == hashlib.sha256(payload).hexdigest()
    assert client.exec("bb-1", "test -e /usr/local/bin/slicer-agent").exit_code == 1  # nothing added to the image
    # secrets reach it like any VM
    client.create_secret("img-secret", b"s3cret")
    try:
        assert run(client, "bb-1", "for i in $(seq 1 100); do [ -s /run/slicer/secrets/img-secret ] && break; "
                                   "sleep 0.2; done; cat /run/slicer/secrets/img-secret") == "s3cret"
    finally:
        client.delete_secret("img-secret")
    with daemon_.client() as api:
        vm = api.get("/vm/bb-1").json()
        assert vm["image"] == refs["bb"]
        info = api.get("/info").json()
        assert info["group_images"]["bb"] == refs["bb"]


def test_sandbox_of_an_image_with_userdata(client):
    """A sandbox of the busybox group: restored from that image's own template, userdata run
    by the image's sh."""
    node = client.create_node("bb", wait="userdata", timeout="5m", userdata="echo ran-$((1+1)) > /root/ud\n")
    try:
        assert run(client, node.hostname, "cat /root/ud") == "ran-2\n"
        assert run(client, node.hostname, "hostname") == f"{node.hostname}\n"
    finally:
        client.delete_node("bb", node.hostname)


def test_debian_image_without_python(client, tmp_path):
    node = client.create_node("deb", wait="agent", timeout="5m")
    try:
        check_managed(client, node.hostname, tmp_path)
        assert run(client, node.hostname, "echo $BASH_VERSION").startswith("5.")  # the image's bash
        assert "Debian" in run(client, node.hostname, "cat /etc/os-release")
    finally:
        client.delete_node("deb", node.hostname)


def test_disk_image_per_create(client, refs):
    node = client.create_node("vm", wait="agent", timeout="5m", disk_image=refs["bb"])
    try:
        assert run(client, node.hostname, "cat /etc/motd") == "busybox test image\n"
    finally:
        client.delete_node("vm", node.hostname)
    node = client.create_node("vm", wait="agent", timeout="5m")  # the group's own: the project's image
    try:
        assert run(client, node.hostname, "test -x /usr/bin/python3 && echo project") == "project\n"
    finally:
        client.delete_node("vm", node.hostname)


def test_bad_images_are_clear_errors_and_other_groups_go_on(daemon_, refs):
    with daemon_.client() as api:
        info = api.get("/info").json()
        assert "test/missing:1" in info["group_images"]["broken"]["error"]
        r = api.post("/hostgroup/broken/nodes", json={})
        assert r.status_code == 503 and r.json()["code"] == "image_unavailable", r.text
        assert "broken" in r.json()["error"] and "missing" in r.json()["error"]
        assert not [n for n in api.get("/nodes").json() if n["hostgroup"] == "broken"]
        r = api.post("/hostgroup/vm/nodes", json={"disk_image": f"{refs['registry']}/test/nope:2"})
        assert r.status_code == 502 and "test/nope:2" in r.json()["error"], r.text
        r = api.post("/hostgroup/vm/nodes", json={"disk_image": refs["arm"]})
        assert r.status_code == 400 and r.json()["code"] == "wrong_architecture", r.text
        assert "arm64" in r.json()["error"]
        r = api.post("/hostgroup/vm/nodes", json={"disk_image": "../../etc/passwd"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_image", r.text
        for bad, code in ((f"sha256:{'a' * 64}/../../../tmp/x", "invalid_image"),  # a digest is a digest
                          ("oci:/etc:x", "invalid_image"),  # no host files from the API
                          ("nosuchname:1", "image_not_found")):  # a short name is never Docker Hub's
            r = api.post("/hostgroup/vm/nodes", json={"disk_image": bad})
            assert r.status_code in (400, 404) and r.json()["code"] == code, (bad, r.text)
        r = api.post("/hostgroup/vm/nodes", json={"disk_image": "127.0.0.1:1/refused:1"})  # nothing listens
        assert r.status_code == 502, r.text
        assert api.get("/healthz").status_code == 200
        r = api.post("/hostgroup/tiny/nodes", json={})
        assert r.status_code == 503 and "storage_size 40M" in r.json()["error"], r.text
        r = api.post("/hostgroup/tiny/nodes", json={"disk_image": refs["deb"]})
        assert r.status_code == 400 and r.json()["code"] == "image_too_large", r.text
        # a layer writing outside the root: kept inside it (umoci), nothing on the host
        r = api.post("/hostgroup/vm/nodes", params={"wait": "agent", "timeout": "4m"},
                     json={"disk_image": refs["hostile"]})
        assert r.status_code == 201, r.text
        h = r.json()["hostname"]
        try:
            for escape in ESCAPES:
                assert not os.path.lexists(escape)
            out = api.post(f"/vm/{h}/exec", params={"cmd": "cat /var/tmp/slicer-escape-dotdot /var/tmp/through && "
                                                           "readlink /var/tmp/slicer-escape-link",
                                                    "buffered": "true"}).json()
            assert out["stdout"] == "escaped\nescaped\n/var/tmp\n", out  # all of it inside the image
        finally:
            api.delete(f"/hostgroup/vm/nodes/{h}")
    # a corrupt layer: refused with the cause, nothing cached
    corrupt = Path(refs["layout"]).parent / "corrupt"
    shutil.copytree(refs["layout"], corrupt)
    index = json.loads((corrupt / "index.json").read_text())
    manifest = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "extra")
    layers = json.loads((corrupt / "blobs" / manifest["digest"].replace(":", "/")).read_text())["layers"]
    blob = corrupt / "blobs" / layers[0]["digest"].replace(":", "/")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    env = {**os.environ, "SLICER_DATA_DIR": str(daemon_.data_dir)}
    bad = subprocess.run([sys.executable, "-m", "slicer", "image", "pull", f"oci:{corrupt}:extra"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Digest did not match" in bad.stderr and f"oci:{corrupt}:extra" in bad.stderr
    shutil.rmtree(corrupt)
    # nothing half-written in the cache
    oci = daemon_.data_dir / "images/oci"
    assert not list(oci.glob(".pull-*"))
    assert all((d / "meta.json").exists() and (d / "rootfs.ext4").exists() for d in oci.glob("sha256-*"))


def test_layer_bomb_is_refused_while_it_unpacks(daemon_, refs):
    """A small layer holding 3 GiB of zeros (plain, and as a sparse file): refused with 400
    ``image_too_large`` naming the group's storage_size, before the data disk grows by more
    than the layer; nothing left in the cache."""
    from slicer.image.bounds import disk_usage

    oci = daemon_.data_dir / "images/oci"
    before = disk_usage(daemon_.data_dir)
    images = {d.name for d in oci.glob("sha256-*")}
    with daemon_.client() as api:
        for name in ("zeros", "sparse"):
            r = api.post("/hostgroup/tiny/nodes", json={"disk_image": refs[name]})
            assert r.status_code == 400 and r.json()["code"] == "image_too_large", r.text
            assert "host group tiny's storage_size 40M" in r.json()["error"], r.text
            r = api.post("/hostgroup/vm/nodes", json={"disk_image": refs[name]})  # 2G: still not 3 GiB
            assert r.status_code == 400 and "storage_size 2G" in r.json()["error"], r.text
        assert api.get("/healthz").status_code == 200
    assert disk_usage(daemon_.data_dir) - before < 64 << 20
    assert not list(oci.glob(".pull-*")) and {d.name for d in oci.glob("sha256-*")} == images


def test_cache_is_reused_and_managed_from_the_cli(daemon_, refs):
    """A restart does not pull again; ``slicer image list|pull|rm`` show and manage the cache."""
    daemon_.stop()
    log_before = daemon_.log_path.read_text()
    daemon_.start()
    with daemon_.client() as api:
        wait_agent(api, "bb-1")
    new = daemon_.log_path.read_text()[len(log_before):]
    assert f"pulling {refs['bb']}" not in new and "boots image" in new
    assert f"pulling {refs['bb']}" in log_before
    cli = [sys.executable, "-m", "slicer", "image"]
    env = {**os.environ, "SLICER_DATA_DIR": str(daemon_.data_dir)}
    listed = image_list(cli, env)
    assert {refs["bb"], refs["deb"]} <= {r for i in listed for r in i["refs"]}
    assert all(i["size_bytes"] > 0 for i in listed)
    busy = subprocess.run([*cli, "rm", refs["bb"]], env=env, capture_output=True, text=True)
    assert busy.returncode == 1 and "in use" in busy.stderr  # bb-1 boots it
    busy = subprocess.run([*cli, "rm", refs["deb"]], env=env, capture_output=True, text=True)
    assert busy.returncode == 1 and "in use" in busy.stderr  # the deb group's template is made of it
    refused = subprocess.run([*cli, "pull", f"oci:{refs['layout']}:arm"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "arm64" in refused.stderr
    again = subprocess.run([*cli, "pull", refs["bb"]], env=env, capture_output=True, text=True,
                           check=True)
    assert again.stdout.strip() == next(i["digest"] for i in listed if refs["bb"] in i["refs"])
    extra = f"oci:{refs['layout']}:extra"  # from a local OCI layout: no registry
    subprocess.run([*cli, "pull", extra], env=env, capture_output=True, text=True, check=True)
    assert extra in {r for i in image_list(cli, env) for r in i["refs"]}
    gone = subprocess.run([*cli, "rm", extra], env=env, capture_output=True, text=True)
    assert gone.returncode == 0, gone.stderr
    assert extra not in {r for i in image_list(cli, env) for r in i["refs"]}
    pruned = subprocess.run([*cli, "prune"], env=env, capture_output=True, text=True, check=True).stdout
    left = {r for i in image_list(cli, env) for r in i["refs"]}
    assert refs["bb"] in left and refs["deb"] in left  # bb-1 and the deb template use them
    assert refs["hostile"] not in left and refs["hostile"] in pruned  # its VM was deleted
    assert not list((daemon_.data_dir / "images/oci").glob(".pull-*"))


def image_list(cli: list[str], env: dict) -> list[dict]:
    return json.loads(subprocess.run([*cli, "list", "--json"], env=env, capture_output=True, text=True,
                                     check=True).stdout)


def test_dockerfile_build_then_a_vm_of_it(daemon_, client, refs, tmp_path):
    """``slicer image build -f Dockerfile -t NAME``: buildah, FROM the project's base and FROM a
    registry's image; the result boots as ``disk_image: NAME`` with no registry involved."""
    env = {**os.environ, "SLICER_DATA_DIR": str(daemon_.data_dir)}
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hello.txt").write_text("hello from the context\n")
    (ctx / "Dockerfile").write_text("FROM slicer/base\nRUN echo built-by-buildah > /etc/built\n"
                                    "COPY hello.txt /opt/app/hello.txt\n")
    build = subprocess.run([sys.executable, "-m", "slicer", "image", "build", "-f", str(ctx / "Dockerfile"),
                            "-t", "app:1", str(ctx)], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "STEP" in build.stderr and build.stdout.startswith("sha256:")  # buildah's output streamed
    (ctx / "Dockerfile.bb").write_text(f"FROM {refs['bb']}\nRUN echo on-busybox > /etc/built\n")
    build = subprocess.run([sys.executable, "-m", "slicer", "image", "build", "-f",
                            str(ctx / "Dockerfile.bb"), "-t", "bb-app:1", str(ctx)], env=env, capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    for name, built, has_python in (("app:1", "built-by-buildah", True), ("bb-app:1", "on-busybox", False)):
        node = client.create_node("vm", wait="agent", timeout="5m", disk_image=name)
        try:
            assert run(client, node.hostname, "cat /etc/built") == built + "\n"
            assert client.exec(node.hostname, "test -x /usr/bin/python3").exit_code == (0 if has_python else 1)
        finally:
            client.delete_node("vm", node.hostname)
    bad = subprocess.run([sys.executable, "-m", "slicer", "image", "build", "-f", str(ctx / "Dockerfile.bad"),
                          "-t", "bad:1", str(ctx)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "Dockerfile.bad" in bad.stderr
    (ctx / "Dockerfile.fail").write_text("FROM slicer/base\nRUN exit 3\n")
    bad = subprocess.run([sys.executable, "-m", "slicer", "image", "build", "-f", str(ctx / "Dockerfile.fail"),
                          "-t", "fail:1", str(ctx)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot build fail:1" in bad.stderr
    assert "fail:1" not in {r for i in image_list([sys.executable, "-m", "slicer", "image"], env) for r in i["refs"]}
    # CVE-2024-1753's shape: a stage whose symlink points at /, bind-mounted read-write by a RUN step
    # (Debian's buildah 1.28 would mount the host's root); RUN flags are refused before buildah runs
    victim = tmp_path / "host-file"
    victim.write_text("untouched\n")
    (ctx / "Dockerfile.mount").write_text(
        "FROM slicer/base AS link\nRUN ln -s / /rootlink\nFROM slicer/base\n"
        f"RUN --mount=type=bind,from=link,source=/rootlink,target=/host,rw \\\n    echo owned > /host{victim}\n")
    bad = subprocess.run([sys.executable, "-m", "slicer", "image", "build", "-f", str(ctx / "Dockerfile.mount"),
                          "-t", "mount:1", str(ctx)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "RUN --mount is refused" in bad.stderr, bad.stderr[-2000:]
    assert victim.read_text() == "untouched\n"


# What a build step must never hold: Docker's default capabilities are the most a container gets.
DOCKER_CAPS = {0: "CHOWN", 1: "DAC_OVERRIDE", 3: "FOWNER", 4: "FSETID", 5: "KILL", 6: "SETGID", 7: "SETUID",
               8: "SETPCAP", 10: "NET_BIND_SERVICE", 13: "NET_RAW", 18: "SYS_CHROOT", 27: "MKNOD",
               29: "AUDIT_WRITE", 31: "SETFCAP"}
BUILD_UP, BUILD_HOST, METADATA = "198.51.100.20", "198.51.100.21", "169.254.169.254"
PEER_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(16)
while True:
    c, a = s.accept()
    with c:
        c.settimeout(5)
        try:
            c.recv(100)
            c.sendall(f"peer-{a[0]}\\n".encode())
        except OSError:
            pass
"""
PROBE = ('probe() { r=$(timeout 10 bash -c "exec 3<>/dev/tcp/$2/$3 && echo hi >&3 && head -n1 <&3" 2>/dev/null); '
         'echo "@reach_$1=${r:-none}@"; }')


class BuildOutside:
    """The outside world of a build test: a namespace on documentation addresses, routed as the
    session's default route, answering each TCP connection with the peer's address, plus DNS
    (``upstream.test``) and HTTP (port 8000); and 169.254.169.254 behind it, reachable from the
    host like a cloud's metadata service. Also services of the host's own: TCP on every local
    address, HTTP on loopback."""

    def __init__(self) -> None:
        import socket
        import threading

        self.ns = f"slt-bup-{os.getpid()}"
        self.veth = f"sltb{os.getpid() % 100000}"
        sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        self.dir = Path(tempfile.mkdtemp(prefix="slt-bup-"))
        (self.dir / "up").mkdir()
        (self.dir / "up/hello.txt").write_text("fetched-from-upstream\n")
        (self.dir / "host").mkdir()
        (self.dir / "host/secret").write_text("host-secret\n")
        sh("ip", "netns", "add", self.ns)
        self.procs: list[subprocess.Popen] = []
        try:
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            sh("ip", "addr", "add", f"{BUILD_HOST}/24", "dev", self.veth)
            sh("ip", "link", "set", self.veth, "up")
            for cmd in (f"addr add {BUILD_UP}/24 dev eth0", "link set eth0 up", "link set lo up",
                        f"addr add {METADATA}/32 dev lo"):
                sh("ip", "-n", self.ns, *cmd.split())
            sh("ip", "route", "replace", "default", "via", BUILD_UP)
            sh("ip", "route", "replace", METADATA, "via", BUILD_UP)
            ns_exec = ["ip", "netns", "exec", self.ns]
            self.procs = [
                subprocess.Popen([*ns_exec, sys.executable, "-c", PEER_SERVER]),
                subprocess.Popen([*ns_exec, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                                  f"--listen-address={BUILD_UP}", f"--address=/upstream.test/{BUILD_UP}",
                                  "--user=root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                subprocess.Popen([*ns_exec, sys.executable, "-m", "http.server", "8000", "--directory",
                                  str(self.dir / "up")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            ]
            self.http_port = free_port()
            self.http_log = open(self.dir / "host-http.log", "wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "http.server", str(self.http_port), "--bind", "127.0.0.1", "--directory",
                 str(self.dir / "host")], stdout=self.http_log, stderr=self.http_log))
        except BaseException:
            self.close()
            raise
        self.host = socket.socket()
        self.host.bind(("0.0.0.0", 0))
        self.host.listen(16)
        self.port = self.host.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.host.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"host-ok\n")

    def ask(self, address: str, port: int = 8080) -> str:
        """What a server says to the host (the test process) at ``address``."""
        import socket

        for _ in range(100):  # it may still be starting
            try:
                with socket.create_connection((address, port), timeout=5) as c:
                    c.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n" if port != 8080 else b"hi\n")
                    return c.makefile().readline().strip()
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the test's server at {address}:{port} does not answer")

    def host_requests(self) -> str:
        return (self.dir / "host-http.log").read_text(errors="replace")

    def close(self) -> None:
        if hasattr(self, "host"):
            self.host.close()
        for p in self.procs:
            p.kill()
            p.wait()
        for cmd in (["ip", "route", "del", METADATA], ["ip", "route", "del", "default", "via", BUILD_UP],
                    ["ip", "netns", "del", self.ns], ["ip", "link", "del", self.veth]):
            subprocess.run(cmd, capture_output=True)
        if hasattr(self, "http_log"):
            self.http_log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def build_leftovers() -> list[str]:
    """Build namespaces, veths and nftables tables that exist now (none once a build is over)."""
    netns = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith("slicer-build-")]
    links = [i["ifname"] for i in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                            text=True).stdout)
             if i["ifname"].startswith(buildns.VETH_PREFIX)]
    tables = [t for t in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.splitlines()
              if "slicer_build_" in t]
    return netns + links + tables


def test_dockerfile_run_steps_are_isolated(guest_image, tmp_path):
    """A Dockerfile's ``RUN`` is someone else's code: it gets its own PID, IPC, UTS, mount and
    network namespaces, no capability beyond a container's, cannot signal the host's processes,
    reaches nothing of the host's (loopback, its addresses) nor link-local addresses, and reaches
    the outside through NAT, names resolved by the nameserver given with ``--dns``. The build's
    namespace, veth and nftables table are gone afterwards, also after a failing build."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(IMAGE_DATA_DIR / "images")
    env = {**os.environ, "SLICER_DATA_DIR": str(data)}
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    outside = BuildOutside()
    sentinel = subprocess.Popen(["sleep", "infinity"])
    cli = [sys.executable, "-m", "slicer", "image"]
    try:
        assert outside.ask(BUILD_UP) == f"peer-{BUILD_HOST}"
        assert outside.ask(METADATA) == f"peer-{BUILD_HOST}"  # the host reaches it; a build must not
        assert outside.ask(BUILD_UP, 8000).startswith("HTTP/1.0 200")
        assert outside.ask("127.0.0.1", outside.http_port).startswith("HTTP/1.0 404")
        port = outside.port
        (ctx / "Dockerfile").write_text(f"""FROM slicer/base
RUN kill -9 -1 2>&1; echo "@killed=$?@"
ADD http://upstream.test:8000/hello.txt /hello.txt
RUN echo "@added=$(cat /hello.txt)@"
RUN echo "@comm=$(cat /proc/1/comm)@"; echo "@pids=$(cd /proc && echo [0-9]*)@"; \\
    for n in net pid ipc uts mnt cgroup; do echo "@ns_$n=$(readlink /proc/self/ns/$n)@"; done; \\
    echo "@capeff=$(grep CapEff /proc/self/status | cut -f2)@"; \\
    echo "@seccomp=$(grep '^Seccomp:' /proc/self/status | cut -f2)@"
RUN {PROBE}; gw=$(ip route show default | cut -d' ' -f3); \\
    probe loopback 127.0.0.1 {port} & probe gateway "$gw" {port} & probe host {BUILD_HOST} {port} & \\
    probe metadata {METADATA} 8080 & probe egress {BUILD_UP} 8080 & probe byname upstream.test 8080 & wait
""")
        build = subprocess.run([*cli, "build", "-f", str(ctx / "Dockerfile"), "--dns", BUILD_UP, "-t", "isolated:1",
                                str(ctx)], env=env, capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        said = dict(re.findall(r"@(\w+)=([^@\n]*)@", build.stderr))
        assert sentinel.poll() is None  # kill -9 -1 reached nothing of the host's
        assert "killed" in said, build.stderr[-3000:]
        assert said["comm"] != Path("/proc/1/comm").read_text().strip()  # not the host's init
        assert len(said["pids"].split()) < 5  # the step's own processes only
        for n in ("net", "pid", "ipc", "uts", "mnt", "cgroup"):
            assert said[f"ns_{n}"] != os.readlink(f"/proc/self/ns/{n}"), n
        caps = int(said["capeff"], 16)
        assert caps and not caps & (1 << 21)  # no CAP_SYS_ADMIN
        assert {b for b in range(64) if caps >> b & 1} <= set(DOCKER_CAPS), hex(caps)
        assert said["seccomp"] == "2"  # a seccomp filter, as in a container
        assert said["reach_loopback"] == said["reach_gateway"] == said["reach_host"] == "none"
        assert said["reach_metadata"] == "none"
        assert said["reach_egress"] == said["reach_byname"] == f"peer-{BUILD_HOST}"  # NAT: the host's address
        assert said["added"] == "fetched-from-upstream"  # buildah's own fetches: by name, through NAT
        assert build_leftovers() == []
        # ADD <url> is fetched by buildah, which runs in the build's namespace too
        (ctx / "Dockerfile.add").write_text(f"FROM slicer/base\nADD http://127.0.0.1:{outside.http_port}/secret /s\n")
        add = subprocess.run([*cli, "build", "-f", str(ctx / "Dockerfile.add"), "-t", "isolated-add:1", str(ctx)],
                             env=env, capture_output=True, text=True)
        assert add.returncode == 1 and "cannot build isolated-add:1" in add.stderr
        assert "/secret" not in outside.host_requests()
        assert build_leftovers() == []
        (ctx / "Dockerfile.fail").write_text("FROM slicer/base\nRUN exit 3\n")
        bad = subprocess.run([*cli, "build", "-f", str(ctx / "Dockerfile.fail"), "-t", "isolated-fail:1", str(ctx)],
                             env=env, capture_output=True, text=True)
        assert bad.returncode == 1 and "cannot build isolated-fail:1" in bad.stderr
        assert build_leftovers() == []
    finally:
        sentinel.kill()
        sentinel.wait()
        outside.close()
        subprocess.run([*cli, "rm", "isolated:1"], env=env, capture_output=True)


KERNEL_CONFIG = """
config:
  insecure_registry: true
  KERNEL
  host_groups:
  - name: bb
    count: 1
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
    image: BB_REF
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth:
      enabled: true
"""


def kernel_daemon(refs: dict, kernel_line: str) -> Daemon:
    return Daemon(KERNEL_CONFIG.replace("KERNEL", kernel_line).replace("BB_REF", refs["bb"]), own_cache_dir())


def test_kernel_from_an_image_and_from_a_file(refs, guest_image):
    """``kernel_image``: the kernel and its modules from an OCI image (an initramfs is built from
    them); without a module the guest needs, a clear error and no VM; ``kernel_file``: a path."""
    d = kernel_daemon(refs, f"kernel_image: {refs['kernel']}").start()
    try:
        with d.client() as api:
            wait_agent(api, "bb-1")
            info = api.get("/info").json()
            assert refs["kernel"] in info["kernel"]
            r = api.post("/vm/bb-1/exec", params={"cmd": "uname -r", "buffered": "true"})
            version = json.loads((guest_image / "manifest.json").read_text())["kernel_package"]
            assert r.json()["stdout"].strip() == version.removeprefix("linux-image-")  # the image's kernel
        kernels = list((d.data_dir / "images/oci").glob("kernel-*/initrd.img"))
        assert len(kernels) == 1  # built from the image's modules, cached
    finally:
        d.cleanup()
    d = kernel_daemon(refs, f"kernel_image: {refs['kernel_noblk']}").start()
    try:
        with d.client() as api:
            info = api.get("/info").json()
            assert "virtio_blk" in info["group_images"]["bb"]["error"]
            r = api.post("/hostgroup/bb/nodes", json={})
            assert r.status_code == 503 and "virtio_blk" in r.json()["error"], r.text
            assert api.get("/nodes").json() == []
    finally:
        d.cleanup()
    copy = Path(tempfile.mkdtemp(prefix="slt-kernel-")) / "vmlinuz"
    shutil.copy2(guest_image / "vmlinuz", copy)
    d = kernel_daemon(refs, f"kernel_file: {copy}").start()
    try:
        with d.client() as api:
            wait_agent(api, "bb-1")
            assert api.get("/info").json()["kernel"] == str(copy)
    finally:
        d.cleanup()
        shutil.rmtree(copy.parent)


def test_image_with_its_own_init(daemon_, client, tmp_path):
    """``init: image``: systemd is PID 1, our agent one of its services; the API's shutdown is
    systemd's orderly power-off."""
    node = client.create_node("sysd", wait="agent", timeout="6m")
    h = node.hostname
    assert run(client, h, "cat /proc/1/comm") == "systemd\n"
    assert run(client, h, "systemctl show -p ActiveState --value slicer-agent.service") == "active\n"
    assert run(client, h, "hostname") == f"{h}\n"
    client.upload(h, b"under systemd\n", "/root/f")
    assert client.download(h, "/root/f") == b"under systemd\n"
    assert "SHELL-42" in shell_echo(client, h)
    with daemon_.client() as api:
        r = api.post(f"/vm/{h}/shutdown", params={"action": "shutdown"})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while api.get(f"/vm/{h}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(1)
        assert api.get(f"/vm/{h}").status_code == 404  # a sandbox goes with its shutdown
    assert f"{h}: guest did not power off" not in daemon_.log_path.read_text()  # systemd powered it off
