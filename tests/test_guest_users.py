"""A guest user against the agent (root in the guest): links and directories the user controls
must not steer root's file operations (409 ``unsafe_path``), a request naming a ``uid`` works
with that user's rights, and exec/shell with a ``uid`` get that user's groups and identity.

Every attack is made as the real non-root guest user ``ubuntu`` (uid 1000)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import threading
import time

import pytest

from slicer.client import SlicerClient
from tests.conftest import wait_agent

pytestmark = pytest.mark.vm
SECRET = "TOPSECRET-7c1e"
HOME = "/home/ubuntu"


@pytest.fixture(scope="module")
def vm(api) -> str:
    wait_agent(api, "vm-1")
    sh(api, "vm-1", f"printf {SECRET} > /root/secret.txt && chmod 600 /root/secret.txt && "
                    "mkdir -p /srv/victim && echo keep > /srv/victim/file")
    return "vm-1"


def sh(api, vm, cmd: str) -> str:
    r = api.post(f"/vm/{vm}/exec", params={"cmd": cmd, "buffered": "true"})
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def as_user(api, vm, cmd: str) -> str:
    """``cmd`` run by the guest user ``ubuntu`` itself (su), in its home."""
    return sh(api, vm, f"su -s /bin/sh -c 'cd && {cmd}' ubuntu")


def refused(r) -> None:
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["code"] == "unsafe_path" and "symlink of uid 1000" in body["error"], body
    assert SECRET not in r.text


def victim_intact(api, vm) -> None:
    assert sh(api, vm, "cat /srv/victim/file; ls /srv").split() == ["keep", "victim"]


def test_cp_out_does_not_follow_a_users_link(api, vm):
    as_user(api, vm, "rm -rf out ws tree mine.txt mine && ln -s /root/secret.txt out && ln -s /root ws && "
                     "mkdir tree && ln -s /root/secret.txt tree/link && echo own > mine.txt && ln -s mine.txt mine")
    for params in ({"path": f"{HOME}/out"}, {"path": f"{HOME}/ws/secret.txt"},
                   {"path": f"{HOME}/out", "mode": "cp-v1-binary"}, {"path": f"{HOME}/ws", "mode": "cp-v1-tar"},
                   {"path": f"{HOME}/ws", "mode": "cp-v1-recursive"}, {"path": f"{HOME}/ws/secret.txt", "mode": "tar"}):
        refused(api.get(f"/vm/{vm}/cp", params=params))
    # a tar of the user's tree carries the links as links, never what they point at
    for params in ({"path": f"{HOME}/tree", "mode": "tar"}, {"path": f"{HOME}/tree", "mode": "cp-v1-tar"}):
        r = api.get(f"/vm/{vm}/cp", params=params)
        assert r.status_code == 200 and SECRET.encode() not in r.content, r.text[:200]
        links = [(m.name, m.linkname) for m in tarfile.open(fileobj=io.BytesIO(r.content)) if m.issym()]
        assert [target for _, target in links] == ["/root/secret.txt"], links
    # root's own links are followed; the user's own files are read as that user when the request names it
    sh(api, vm, "echo via-root-link > /run/root-owned.txt")
    assert api.get(f"/vm/{vm}/cp", params={"path": "/var/run/root-owned.txt"}).content == b"via-root-link\n"
    r = api.get(f"/vm/{vm}/cp", params={"path": f"{HOME}/mine", "uid": "1000"})
    assert r.status_code == 200 and r.content == b"own\n", r.text
    r = api.get(f"/vm/{vm}/cp", params={"path": "~/out", "uid": "1000"})
    assert r.status_code == 409 and r.json()["code"] == "permission_denied" and SECRET not in r.text, r.text
    r = api.get(f"/vm/{vm}/cp", params={"path": f"{HOME}/ws", "uid": "1000", "mode": "cp-v1-tar"})
    assert r.status_code == 409 and SECRET not in r.text, r.text
    refused(api.get(f"/vm/{vm}/cp", params={"path": f"{HOME}/mine"}))  # as root: still the user's link


def test_fs_operations_do_not_follow_a_users_link(api, vm):
    as_user(api, vm, "rm -rf ws && ln -s /srv ws")
    refused(api.delete(f"/vm/{vm}/fs/remove", params={"path": f"{HOME}/ws/victim", "recursive": "true"}))
    refused(api.delete(f"/vm/{vm}/fs/remove", params={"path": f"{HOME}/ws/victim/file"}))
    refused(api.post(f"/vm/{vm}/fs/mkdir", json={"path": f"{HOME}/ws/new"}))
    refused(api.post(f"/vm/{vm}/fs/mkdir", json={"path": f"{HOME}/ws/a/b", "recursive": True}))
    refused(api.get(f"/vm/{vm}/fs/readdir", params={"path": f"{HOME}/ws"}))
    refused(api.get(f"/vm/{vm}/fs/stat", params={"path": f"{HOME}/ws/victim"}))
    victim_intact(api, vm)
    # the link itself is the user's to look at and remove; what it points at stays
    st = api.get(f"/vm/{vm}/fs/stat", params={"path": f"{HOME}/ws"}).json()
    assert st["type"] == "symlink", st
    names = [e["name"] for e in api.get(f"/vm/{vm}/fs/readdir", params={"path": HOME}).json()]
    assert "ws" in names
    # as the user (uid named): the user's rights, its links followed
    r = api.get(f"/vm/{vm}/fs/readdir", params={"path": f"{HOME}/ws", "uid": 1000})
    assert r.status_code == 200 and [e["name"] for e in r.json()] == ["victim"], r.text
    r = api.delete(f"/vm/{vm}/fs/remove", params={"path": f"{HOME}/ws/victim", "recursive": "true", "uid": 1000})
    assert r.status_code == 409 and r.json()["code"] == "permission_denied", r.text
    r = api.post(f"/vm/{vm}/fs/mkdir", json={"path": f"{HOME}/made/deep", "recursive": True, "uid": 1000})
    assert r.status_code == 200, r.text
    assert sh(api, vm, f"stat -c %U {HOME}/made {HOME}/made/deep").split() == ["ubuntu", "ubuntu"]
    r = api.post(f"/vm/{vm}/fs/mkdir", json={"path": "/srv/by-user", "uid": 1000})
    assert r.status_code == 409, r.text
    assert api.delete(f"/vm/{vm}/fs/remove", params={"path": f"{HOME}/ws"}).status_code == 200
    victim_intact(api, vm)
    # root's own links still work
    assert api.get(f"/vm/{vm}/fs/readdir", params={"path": "/var/run"}).status_code == 200
    assert api.post(f"/vm/{vm}/fs/mkdir", json={"path": "/var/run/by-root"}).status_code == 200
    assert api.delete(f"/vm/{vm}/fs/remove", params={"path": "/var/run/by-root"}).status_code == 200


def test_recursive_remove_never_enters_a_link(api, vm):
    """A link inside the tree is removed as a link, whoever made it, and a directory of the tree
    swapped for a link while the remove runs is not entered either (rmtree by descriptor)."""
    as_user(api, vm, "rm -rf tree && mkdir -p tree/a/b && ln -s /srv tree/a/srv && touch tree/a/b/f && "
                     "for i in $(seq 200); do mkdir -p tree/many/$i; done")
    # the user swaps tree/a/b for a link to /srv over and over, while root removes the tree
    swapper = api.post(f"/vm/{vm}/exec", params={
        "cmd": "while [ -d tree ]; do mv tree/a/b tree/a/old && ln -s /srv tree/a/b; rm -f tree/a/b; "
               "mv tree/a/old tree/a/b; done", "uid": "1000", "background": "true"})
    assert swapper.status_code == 201, swapper.text
    r = api.delete(f"/vm/{vm}/fs/remove", params={"path": f"{HOME}/tree", "recursive": "true"})
    assert r.status_code in (200, 400, 404), r.text  # 400/404: a rename made an entry vanish mid-walk
    api.post(f"/vm/{vm}/exec/{swapper.json()['exec_id']}/kill", json={"signal": "KILL"})
    sh(api, vm, f"rm -rf {HOME}/tree")
    victim_intact(api, vm)


def test_watch_does_not_follow_a_users_link(api, vm):
    as_user(api, vm, "rm -rf ws watched && ln -s /root ws && mkdir watched && ln -s /root watched/into-root")
    refused(api.get(f"/vm/{vm}/fs/watch", params={"paths": f"{HOME}/ws"}))
    refused(api.get(f"/vm/{vm}/fs/watch", params={"paths": f"{HOME}/ws/secret.txt"}))
    # a recursive watch of the user's directory does not descend into its link to /root
    events: list[dict] = []
    ready = threading.Event()

    def listen() -> None:
        params = [("paths", f"{HOME}/watched"), ("recursive", "true"), ("events", "create"), ("max_events", "1"),
                  ("timeout", "90s")]
        with api.stream("GET", f"/vm/{vm}/fs/watch", params=params) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith(":"):
                    ready.set()
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    t = threading.Thread(target=listen)
    t.start()
    assert ready.wait(60), "the watch never started"
    time.sleep(1)
    sh(api, vm, f"touch /root/made-in-root; sleep 0.5; touch {HOME}/watched/marker")
    t.join(90)
    assert not t.is_alive()
    assert [(e["type"], e["path"]) for e in events] == [("create", f"{HOME}/watched/marker")], events


def test_exec_and_shell_as_a_user_get_its_groups_and_identity(api, daemon, vm):
    expected = sh(api, vm, "su -s /bin/sh -c 'id -g; id -G' ubuntu").split()
    assert expected[0] == "1000" and len(expected) > 2, expected  # ubuntu has supplementary groups
    cmd = 'id -g; id -G; echo "$HOME $USER $LOGNAME $(pwd)"'
    out = api.post(f"/vm/{vm}/exec", params={"cmd": cmd, "uid": "1000", "buffered": "true"}).json()["stdout"]
    lines = out.splitlines()
    assert [lines[0], *lines[1].split()] == expected and "0" not in lines[1].split(), out
    assert lines[2] == f"{HOME} ubuntu ubuntu {HOME}", out
    # what the request names wins
    out = api.post(f"/vm/{vm}/exec", params=[("cmd", 'id -g; echo "$HOME $USER"'), ("uid", "1000"), ("gid", "27"),
                                             ("env", "HOME=/tmp"), ("env", "USER=other"), ("buffered", "true")])
    assert out.json()["stdout"].split() == ["27", "/tmp", "other"], out.text
    # a working directory through the user's link: refused as root, the user's rights as the user
    as_user(api, vm, "rm -rf ws && ln -s /root ws")
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "rm -f secret.txt", "cwd": f"{HOME}/ws", "buffered": "true"})
    refused(r)
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "pwd", "cwd": f"{HOME}/ws", "uid": "1000", "buffered": "true"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_cwd", r.text
    assert sh(api, vm, "cat /root/secret.txt") == SECRET
    # an interactive shell as uid 1000 too
    with SlicerClient(daemon.url, token=daemon.token) as client, client.shell(vm, uid=1000) as ws:
        line = b'echo "G=$(id -G) H=$HOME U=$USER" END-$((6*7))\n'
        ws.send(struct.pack(">BI", 1, len(line)) + line)
        out = b""
        while b"END-42" not in out:
            msg = ws.recv(timeout=60)
            if msg[0] == 1:
                out += msg[5:]
        ws.send(struct.pack(">BI", 1, 5) + b"exit\n")
    shown = next(x for x in out.decode(errors="replace").splitlines() if "END-42" in x and x.startswith("G="))
    assert shown.split(" END")[0] == f"G={' '.join(expected[1:])} H={HOME} U=ubuntu", shown


def test_ssh_keys_are_not_written_through_a_users_link(api, vm):
    """After a reboot the host writes ~ubuntu/.ssh/authorized_keys again (as root): a ~/.ssh the
    user made a link to /etc must not get /etc chowned to the user nor a file written there."""
    as_user(api, vm, "rm -rf .ssh-real && mv .ssh .ssh-real && ln -s /etc .ssh")
    before = sh(api, vm, "stat -c '%U:%G %a' /etc; cat /proc/sys/kernel/random/boot_id").split()
    assert api.post(f"/vm/{vm}/shutdown", params={"action": "reboot"}).status_code == 200
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        r = api.post(f"/vm/{vm}/exec", params={"cmd": "cat /proc/sys/kernel/random/boot_id", "buffered": "true"})
        warnings = api.get(f"/vm/{vm}").json().get("warnings", [])
        if r.status_code == 200 and r.json()["stdout"].split() != before[2:] and any(".ssh" in w for w in warnings):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("no new boot whose key install refused the link")
    assert any("unsafe_path" in w or "not written" in w for w in warnings), warnings
    assert sh(api, vm, "stat -c '%U:%G %a' /etc; ls /etc/authorized_keys 2>/dev/null || echo absent").split() == \
        [*before[:2], "absent"]
    as_user(api, vm, "rm .ssh && mv .ssh-real .ssh")
