"""A full data directory: clear 507 errors, and nothing that existed before is lost."""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.vm

CONFIG = """
config:
  host_groups:
  - name: sbx
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
    boot: cold
  api:
    bind_address: 127.0.0.1
    port: PORT
"""


@pytest.fixture
def small_data_dir():
    path = Path(tempfile.mkdtemp(prefix="slt-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    path.rmdir()


def fill(directory: Path) -> None:
    """Take every free byte of ``directory``'s file system."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_full_data_dir_answers_507_and_keeps_what_it_had(guest_image, small_data_dir):
    d = Daemon(CONFIG, data_dir=small_data_dir).start()
    try:
        api = d.client()
        secret = base64.b64encode(b"precious").decode()
        assert api.post("/secrets", json={"name": "kept", "data": secret}).status_code in (200, 201)
        fill(small_data_dir)

        r = api.post("/secrets", json={"name": "new", "data": base64.b64encode(b"x" * 65536).decode()})
        assert r.status_code == 507 and r.json()["code"] == "insufficient_storage", r.text
        r = api.patch("/secrets/kept", json={"data": base64.b64encode(b"y" * 65536).decode()})
        assert r.status_code == 507, r.text
        r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "2m"})
        assert r.status_code == 507 and r.json()["code"] == "insufficient_storage", r.text
        assert api.get("/nodes").json() == [], "a create that failed leaves no VM behind"
        assert [s["name"] for s in api.get("/secrets").json()] == ["kept"]
        assert not list((small_data_dir / "secrets").glob("*.tmp")), "no partial file is left"

        (small_data_dir / "filler").unlink()  # space again: everything works, the old secret is whole
        r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "4m"})
        assert r.status_code == 201, r.text
        hostname = r.json()["hostname"]
        r = api.post(f"/vm/{hostname}/exec", params={"cmd": "cat /run/slicer/secrets/kept", "buffered": "true"})
        assert r.json()["stdout"] == "precious", r.text
    finally:
        d.cleanup()
