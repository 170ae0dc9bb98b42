"""Config, sizes, durations and request validation: pure logic, no VM."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from slicer.api.models import CreateNodeRequest, parse_duration
from slicer.core.config import DEFAULT_CONFIG, load_config, parse_size
from slicer.core.errors import BadRequest


def test_default_config_is_one_small_vm():
    cfg = load_config(DEFAULT_CONFIG)
    (g,) = cfg.host_groups
    assert (g.name, g.count, g.vcpu, g.ram, g.disk_size) == ("vm", 1, 2, 1 << 30, 4 << 30)
    assert cfg.api.port == 8080 and cfg.api.auth.enabled  # safe default


def test_slicer_style_config_parses():
    cfg = load_config(
        """
config:
  host_groups:
  - name: api
    storage: image
    storage_size: 25G
    count: 3
    vcpu: 4
    ram_mb: 2048
    network:
      bridge: brvm0
      tap_prefix: vmtap
      gateway: 10.0.0.1/24
  github_user: someone
  api:
    bind_address: /run/slicer.sock
    auth:
      enabled: true
"""
    )
    g = cfg.group("api")
    assert g.ram == 2048 << 20 and g.disk_size == 25 << 30 and g.service_persistent
    assert cfg.api.unix_socket == "/run/slicer.sock"


def test_a_relative_socket_is_next_to_the_config(tmp_path):
    for address in ("./slicer.sock", "unix:slicer.sock"):
        cfg = load_config(f"config:\n  api:\n    bind_address: {address}\n    auth: {{enabled: false}}\n", tmp_path)
        assert cfg.api.unix_socket == cfg.api.bind_address == str(tmp_path / "slicer.sock")
    assert load_config("config:\n  api:\n    bind_address: 0.0.0.0\n", tmp_path).api.unix_socket is None


@pytest.mark.parametrize(
    "snippet, words",
    [
        ("host_groups: [{name: vm, ram_gb: 1, ram_mb: 10}]", "only one of ram_gb"),
        ("host_groups: [{name: Bad_Name}]", "host_groups.0.name"),
        ("host_groups: [{name: a}, {name: a}]", "unique"),
        ("host_groups: [{name: a, storage_size: lots}]", "not a size"),
        ("host_groups: [{name: a, colour: red}]", "colour"),
        ("host_groups: [{name: a, network: {gateway: 10.0.0.1/30}}]", "gateway"),
        ("host_groups: [{name: a, network: {gateway: 10.0.0.0/24}}]", "network or broadcast"),
        ("host_groups: [{name: a, network: {mode: user}}]", "loopback"),
        ("host_groups: [{name: a, network: {gateway: 10.0.0.1/24, addresses: [10.0.1.5/24]}}]", "10.0.1.5"),
        ("host_groups: [{name: a, network: {gateway: 10.0.0.1/24, range: 10.0.0.9-10.0.0.3}}]", "before"),
        ("host_groups: [{name: a, network: {gateway: 10.0.0.1/24, range: 10.0.0.2-10.0.1.3}}]", "10.0.0.255"),
        ("host_groups: [{name: a, count: 3, network: {gateway: 10.0.0.1/24, addresses: [10.0.0.5, 10.0.0.6]}}]",
         "count 3"),
        ("host_groups: [{name: a, network: {gateway: 10.0.0.1/24}}, {name: b, network: {gateway: 10.0.0.9/16}}]",
         "overlap"),
        ("host_groups: [{name: a, network: {bridge: a-very-long-bridge-name}}]", "bridge"),
        ("host_groups: [{name: a, network: {mode: isolated, range: 169.254.0.0/31}}]", "/30"),
        ("host_groups: [{name: a, network: {mode: isolated, gateway: 10.0.0.1/24}}]", "isolated"),
        ("host_groups: [{name: a, network: {allow: [10.0.0.0/8]}}]", "isolated"),
        ("host_groups: [{name: a, network: {mode: isolated, drop: [nonsense]}}]", "nonsense"),
        ("host_groups: [{name: a, count: 2, network: {mode: isolated, range: 169.254.0.0/30}}]", "count 2"),
        ("image: 'has spaces:1'", "invalid image reference"),
        ("host_groups: [{name: a, image: '../../etc'}]", "invalid image reference"),
        ("kernel_file: /nonexistent/vmlinuz", "No such file"),
        ("kernel_file: /etc/hostname", "not an x86 Linux kernel"),
        ("{kernel_file: /etc/hostname, kernel_image: 'k:1'}", "only one of kernel_image"),
        ("kernel_image: 'bad ref'", "invalid image reference"),
        ("host_groups: [{name: a, gpu_count: 1}]", "PCI passthrough"),
        ("host_groups: [{name: a, network: {mode: macvtap, parent: eth0}}]", "macvtap"),
        ("host_groups: [{name: a, pci: [0000:01:00.0]}]", "PCI passthrough needs KVM"),
        ("host_groups: [{name: a, vcpus: 2}]", "did you mean 'vcpu'"),
        ("graceful_shutdwn: false", "did you mean 'graceful_shutdown'"),
        ("api: {bind_address: 0.0.0.0, auth: {enabled: false}}", "enable auth"),
    ],
)
def test_bad_configs_name_the_field(snippet, words):
    with pytest.raises(BadRequest) as e:
        load_config("config:\n  " + snippet)
    assert words in e.value.message


@pytest.mark.parametrize("hypervisor", ["firecracker", "cloud-hypervisor", "qemu"])
def test_every_hypervisor_of_slicer_loads(hypervisor):
    assert load_config(f"config:\n  hypervisor: {hypervisor}\n").hypervisor == hypervisor


def test_network_pools():
    cfg = load_config("""
config:
  host_groups:
  - name: a
    network: {gateway: 192.168.137.1/24, range: 192.168.137.20-192.168.137.22}
  - name: b
    network: {gateway: 192.168.140.1/24, addresses: [192.168.140.7/24, 192.168.140.9/24]}
  - name: c
    network: {mode: isolated, range: 169.254.100.0/22, allow: [198.51.100.0/24]}
""")
    assert [str(a) for a in cfg.group("a").network.pool()] == ["192.168.137.20", "192.168.137.21", "192.168.137.22"]
    assert [str(a) for a in cfg.group("b").network.pool()] == ["192.168.140.7", "192.168.140.9"]
    assert cfg.group("c").network.mode == "isolated"


def test_auth_may_be_off_only_where_nobody_else_reaches():
    for bind in ("127.0.0.1", "localhost", "::1", "/run/slicer.sock"):
        load_config(f"config:\n  api: {{bind_address: '{bind}', auth: {{enabled: false}}}}")


def test_config_must_be_yaml_mapping():
    with pytest.raises(BadRequest):
        load_config("config: [1, 2")
    with pytest.raises(BadRequest):
        load_config("- just a list")


def test_userdata_file_is_read_relative_to_config(tmp_path):
    (tmp_path / "boot.sh").write_text("echo hi\n")
    cfg = load_config("config:\n  host_groups: [{name: a, userdata_file: boot.sh}]", tmp_path)
    assert cfg.host_groups[0].userdata == "echo hi\n"


@pytest.mark.parametrize("text, size", [("25G", 25 << 30), ("512M", 512 << 20), ("1Gi", 1 << 30), ("100", 100)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("2m", 120), ("1m30s", 90), ("500ms", 0.5), ("5", 5)])
def test_durations(text, seconds):
    assert parse_duration(text, "5m") == seconds


def test_missing_or_zero_durations_are_the_default():
    for text in (None, "", "0s", "0"):  # the TypeScript SDK sends 0s when its caller set no timeout
        assert parse_duration(text, "5m") == 300


@pytest.mark.parametrize("text", ["soon", "5x", "-1s", "2h", " 1 s"])
def test_bad_durations(text):
    with pytest.raises(BadRequest):
        parse_duration(text, "5m")


@pytest.mark.parametrize(
    "body",
    [
        {"cpus": "2"},
        {"ram_bytes": -1},
        {"persistent": "yes"},
        {"tags": "a"},
        {"gpu_count": 1},
        {"unknown": 1},
        {"userdata": "x" * ((1 << 20) + 1)},
        {"import_user": "bad user"},
        {"github_user": "a", "import_user": "b"},
    ],
)
def test_create_request_rejects(body):
    with pytest.raises(ValidationError):
        CreateNodeRequest.model_validate(body)


def test_create_request_accepts_seed_shapes():
    assert CreateNodeRequest.model_validate({}).spec().userdata is None
    r = CreateNodeRequest.model_validate({"userdata": "apt update", "github_user": "alex", "tags": ["ci"]})
    assert r.spec().import_user == "alex" and r.spec().tags == ["ci"]


SLICER_CONFIGS = sorted((Path(__file__).parent / "data" / "slicer-configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SLICER_CONFIGS, ids=lambda p: p.stem)
def test_slicer_doc_configs_load_or_are_refused_with_their_reason(path):
    """Configs written from the keys Slicer's docs document: those we support load; the others
    name what is refused (their first line says what)."""
    text = path.read_text()
    first = text.splitlines()[0]
    if first.startswith("# refused: "):
        with pytest.raises(BadRequest) as e:
            load_config(text)
        assert first.removeprefix("# refused: ") in e.value.message
    else:
        assert load_config(text).host_groups
