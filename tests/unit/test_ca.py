"""Host groups' CAs (slicer.core.ca), the ``ca:`` key, the guest's side (slicer.agent.catrust)
and their delivery after every boot (on the fake driver)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slicer.agent import catrust
from slicer.core import ca
from slicer.core.config import load_config
from slicer.core.errors import BadRequest
from slicer.core.records import NodeKind
from tests.unit.conftest import Lab, create_args


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def other_ca(tmp_path: Path, name: str = "corp") -> Path:
    """A CA of someone else's, as a user would give it in ca.files (a comment line before it)."""
    ca.ensure_group_ca(tmp_path / "elsewhere", name)
    pem = tmp_path / f"{name}.pem"
    pem.write_text(f"# {name}'s root\n" + (tmp_path / "elsewhere/ca" / name / "ca.crt").read_text())
    return pem


# --- the group's CA ------------------------------------------------------------------------------

def test_a_ca_is_generated_root_only_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, "slicer.core.ca"):
        crt, key = ca.ensure_group_ca(tmp_path, "sbox")
    assert (crt, key) == (tmp_path / "ca/sbox/ca.crt", tmp_path / "ca/sbox/ca.key")
    assert stat.S_IMODE(crt.parent.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = cert_of(crt)
    assert cert.subject.rfc4514_string() == "OU=Slicer CA,CN=sbox" and cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3 * 365) <= life <= dt.timedelta(days=3 * 365, hours=2)
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert private.public_key() == cert.public_key()
    assert f'[CA] host group "sbox" generated CA: {crt} (expires ' in caplog.text
    assert not [p for p in crt.parent.iterdir() if p.name not in ("ca.crt", "ca.key")]  # no temp file left


def test_a_ca_is_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    crt, key = ca.ensure_group_ca(tmp_path, "sbox")
    before = crt.read_bytes(), key.read_bytes()
    with caplog.at_level(logging.INFO, "slicer.core.ca"):
        assert ca.ensure_group_ca(tmp_path, "sbox") == (crt, key)
    assert (crt.read_bytes(), key.read_bytes()) == before and "generated" not in caplog.text


def test_a_ca_near_its_end_or_forced_is_made_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    crt, _ = ca.ensure_group_ca(tmp_path, "sbox")
    first = cert_of(crt)
    real_now = ca._now
    monkeypatch.setattr(ca, "_now", lambda: real_now() + ca.CA_VALIDITY - dt.timedelta(days=8))
    ca.ensure_group_ca(tmp_path, "sbox")
    assert cert_of(crt) == first  # 8 days left: kept
    monkeypatch.setattr(ca, "_now", lambda: real_now() + ca.CA_VALIDITY - dt.timedelta(days=6))
    ca.ensure_group_ca(tmp_path, "sbox")
    second = cert_of(crt)
    assert second != first and second.not_valid_after_utc > first.not_valid_after_utc
    monkeypatch.setattr(ca, "_now", real_now)
    ca.ensure_group_ca(tmp_path, "sbox", force=True)
    assert cert_of(crt) != second


def test_a_pair_that_does_not_match_is_replaced(tmp_path: Path):
    crt, key = ca.ensure_group_ca(tmp_path, "a")
    other_key = ca.ensure_group_ca(tmp_path, "b")[1]
    key.write_bytes(other_key.read_bytes())  # as a crash between the two renames could leave it
    with pytest.raises(ca.CAError, match="is not the key of"):
        ca.load_group_ca(tmp_path, "a")
    ca.ensure_group_ca(tmp_path, "a")
    cert, private = ca.load_group_ca(tmp_path, "a")
    assert private.public_key() == cert.public_key()


def test_a_group_name_cannot_leave_the_ca_directory(tmp_path: Path):
    with pytest.raises(ca.CAError, match="not a host group name"):
        ca.ensure_group_ca(tmp_path, "../etc")


# --- bundles -------------------------------------------------------------------------------------

def test_the_bundle_is_the_generated_ca_then_every_file_cert(tmp_path: Path):
    one, two = other_ca(tmp_path, "one"), other_ca(tmp_path, "two")
    both = tmp_path / "both.pem"
    both.write_text(one.read_text() + "\nsome text between blocks\n" + two.read_text())
    bundle = ca.group_bundle(tmp_path, "sbox", True, [both, two])  # two twice: once in the bundle
    assert bundle is not None
    certs = ca.pem_certificates(bundle, "bundle")
    assert [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in certs] == ["sbox", "one", "two"]
    assert bundle.count("BEGIN CERTIFICATE") == 3 and "#" not in bundle and "text" not in bundle
    assert ca.group_bundle(tmp_path, "files", False, [one]).count("BEGIN CERTIFICATE") == 1
    assert not (tmp_path / "ca/files").exists()  # no generate: no CA made
    assert ca.group_bundle(tmp_path, "none", False, []) is None


@pytest.mark.parametrize(("content", "message"), [
    ("hello\n", "holds no PEM certificate"),
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "certificate 1 is not a valid X.509"),
    ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PRIVATE KEY block; only CERTIFICATE"),
    (b"\x30\x82\x01\x00", "not PEM text"),
])
def test_a_bad_file_is_an_error_naming_it(tmp_path: Path, content: str | bytes, message: str):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ca.CAError, match=message) as e:
        ca.group_bundle(tmp_path, "sbox", False, [bad])
    assert str(bad) in str(e.value) and "sbox" in str(e.value)


def test_a_missing_file_or_too_much_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ca.CAError, match=f"cannot read {tmp_path}/nope.pem"):
        ca.group_bundle(tmp_path, "sbox", False, [tmp_path / "nope.pem"])
    big = tmp_path / "big.pem"
    big.write_text("x" * (ca.MAX_BUNDLE + 1))
    with pytest.raises(ca.CAError, match="larger than"):
        ca.group_bundle(tmp_path, "sbox", False, [big])
    monkeypatch.setattr(ca, "MAX_CERTS", 1)
    with pytest.raises(ca.CAError, match="2 certificates; at most 1"):
        ca.group_bundle(tmp_path, "sbox", True, [other_ca(tmp_path)])


# --- leaves --------------------------------------------------------------------------------------

def test_an_issued_leaf_has_its_sans_and_verifies_with_the_ca(tmp_path: Path):
    out = tmp_path / "out" / "registry"
    crt, key = ca.issue_leaf(tmp_path, "sbox", ["registry.internal", "192.168.137.1", "::1"], out)
    assert (crt, key) == (tmp_path / "out/registry.crt", tmp_path / "out/registry.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf = cert_of(crt)
    ca_cert, _ = ca.load_group_ca(tmp_path, "sbox")
    leaf.verify_directly_issued_by(ca_cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["registry.internal"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.168.137.1", "::1"]
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert dt.timedelta(days=364) < leaf.not_valid_after_utc - ca._now() <= dt.timedelta(days=365)
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert private.public_key() == leaf.public_key()
    if shutil.which("openssl"):  # what a client does: the chain to the CA, for this name
        done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca/sbox/ca.crt"), "-purpose",
                               "sslserver", "-verify_hostname", "registry.internal", str(crt)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_leaf_needs_hosts_that_are_names_or_addresses(tmp_path: Path):
    with pytest.raises(ca.CAError, match="at least one"):
        ca.issue_leaf(tmp_path, "sbox", [], tmp_path / "x")
    with pytest.raises(ca.CAError, match="neither an IP address nor a DNS name"):
        ca.issue_leaf(tmp_path, "sbox", ["no spaces"], tmp_path / "x")


# --- config --------------------------------------------------------------------------------------

def test_config_ca_key_and_relative_files(tmp_path: Path):
    cfg = load_config("""
config:
  host_groups:
  - name: a
    ca: {generate: true, files: [certs/corp.pem, /abs/other.pem]}
  - name: b
""", tmp_path)
    a, b = cfg.host_groups
    assert a.ca is not None and a.ca.generate and b.ca is None
    assert a.ca.files == [str(tmp_path / "certs/corp.pem"), "/abs/other.pem"]
    assert load_config("config:\n  host_groups:\n  - name: a\n    ca: {}\n").host_groups[0].ca.generate is False


def test_config_ca_refuses_unknown_keys():
    with pytest.raises(BadRequest, match="host_groups.0.ca.genrate: unknown key 'genrate'; did you mean 'generate'"):
        load_config("config:\n  host_groups:\n  - name: a\n    ca: {genrate: true}\n")


# --- the guest's side (paths moved under tmp_path) -----------------------------------------------

@pytest.fixture
def guest_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "guest"
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca-certificates.crt").write_text("# the public CAs\n")
    for name in ("RUNNER_CA", "SOURCES_DIR", "CERTS_DIR", "SYSTEM_BUNDLE", "RECORD_DIR"):
        monkeypatch.setattr(catrust, name, str(root) + getattr(catrust, name))
    return root


def test_the_guest_installs_a_bundle_once_and_append_only(tmp_path: Path, guest_root: Path):
    bundle = ca.group_bundle(tmp_path, "sbox", True, [other_ca(tmp_path)])
    assert bundle is not None
    blocks = catrust.split_bundle(bundle.encode())
    ders = [x509.load_pem_x509_certificate(b).public_bytes(serialization.Encoding.DER) for _, b in blocks]
    shorts = [hashlib.sha256(d).hexdigest()[:12] for d in ders]
    assert [s for s, _ in blocks] == shorts and b"".join(b for _, b in blocks) == bundle.encode()
    assert catrust.install(bundle.encode()) == {"certificates": shorts, "changed": True}
    assert (guest_root / "runner/ca.crt").read_text() == bundle
    assert stat.S_IMODE((guest_root / "runner/ca.crt").stat().st_mode) == 0o644
    system = (guest_root / "etc/ssl/certs/ca-certificates.crt").read_text()
    assert system.startswith("# the public CAs\n")
    for short, (_, block) in zip(shorts, blocks, strict=True):
        assert f"# SLICER_DYNAMIC_CA {short}\n{block.decode()}" in system
        for path in (f"usr/local/share/ca-certificates/slicer-{short}.crt", f"etc/ssl/certs/slicer-{short}.pem",
                     f"etc/slicer/ca-trust/{short}.installed"):
            assert (guest_root / path).read_bytes() == block
    def links() -> list[str]:
        return sorted(os.readlink(p) for p in (guest_root / "etc/ssl/certs").iterdir() if p.is_symlink())

    if shutil.which("openssl"):  # <subject hash>.0 -> slicer-<short>.pem, for capath lookups
        assert links() == sorted(f"slicer-{s}.pem" for s in shorts)
    assert catrust.install(bundle.encode())["changed"] is False
    (guest_root / "runner/ca.crt").unlink()  # installed again: nothing doubles
    before = links()
    assert catrust.install(bundle.encode())["changed"] is True
    assert (guest_root / "etc/ssl/certs/ca-certificates.crt").read_text() == system and links() == before
    one = ca.group_bundle(tmp_path, "sbox", True, [])
    assert catrust.install(one.encode())["changed"]  # a smaller bundle: the old CA stays trusted (append-only)
    assert (guest_root / "etc/ssl/certs/ca-certificates.crt").read_text() == system


@pytest.mark.parametrize("body", [
    b"", b"junk", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
])
def test_the_guest_refuses_what_is_not_certificates(guest_root: Path, body: bytes):
    with pytest.raises(catrust.CATrustError):
        catrust.install(body)
    assert not (guest_root / "runner").exists()


def test_the_guest_refuses_a_bundle_too_big(tmp_path: Path, guest_root: Path):
    pem = ca.group_bundle(tmp_path, "sbox", True, []).encode()
    with pytest.raises(catrust.CATrustError, match="larger than"):
        catrust.split_bundle(pem * (catrust.MAX_BUNDLE // len(pem) + 1))


def test_exec_env_points_runtimes_at_the_bundles(tmp_path: Path, guest_root: Path):
    assert catrust.ca_env() == {}
    catrust.install(ca.group_bundle(tmp_path, "sbox", True, []).encode())
    system = "/etc/ssl/certs/ca-certificates.crt"  # the guest's paths (the fixture moved only where files go)
    assert catrust.ca_env() == {"NODE_EXTRA_CA_CERTS": "/runner/ca.crt", "SSL_CERT_FILE": system,
                                "REQUESTS_CA_BUNDLE": system}


# --- delivery after every boot (fake driver) -----------------------------------------------------

def lab_config(extra: Path) -> str:
    return f"""\
config:
  host_groups:
  - name: svc
    count: 1
    ram_mb: 256
    userdata: echo hi
    ca: {{generate: true, files: [{extra}]}}
    network: {{gateway: 10.77.0.1/24}}
  - name: sbx
    count: 0
    ram_mb: 256
    warm_pool: 1
    ca: {{generate: true}}
    network: {{gateway: 10.78.0.1/24}}
  - name: plain
    count: 0
    ram_mb: 256
    network: {{gateway: 10.79.0.1/24}}
  api: {{bind_address: 127.0.0.1, port: 8080}}
"""


async def test_every_boot_hands_the_group_its_bundle_before_userdata(lab: Lab, tmp_path: Path):
    m = await lab.daemon(lab_config(other_ca(tmp_path)))
    svc = lab.host.vm("svc-1").guest
    (pem,) = svc.called("put_ca")
    assert pem == ca.group_bundle(lab.data_dir, "svc", True, [tmp_path / "corp.pem"])
    names = [name for _, name, _ in svc.calls]
    assert names.index("put_ca") < names.index("userdata")

    sbx_pem = ca.group_bundle(lab.data_dir, "sbx", True, [])
    async with asyncio.timeout(10):  # the pooled VM is set up when filled, and again when handed out
        while m.pool.stats()["sbx"].ready < 1:  # set up, paused and in the pool (not only provisioned)
            await asyncio.sleep(0.01)
    pooled = next(n for n in m.nodes.values() if n.record.kind == NodeKind.POOL)
    assert lab.host.vm(pooled.hostname).guest.called("put_ca") == [sbx_pem]
    node = await m.create("sbx", **create_args(wait="agent"))
    assert node is pooled and lab.host.vm(node.hostname).guest.called("put_ca") == [sbx_pem, sbx_pem]
    (fork,) = await m.forks.fork(node.hostname, 1, [], wait="agent", timeout=10)
    assert lab.host.vm(fork.hostname).guest.called("put_ca") == [sbx_pem]
    plain = await m.create("plain", **create_args(wait="agent"))
    assert lab.host.vm(plain.hostname).guest.called("put_ca") == []


def test_a_missing_file_stops_the_daemon_at_start(lab: Lab, tmp_path: Path):
    with pytest.raises(BadRequest, match=r"config: svc.ca: host group svc: ca.files: cannot read .*missing.pem"):
        lab.manager(lab_config(tmp_path / "missing.pem"))


# --- the commands --------------------------------------------------------------------------------

def test_ca_init_and_issue_commands(tmp_path: Path):
    from typer.testing import CliRunner

    from slicer.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["ca", "init", "--hostgroup", "sbox", "--data-dir", str(tmp_path)])
    assert made.exit_code == 0, made.output
    assert str(tmp_path / "ca/sbox/ca.crt") in made.output and "expires" in made.output
    before = (tmp_path / "ca/sbox/ca.crt").read_bytes()
    assert runner.invoke(app, ["ca", "init", "-g", "sbox", "--data-dir", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "ca/sbox/ca.crt").read_bytes() == before
    assert runner.invoke(app, ["ca", "init", "-g", "sbox", "--force", "--data-dir", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "ca/sbox/ca.crt").read_bytes() != before
    issued = runner.invoke(app, ["ca", "issue", "-g", "sbox", "--host", "a.test", "--host", "10.0.0.9", "--out",
                                 str(tmp_path / "leaf"), "--data-dir", str(tmp_path)])
    assert issued.exit_code == 0, issued.output
    cert_of(tmp_path / "leaf.crt").verify_directly_issued_by(ca.load_group_ca(tmp_path, "sbox")[0])
    bad = runner.invoke(app, ["ca", "init", "-g", "../x", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "not a host group name" in bad.output
    new = runner.invoke(app, ["new", "sbox", "--ca"])
    assert new.exit_code == 0 and load_config(new.output).host_groups[0].ca.generate is True
