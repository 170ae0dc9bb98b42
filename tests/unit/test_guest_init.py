"""The guest init's network setup from the kernel command line (slicer.agent.init): one
``ip -force -batch`` script, and resolv.conf only for a VM with an address."""

from __future__ import annotations

import pytest

from slicer.agent import init


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[str, ...], str | None]]:
    calls: list[tuple[tuple[str, ...], str | None]] = []
    monkeypatch.setattr(init, "run", lambda *cmd, stdin=None: calls.append((cmd, stdin)))
    return calls


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The name servers each resolv.conf written would list."""
    servers: list[list[str]] = []
    monkeypatch.setattr(init, "write_resolv_conf", servers.append)
    return servers


def test_one_ip_process_sets_lo_mac_address_and_route(ran, written) -> None:
    init.setup_network({"slicer.ip": "192.168.1.2/24", "slicer.gw": "192.168.1.1", "slicer.mac": "02:5c:c0:a8:01:02",
                        "slicer.dns": "1.1.1.1,8.8.8.8"})
    assert ran == [(("ip", "-force", "-batch", "-"),
                    "link set lo up\nlink set eth0 address 02:5c:c0:a8:01:02\n"
                    "addr add 192.168.1.2/24 dev eth0\nlink set eth0 up\nroute add default via 192.168.1.1\n")]
    assert written == [["1.1.1.1", "8.8.8.8"]]


def test_without_an_address_only_loopback_and_no_resolv_conf(ran, written) -> None:
    init.setup_network({"slicer.dns": "1.1.1.1"})
    assert ran == [(("ip", "-force", "-batch", "-"), "link set lo up\n")]
    assert written == []


def test_mac_and_gateway_are_optional(ran) -> None:
    init.setup_network({"slicer.ip": "10.0.0.2/30"})
    assert ran == [(("ip", "-force", "-batch", "-"),
                    "link set lo up\naddr add 10.0.0.2/30 dev eth0\nlink set eth0 up\n")]
