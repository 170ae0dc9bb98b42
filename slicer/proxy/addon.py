"""The mitmproxy addon that makes mitmproxy Slicer's proxy: it authenticates each connection by its
token, lets the first matching rule decide, splices passthrough tunnels, swaps the guest's
``Authorization`` for the secret's, refuses upstreams in denied networks after resolving them
(and connects to the address it checked), and writes an audit line per decision.

Runs in the proxy's own virtualenv (mitmproxy pins what it needs); see slicer.proxy.server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import weakref
from dataclasses import dataclass, field

from mitmproxy import connection, http, tls
from mitmproxy.proxy import server_hooks

from slicer.proxy.audit import AuditLog
from slicer.proxy.policy import Policy
from slicer.proxy.rules import normal_host

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Never reached through the proxy, whatever a rule or a DNS answer says: the host's own loopback
# and link-local space (cloud metadata); --deny-cidr adds to these.
ALWAYS_DENIED = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128")


@dataclass
class Tunnel:
    """What a CONNECT decided, for the requests and the TLS handshake that follow on it."""

    client: str
    host: str
    port: int
    passthrough: bool = False
    audit_only: bool = False  # --mode audit, no rule: intercepted, logged, refused
    started: float = field(default_factory=time.monotonic)


def _deny(status: int, text: str, **headers: str) -> http.Response:
    return http.Response.make(status, text.encode() + b"\n", {"Content-Type": "text/plain", **headers})


class SlicerProxy:
    def __init__(self, policy: Policy, audit: AuditLog, mode: str = "strict", deny_cidrs: tuple[str, ...] = ()) -> None:
        self.policy = policy
        self.audit = audit
        self.mode = mode
        self.denied: list[Network] = [ipaddress.ip_network(c, strict=False) for c in (*ALWAYS_DENIED, *deny_cidrs)]
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, Tunnel] = weakref.WeakKeyDictionary()

    # -- who is asking ----------------------------------------------------------------------------
    def _authenticate(self, flow: http.HTTPFlow) -> str | None:
        header = flow.request.headers.get("Proxy-Authorization", "")
        client = self.policy.client(header) if header else None
        flow.request.headers.pop("Proxy-Authorization", None)  # never passed upstream
        if client is None:
            flow.response = _deny(407, "proxy authentication required: the client token as the proxy password",
                                  **{"Proxy-Authenticate": 'Basic realm="slicer"'})
            self.audit.write(msg="deny", host=flow.request.host, port=flow.request.port, status=407,
                             reason="bad-token")
        return client

    def http_connect(self, flow: http.HTTPFlow) -> None:
        client = self._authenticate(flow)
        if client is None:
            return
        host, port = flow.request.host, flow.request.port
        decision = self.policy.connect(client, host, port)
        if not decision.allow and self.mode != "audit":
            flow.response = _deny(403, f"slicer proxy: no rule allows {host}:{port}")
            self.audit.write(msg="deny", client=client, host=host, port=port, status=403, reason=decision.reason)
            return
        passthrough = bool(decision.rule and decision.rule.passthrough)
        self.tunnels[flow.client_conn] = Tunnel(client, host, port, passthrough, audit_only=not decision.allow)
        if passthrough:
            self.audit.write(msg="allow", client=client, scheme="tcp", host=host, port=port, mode="passthrough")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        tunnel = self.tunnels.get(data.context.client)
        if tunnel is not None and tunnel.passthrough:
            data.ignore_connection = True  # splice: the guest talks TLS with the upstream itself

    # -- each request -----------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.method == "CONNECT" or flow.response is not None:
            return
        req = flow.request
        tunnel = self.tunnels.get(flow.client_conn)
        if tunnel is not None:  # inside a CONNECT: the tunnel's token and destination hold
            client = tunnel.client
            req.headers.pop("Proxy-Authorization", None)
        else:  # plain HTTP through the proxy (absolute-form): every request carries its token
            client = self._authenticate(flow)
            if client is None:
                return
        # Inside a tunnel the rules apply to the CONNECT's destination (mitmproxy's request.host
        # is then the address this addon connected to).
        host, port = (tunnel.host, tunnel.port) if tunnel is not None else (req.host, req.port)
        entry = dict(client=client, method=req.method, scheme=req.scheme, host=host, port=port, path=req.path)
        if tunnel is not None and normal_host(req.pretty_host) != normal_host(tunnel.host):
            # the rules matched the CONNECT's host; a request naming another one (domain fronting) is refused
            flow.response = _deny(403, "slicer proxy: the request's Host differs from the tunnel's")
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
        if decision.inject:  # the guest's own credential never goes upstream with ours
            req.headers.pop("Authorization", None)
            req.headers["Authorization"] = decision.inject
        flow.metadata["slicer"] = {**entry, "inject": decision.secret}

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
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            data.server.error = f"cannot resolve {host}: {e}"
            return
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        addresses = [a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a for a in addresses]
        for address in addresses:
            if any(address in net for net in self.denied):
                data.server.error = f"{host} resolves to {address}, in a denied network"
                tunnel = self.tunnels.get(data.client)
                self.audit.write(msg="deny", client=tunnel.client if tunnel else "", host=host, port=port,
                                 reason="denied-network", status=403)
                return
        if data.server.tls and data.server.sni is None:
            data.server.sni = host  # verify the upstream by the name asked for, not the address
        data.server.address = (str(addresses[0]), port)

    def client_disconnected(self, client: connection.Client) -> None:
        tunnel = self.tunnels.pop(client, None)
        if tunnel is not None and tunnel.passthrough:
            self.audit.write(msg="close", client=tunnel.client, scheme="tcp", host=tunnel.host, port=tunnel.port,
                             mode="passthrough", bytes=None,
                             duration_ms=round((time.monotonic() - tunnel.started) * 1000))
