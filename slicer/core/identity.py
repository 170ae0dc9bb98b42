"""The host's half of a restored guest's identity reset (the guest's: ``slicer.agent.identity``).

A VM restored from its own saved state gets a fresh clock and entropy; a clone of a template
also gets its own hostname, address, machine-id and SSH host keys, made here on the host (key
generation is far cheaper natively than under TCG).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import tempfile
import time
from pathlib import Path

from slicer.core.error_codes import ErrorCode
from slicer.core.errors import SlicerError
from slicer.core.node import Node
from slicer.core.records import BootKind
from slicer.vmm.base import VMSpec

HOST_KEY_TYPES = ("ed25519", "ecdsa")  # what the guest's sshd serves (see slicer.agent.init)
SEED_BYTES = 64


async def _keygen(kind: str, directory: str, comment: str) -> dict[str, str]:
    path = os.path.join(directory, kind)
    proc = await asyncio.create_subprocess_exec(
        "ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise SlicerError(f"ssh-keygen -t {kind} failed: {err.decode().strip()}", ErrorCode.KEYGEN_FAILED)
    return {"private": Path(path).read_text(), "public": Path(path + ".pub").read_text()}


async def ssh_host_keys(hostname: str) -> dict[str, dict[str, str]]:
    if shutil.which("ssh-keygen") is None:
        raise SlicerError("ssh-keygen not found on the host: install openssh-client", ErrorCode.KEYGEN_FAILED)
    with tempfile.TemporaryDirectory(prefix="slicer-keys-") as tmp:
        pairs = await asyncio.gather(*(_keygen(k, tmp, f"root@{hostname}") for k in HOST_KEY_TYPES))
    return dict(zip(HOST_KEY_TYPES, pairs, strict=True))


async def identity_body(node: Node, spec: VMSpec) -> dict:
    """What to send the agent of ``node`` right after its restore (before anything else)."""
    body: dict = {"seed": fresh_seed()}
    if node.boot == BootKind.TEMPLATE or node.record.identity_pending:  # still the template's
        body.update(
            hostname=node.hostname, machine_id=os.urandom(16).hex(), ip=spec.ip_cidr,
            gateway=spec.gateway, mac=spec.mac, dns=spec.dns, ssh_host_keys=await ssh_host_keys(node.hostname),
        )
    elif node.boot == BootKind.FORK:  # booted from its own address; what its disk holds of the source is renewed
        fixups = node.record.spec.fixups or []
        if "hostname" in fixups:
            body["hostname"] = node.hostname
        if "machine-id" in fixups:
            body["machine_id"] = os.urandom(16).hex()
        if "ssh-host-keys" in fixups:
            body["ssh_host_keys"] = await ssh_host_keys(node.hostname)
    body["time_ns"] = time.time_ns()  # last: the closer to sending, the truer
    return body


def fresh_seed() -> str:
    return base64.b64encode(os.urandom(SEED_BYTES)).decode()


def refresh_body() -> dict:
    """Fresh randomness and the time, for a guest that stood still (a warm pool's VM, paused
    since it was filled): its identity is already its own."""
    return {"seed": fresh_seed(), "time_ns": time.time_ns()}
