"""Host groups' certificate authorities (Slicer's ``ca:`` key; docs/config.md).

A group with ``ca: {generate: true}`` has a CA of its own under ``<data_dir>/ca/<group>/``
(``ca.crt``, ``ca.key``): root's only (directory 0700, key 0600). The egress proxy signs the
leaves it mints with it, and its VMs trust it together with the group's ``ca.files``
(:func:`group_bundle`, pushed into each guest after every boot: slicer.agent.catrust).

This module is imported by the proxy too, which runs in a virtualenv of its own: it imports the
standard library and ``cryptography`` only.

Example::

    cert, key = ensure_group_ca(Path("/var/lib/slicer"), "sbox")
    pem = group_bundle(Path("/var/lib/slicer"), "sbox", generate=True, files=[Path("corp-ca.pem")])
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("slicer.core.ca")

CA_VALIDITY = dt.timedelta(days=3 * 365)
RENEW_WITHIN = dt.timedelta(days=7)  # a CA this close to its end is made anew at start
LEAF_VALIDITY = dt.timedelta(days=365)
# Guests' clocks may lag the host's a little (a restored VM's is set by the agent just after).
BACKDATE = dt.timedelta(hours=1)
KEY_BITS = 2048  # RSA: mitmproxy signs its leaves with the CA's key and expects RSA
MAX_BUNDLE = 1 << 20  # bytes of PEM a group may hand its guests (the agent refuses more)
MAX_CERTS = 64
# A host group's name (slicer.core.config.NAME_PATTERN): it is a directory name here.
_GROUP = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


class CAError(Exception):
    """A CA that cannot be made, read or used; the message says which file and why."""


def ca_dir(data_dir: Path, group: str) -> Path:
    if not _GROUP.fullmatch(group):
        raise CAError(f"{group!r} is not a host group name (lowercase letters, digits and '-')")
    return data_dir / "ca" / group


def ca_paths(data_dir: Path, group: str) -> tuple[Path, Path]:
    """Where ``group``'s CA certificate and key are (whether or not they exist yet)."""
    d = ca_dir(data_dir, group)
    return d / "ca.crt", d / "ca.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """``data`` at ``path`` whole or not at all: a temporary file beside it, synced, renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode is masked, and an old directory may be wider
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def load_group_ca(data_dir: Path, group: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """``group``'s CA certificate and key, checked to belong together (for signing leaves)."""
    cert_path, key_path = ca_paths(data_dir, group)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise CAError(f"host group {group!r} has no CA yet ({e.filename}); run: slicer ca init --hostgroup "
                      f"{group}") from None
    except (OSError, ValueError, TypeError) as e:
        raise CAError(f"cannot read the CA of host group {group!r} in {cert_path.parent}: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
        raise CAError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _new_ca(group: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, group),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Slicer CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_group_ca(data_dir: Path, group: str, force: bool = False) -> tuple[Path, Path]:
    """Load ``group``'s CA, or make it: when there is none, when it ends within 7 days, when its
    files do not belong together, or with ``force``. Returns the paths of its cert and key."""
    cert_path, key_path = ca_paths(data_dir, group)
    _private_dir(cert_path.parent.parent)
    _private_dir(cert_path.parent)
    why = "forced" if force else None
    if why is None:
        try:
            cert, _ = load_group_ca(data_dir, group)
            if cert.not_valid_after_utc - _now() < RENEW_WITHIN:
                why = f"the old one expires {cert.not_valid_after_utc:%Y-%m-%d}"
        except CAError as e:
            if cert_path.exists() or key_path.exists():
                why = str(e)  # a half-made or damaged pair is of no use to anyone: replaced, and said so
                log.warning("[CA] host group %r: %s; making a new CA", group, e)
            else:
                why = "none yet"
    if why is None:
        with contextlib.suppress(OSError):
            key_path.chmod(0o600)
        return cert_path, key_path
    cert, key = _new_ca(group)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Key first: a crash between the two renames leaves a pair that does not match, which the
    # next start sees (above) and replaces, never a certificate whose key is lost.
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info('[CA] host group "%s" generated CA: %s (expires %s)', group, cert_path,
             f"{cert.not_valid_after_utc:%Y-%m-%d}")
    return cert_path, key_path


def pem_certificates(text: str, source: str) -> list[x509.Certificate]:
    """Every ``CERTIFICATE`` block of ``text`` (text around them, as in many bundles, is allowed);
    any other block (a private key) or one that does not parse is an error naming ``source``."""
    certs: list[x509.Certificate] = []
    for m in _BLOCK.finditer(text):
        if m.group(1) != "CERTIFICATE":
            raise CAError(f"{source} holds a {m.group(1)} block; only CERTIFICATE blocks are trusted (never a key)")
        try:
            certs.append(x509.load_pem_x509_certificate(m.group(0).encode()))
        except ValueError as e:
            raise CAError(f"{source}: certificate {len(certs) + 1} is not a valid X.509 certificate: {e}") from None
    if not certs:
        raise CAError(f"{source} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certs


def group_bundle(data_dir: Path, group: str, generate: bool, files: Sequence[Path]) -> str | None:
    """The PEM ``group``'s guests trust: its generated CA (with ``generate``, made if need be) and
    every certificate of ``files``, each once, in that order; None when there is none."""
    certs: list[x509.Certificate] = []
    if generate:
        cert_path, _ = ensure_group_ca(data_dir, group)
        certs += pem_certificates(cert_path.read_text(), str(cert_path))
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BUNDLE + 1)
        except OSError as e:
            raise CAError(f"host group {group}: ca.files: cannot read {path}: {e.strerror}") from None
        if len(data) > MAX_BUNDLE:
            raise CAError(f"host group {group}: ca.files: {path} is larger than {MAX_BUNDLE} bytes")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise CAError(f"host group {group}: ca.files: {path} is not PEM text (DER? convert it with "
                          "openssl x509 -inform der -in FILE -out FILE.pem)") from None
        certs += pem_certificates(text, f"host group {group}: ca.files: {path}")
    seen: set[bytes] = set()
    blocks: list[str] = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            blocks.append(cert.public_bytes(serialization.Encoding.PEM).decode())
    bundle = "".join(blocks)
    if len(blocks) > MAX_CERTS:
        raise CAError(f"host group {group}: ca: {len(blocks)} certificates; at most {MAX_CERTS} are handed to guests")
    if len(bundle) > MAX_BUNDLE:
        raise CAError(f"host group {group}: ca: the certificates come to {len(bundle)} bytes of PEM; at most "
                      f"{MAX_BUNDLE}")
    return bundle or None


def issue_leaf(data_dir: Path, group: str, hosts: Sequence[str], out: Path) -> tuple[Path, Path]:
    """A server certificate for ``hosts`` signed by ``group``'s CA (made if need be): ``<out>.crt``
    (leaf, then the CA) and ``<out>.key`` (0600). An IP address becomes an IP SAN, a name a DNS SAN."""
    if not hosts:
        raise CAError("give at least one host")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
                raise CAError(f"{host!r} is neither an IP address nor a DNS name") from None
            sans.append(x509.DNSName(host.lower()))
    ensure_group_ca(data_dir, group)
    ca_cert, ca_key = load_group_ca(data_dir, group)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, key_file = out.with_name(out.name + ".crt"), out.with_name(out.name + ".key")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    _write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM),
                  0o644)
    return crt, key_file
