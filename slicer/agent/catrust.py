"""Trust the host group's CA certificates in the guest (``PUT /ca``; host side: slicer.core.ca).

The host sends its group's bundle after every boot. When ``/runner/ca.crt`` already holds
exactly it, nothing is done (every boot pays one read). Otherwise each certificate (short id:
the first 12 hex of the SHA-256 of its DER, as Slicer's agent names them) is added to the
system's trust, append-only and idempotently:

* ``/usr/local/share/ca-certificates/slicer-<short>.crt``: kept by a later ``update-ca-certificates``;
* ``/etc/ssl/certs/slicer-<short>.pem`` and its OpenSSL hash link ``<hash>.N`` (``capath`` lookups);
* appended to ``/etc/ssl/certs/ca-certificates.crt`` after ``# SLICER_DYNAMIC_CA <short>``;
* recorded as ``/etc/slicer/ca-trust/<short>.installed``;

then ``/runner/ca.crt`` is written, last, so that a crash midway is finished at the next boot.
Runtimes that take a bundle of their own get it through exec's environment (:func:`ca_env`).

Guest-side code: the standard library only.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import os
import re
import shutil
import subprocess

from slicer.agent import files, paths, runtime

RUNNER_CA = "/runner/ca.crt"
SOURCES_DIR = "/usr/local/share/ca-certificates"
CERTS_DIR = "/etc/ssl/certs"
SYSTEM_BUNDLE = CERTS_DIR + "/ca-certificates.crt"
RECORD_DIR = "/etc/slicer/ca-trust"
MARKER = "# SLICER_DYNAMIC_CA "
MAX_BUNDLE = 1 << 20
MAX_CERTS = 64
_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+?)-----END CERTIFICATE-----")


class CATrustError(ValueError):
    """The body is not a bundle of PEM certificates (or is too big)."""


def split_bundle(pem: bytes) -> list[tuple[str, bytes]]:
    """``(short id, normalised PEM block)`` of each certificate of ``pem``, which must hold PEM
    certificate blocks and whitespace only (never a key, never anything else)."""
    if len(pem) > MAX_BUNDLE:
        raise CATrustError(f"the bundle is larger than {MAX_BUNDLE} bytes")
    blocks: list[tuple[str, bytes]] = []
    pos = 0
    for m in _BLOCK.finditer(pem):
        if pem[pos:m.start()].strip():
            raise CATrustError("the bundle holds something besides PEM certificate blocks")
        pos = m.end()
        try:
            der = binascii.a2b_base64(b"".join(m.group(1).split()), strict_mode=True)
        except binascii.Error as e:
            raise CATrustError(f"certificate {len(blocks) + 1} is not base64: {e}") from None
        if len(der) < 64 or der[0] != 0x30:  # an X.509 certificate is a DER SEQUENCE
            raise CATrustError(f"certificate {len(blocks) + 1} is not DER-encoded")
        body = binascii.b2a_base64(der, newline=False)
        lines = b"\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        block = b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"
        blocks.append((hashlib.sha256(der).hexdigest()[:12], block))
    if pem[pos:].strip():
        raise CATrustError("the bundle holds something besides PEM certificate blocks")
    if not blocks:
        raise CATrustError("the bundle holds no certificate")
    if len(blocks) > MAX_CERTS:
        raise CATrustError(f"the bundle holds {len(blocks)} certificates; at most {MAX_CERTS}")
    return blocks


def _read(path: str, limit: int = -1) -> bytes | None:
    try:
        fd = paths.open_at(path, os.O_RDONLY | os.O_CLOEXEC)
    except (paths.FileError, OSError):
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.close(paths.make_dirs(os.path.dirname(path)))
    with files.atomic_file(path, mode, 0, 0) as f:
        f.write(data)


def _append_to_system_bundle(short: str, block: bytes) -> None:
    """Add ``block`` to the system bundle after its marker, unless the marker is there. The bundle
    is rewritten whole (temp + rename) rather than appended to, so it is never half a certificate."""
    # A bundle that is a symlink (some images) is written where it points, not replaced by a file.
    path = os.path.realpath(SYSTEM_BUNDLE) if os.path.islink(SYSTEM_BUNDLE) else SYSTEM_BUNDLE
    old = _read(path) or b""
    marker = (MARKER + short).encode()
    if marker in old.splitlines():
        return
    sep = b"\n" if old and not old.endswith(b"\n") else b""
    _write(path, old + sep + marker + b"\n" + block)


def _subject_hash(pem_path: str) -> str | None:
    openssl = shutil.which("openssl", path=runtime.agent_path())
    if openssl is None:
        return None
    try:
        done = subprocess.run([openssl, "x509", "-subject_hash", "-noout", "-in", pem_path],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if re.fullmatch(r"[0-9a-f]{8}", value) else None


def _hash_link(short: str) -> None:
    """``<hash>.N`` -> ``slicer-<short>.pem`` in CERTS_DIR, the first free N (as ``c_rehash``)."""
    name = f"slicer-{short}.pem"
    digest = _subject_hash(os.path.join(CERTS_DIR, name))
    if digest is None:
        return
    for n in range(10):
        link = os.path.join(CERTS_DIR, f"{digest}.{n}")
        if os.path.islink(link) and os.readlink(link) in (name, os.path.join(CERTS_DIR, name)):
            return  # ours already
        if not os.path.lexists(link):
            os.symlink(name, link)
            return


def install(pem: bytes) -> dict:
    """Trust every certificate of ``pem`` (see the module's docstring); the answer names them."""
    blocks = split_bundle(pem)
    bundle = b"".join(block for _, block in blocks)
    shorts = [short for short, _ in blocks]
    if _read(RUNNER_CA, MAX_BUNDLE + 1) == bundle:
        return {"certificates": shorts, "changed": False}
    for short, block in blocks:
        _write(f"{SOURCES_DIR}/slicer-{short}.crt", block)
        _write(f"{CERTS_DIR}/slicer-{short}.pem", block)
        _append_to_system_bundle(short, block)
        _hash_link(short)
        _write(f"{RECORD_DIR}/{short}.installed", block)
    _write(RUNNER_CA, bundle)
    return {"certificates": shorts, "changed": True}


# Runtimes' trust settings when the group has CAs. The two that REPLACE a runtime's trust store
# point at the system bundle (public CAs and the group's together: a passthrough upstream with a
# public certificate stays trusted); Node's is additive, so it gets the group's bundle alone.
# (Slicer points all three at /runner/ca.crt.)
CA_ENV = {"NODE_EXTRA_CA_CERTS": RUNNER_CA, "SSL_CERT_FILE": SYSTEM_BUNDLE, "REQUESTS_CA_BUNDLE": SYSTEM_BUNDLE}


def ca_env() -> dict[str, str]:
    """The variables above when this guest was given CAs; a request's own env wins over them."""
    with contextlib.suppress(OSError):
        if os.path.isfile(RUNNER_CA):
            return dict(CA_ENV)
    return {}
