"""The mitmproxy addon that makes mitmproxy Slicer's proxy: it authenticates each connection by its
token, lets the first matching rule decide, splices passthrough tunnels, swaps the guest's
``Authorization`` for the secret's, refuses upstreams in denied networks after resolving them
(and connects to the address it checked), and writes an audit line per decision.

It fails closed: a hook that raises refuses its flow (mitmproxy would log the error and forward
the request unchecked), and an intercepted tunnel carries TLS and HTTP only (mitmproxy would relay
anything else as raw TCP, past every method and path filter).

Runs in the proxy's own virtualenv (mitmproxy pins what it needs); see slicer.proxy.server.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import connection, http, tcp, tls
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.proxy.layers.http import HTTPMode

from slicer.proxy.audit import AuditLog
from slicer.proxy.policy import Policy
from slicer.proxy.rules import normal_host

log = logging.getLogger("slicer.proxy")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Never reached through the proxy, whatever a rule or a DNS answer says: loopback, link-local,
# clouds' metadata addresses, multicast and broadcast; the host's own addresses are added at start
# (server.local_networks) and --deny-cidr adds the operator's.
ALWAYS_DENIED = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128", "100.100.100.200/32",
                 "fd00:ec2::254/128", "224.0.0.0/4", "255.255.255.255/32", "ff00::/8")
DNS_TIMEOUT = 5.0
LOOKUPS_PER_CLIENT = 8  # at once: a client whose lookups hang cannot take the resolver's threads from others


@dataclass
class Tunnel:
    """What a CONNECT decided, for the requests and the TLS handshake that follow on it."""

    client: str
    digest: str  # the token it came with: a client deleted and made again does not inherit the tunnel
    host: str
    port: int
    passthrough: bool = False
    audit_only: bool = False  # --mode audit, no rule: intercepted, logged, refused
    started: float = field(default_factory=time.monotonic)


def _deny(status: int, text: str, **headers: str) -> http.Response:
    return http.Response.make(status, text.encode() + b"\n", {"Content-Type": "text/plain", **headers})


def fail_closed(hook: Callable) -> Callable:
    """A hook that raises refuses what it was deciding, rather than letting mitmproxy go on."""

    @functools.wraps(hook)
    def guarded(self: SlicerProxy, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            log.exception("proxy hook %s failed; the request is refused", hook.__name__)
            flow.response = _deny(500, "slicer proxy: internal error; the request is refused")

    return guarded


class SlicerProxy:
    def __init__(self, policy: Policy, audit: AuditLog, mode: str = "strict", deny_cidrs: tuple[str, ...] = ()) -> None:
        self.policy = policy
        self.audit = audit
        self.mode = mode
        self.denied: list[Network] = [ipaddress.ip_network(c, strict=False) for c in (*ALWAYS_DENIED, *deny_cidrs)]
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, Tunnel] = weakref.WeakKeyDictionary()
        self.lookups: defaultdict[str, int] = defaultdict(int)

    # -- who is asking ----------------------------------------------------------------------------
    def _authenticate(self, flow: http.HTTPFlow) -> tuple[str, str] | None:
        header = flow.request.headers.get("Proxy-Authorization", "")
        found = self.policy.client(header) if header else None
        flow.request.headers.pop("Proxy-Authorization", None)  # never passed upstream
        if found is None:
            flow.response = _deny(407, "proxy authentication required: the client token as the proxy password",
                                  **{"Proxy-Authenticate": 'Basic realm="slicer"'})
            self.audit.write(msg="deny", host=flow.request.host, port=flow.request.port, status=407,
                             reason="bad-token")
        return found

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        found = self._authenticate(flow)
        if found is None:
            return
        client, digest = found
        host, port = flow.request.host, flow.request.port
        decision = self.policy.connect(client, host, port)
        if not decision.allow and self.mode != "audit":
            flow.response = _deny(403, f"slicer proxy: no rule allows {host}:{port}")
            self.audit.write(msg="deny", client=client, host=host, port=port, status=403, reason=decision.reason)
            return
        passthrough = bool(decision.rule and decision.rule.passthrough)
        self.tunnels[flow.client_conn] = Tunnel(client, digest, host, port, passthrough, audit_only=not decision.allow)
        if not decision.allow:  # audit mode: answer the CONNECT ourselves; no upstream is ever dialled
            flow.response = http.Response(flow.request.data.http_version, 200, b"Connection established",
                                          http.Headers(), b"", None, time.time(), time.time())
        if passthrough:
            self.audit.write(msg="allow", client=client, scheme="tcp", host=host, port=port, mode="passthrough")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """What a tunnel carries: a passthrough one is spliced whatever its bytes are; an
        intercepted one is TLS and HTTP only (raw TCP, DNS or QUIC would bypass every filter:
        they are parsed as HTTP instead, which refuses them)."""
        context = nextlayer.context
        tunnel = self.tunnels.get(context.client)
        if tunnel is None or context.server.address is None:
            return
        if tunnel.passthrough:
            nextlayer.layer = layers.TCPLayer(context, ignore=True)
        elif nextlayer.layer is not None and not isinstance(
                nextlayer.layer, layers.HttpLayer | layers.ServerTLSLayer | layers.ClientTLSLayer):
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        tunnel = self.tunnels.get(data.context.client)
        if tunnel is None or data.context.server.address is None:
            return
        if tunnel.passthrough:
            data.ignore_connection = True  # splice: the guest talks TLS with the upstream itself
            return
        try:
            ipaddress.ip_address(tunnel.host)
        except ValueError:  # the upstream is verified, and named, by the host the rule admitted
            data.context.server.sni = tunnel.host

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Raw TCP (a 101 without WebSocket, anything that slipped past next_layer) is never relayed."""
        flow.kill()

    # -- each request -----------------------------------------------------------------------------
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.method == "CONNECT" or flow.response is not None:
            return
        req = flow.request
        tunnel = self.tunnels.get(flow.client_conn)
        if tunnel is not None:  # inside a CONNECT: the tunnel's token and destination hold
            if not self.policy.holds(tunnel.client, tunnel.digest):
                flow.response = _deny(407, "slicer proxy: this tunnel's client token is no longer valid")
                self.audit.write(msg="deny", client=tunnel.client, host=tunnel.host, port=tunnel.port, status=407,
                                 reason="bad-token")
                return
            client = tunnel.client
            req.headers.pop("Proxy-Authorization", None)
            # the rules apply to the CONNECT's destination (mitmproxy's request.host is then the
            # address this addon connected to)
            host, port = tunnel.host, tunnel.port
        else:  # plain HTTP through the proxy (absolute-form): every request carries its token
            found = self._authenticate(flow)
            if found is None:
                return
            client = found[0]
            host, port = req.host, req.port
        entry = dict(client=client, method=req.method, scheme=req.scheme, host=host, port=port, path=req.path)
        if not self._names_only(req, host):
            # the rules matched this host; a request naming another (Host, an absolute URI, HTTP/2's
            # :authority) would be routed there by the upstream: domain fronting
            flow.response = _deny(403, "slicer proxy: the request names a host other than the one allowed")
            self.audit.write(msg="deny", **entry, status=403, reason="host-mismatch")
            return
        if tunnel is not None and tunnel.audit_only:
            flow.response = _deny(403, "slicer proxy (audit mode): no rule allows this host")
            self.audit.write(msg="deny", **entry, status=403, mode="audit", reason="no-rule")
            return
        decision = self.policy.request(client, host, port, req.method, req.path)
        if not decision.allow:
            flow.response = _deny(403, f"slicer proxy: {decision.reason}")
            self.audit.write(msg="deny", **entry, status=403, reason=decision.reason)
            return
        if decision.inject:
            if req.scheme != "https":  # a credential never crosses the network in the clear
                flow.response = _deny(403, "slicer proxy: a rule with a secret applies to HTTPS only")
                self.audit.write(msg="deny", **entry, status=403, reason="secret-needs-tls")
                return
            req.headers.pop("Authorization", None)  # the guest's own credential never goes with ours
            req.headers["Authorization"] = decision.inject
        flow.metadata["slicer"] = {**entry, "inject": decision.secret}

    @staticmethod
    def _names_only(req: http.Request, host: str) -> bool:
        for value in (req.host_header, req.authority):
            if not value:
                continue
            name = value.rsplit("]", 1)[0].lstrip("[") if value.startswith("[") else value.rsplit(":", 1)[0]
            if normal_host(name) != normal_host(host):
                return False
        return True

    def response(self, flow: http.HTTPFlow) -> None:
        entry = flow.metadata.get("slicer")
        if entry is not None and flow.response is not None:
            self.audit.write(msg="allow", **entry, status=flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        entry = flow.metadata.get("slicer")
        if entry is not None:
            reason = flow.error.msg if flow.error else "upstream error"
            self.audit.write(msg="allow", **entry, status=502, reason=reason)

    # -- where the upstream is --------------------------------------------------------------------
    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Resolve the upstream once, check every answer against the denied networks, and connect
        to the address checked (a second lookup could answer differently: DNS rebinding)."""
        if data.server.address is None:
            return
        host, port = data.server.address[:2]
        tunnel = self.tunnels.get(data.client)
        client = tunnel.client if tunnel else ""
        if self.lookups[client] >= LOOKUPS_PER_CLIENT:
            data.server.error = "too many name lookups at once for this client"
            return
        self.lookups[client] += 1
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT)
        except (OSError, TimeoutError) as e:
            data.server.error = f"cannot resolve {host}: {e or 'timed out'}"
            return
        finally:
            self.lookups[client] -= 1
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        addresses = [a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a for a in addresses]
        for address in addresses:
            if any(address in net for net in self.denied):
                data.server.error = f"{host} resolves to {address}, in a denied network"
                self.audit.write(msg="deny", client=client, host=host, port=port, reason="denied-network", status=403)
                return
        data.server.address = (str(addresses[0]), port)

    def client_disconnected(self, client: connection.Client) -> None:
        tunnel = self.tunnels.pop(client, None)
        if tunnel is not None and tunnel.passthrough:
            self.audit.write(msg="close", client=tunnel.client, scheme="tcp", host=tunnel.host, port=tunnel.port,
                             mode="passthrough", duration_ms=round((time.monotonic() - tunnel.started) * 1000))
