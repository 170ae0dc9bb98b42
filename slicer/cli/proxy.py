"""``slicer proxy …``: Slicer Proxy, the egress proxy whose rules and credentials live on the host
(the proxy itself with ``up``; clients, secrets and rules through the daemon's ``/proxy/v1``)."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from slicer.cli._common import Json, Token, TokenFile, Url, client, dump, fail, handle, out, table
from slicer.cli.daemon import DEFAULT_DATA_DIR, DataDir, app, err
from slicer.client import ProxyAllowRule

proxy_app = typer.Typer(
    help="Slicer Proxy: guests reach the web only through it, by rules you give (host, method, path, port), and it "
         "adds credentials on the way out so they never enter a VM. [bold]slicer proxy up[/bold] runs it; the other "
         "commands manage its clients, secrets and rules through the daemon (docs/proxy.md).",
    no_args_is_help=True,
)
app.add_typer(proxy_app, name="proxy")
client_app = typer.Typer(help="The proxy's clients: each has a token a guest gives the proxy as its password, and "
                              "its own allow rules.", no_args_is_help=True)
secret_app = typer.Typer(help="Credentials the proxy adds to requests (bearer or basic); their values stay on the "
                              "host and are never shown again.", no_args_is_help=True)
proxy_app.add_typer(client_app, name="client")
proxy_app.add_typer(secret_app, name="secret")


@proxy_app.command("up")
def proxy_up(
    hostgroup: Annotated[str, typer.Option("--hostgroup", "-g", help="The host group whose CA signs the "
                                           "certificates the proxy shows its guests.")],
    bind: Annotated[str, typer.Option("--bind", help="The address to listen on (ports 3128 and 3129). If no "
                                      "interface has it, a dummy adapter is made for it, and removed at exit.")],
    mode: Annotated[str, typer.Option("--mode", help="strict: refuse a CONNECT no rule allows. audit: intercept "
                                      "it, log its first request, answer 403.")] = "strict",
    deny_cidr: Annotated[list[str] | None, typer.Option("--deny-cidr", help="A network never reached, whatever a "
                         "rule or DNS says (checked after resolving); repeat for more. Loopback and link-local "
                         "are always denied.")] = None,
    san: Annotated[list[str] | None, typer.Option("--san", help="Accepted for Slicer's command line; not needed: "
                   "the proxy's certificate is minted for the address a guest connects to.")] = None,
    http_port: Annotated[int, typer.Option("--http-port", hidden=True)] = 3128,
    tls_port: Annotated[int, typer.Option("--tls-port", hidden=True)] = 3129,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run the proxy in the foreground (as root, on the daemon's host), one per bind address.

    Guests use it with [bold]HTTPS_PROXY=http://x:TOKEN@BIND:3128[/bold] (or [bold]https://…:3129[/bold] to speak
    TLS to the proxy too), where TOKEN is a client's token from [bold]slicer proxy client create[/bold]. Every
    decision is one audit line on stdout, and in [bold]GET /proxy/v1/audit[/bold]. Rule changes apply at once.

    Example: [bold]sudo slicer proxy up --hostgroup sbox --bind 192.168.222.1[/bold]
    """
    from slicer.core.ca import CAError
    from slicer.proxy import launch

    if mode not in ("strict", "audit"):
        err.print("[red]error:[/red] --mode is strict or audit")
        raise typer.Exit(2)
    try:
        ipaddress.ip_interface(bind if "/" in bind else f"{bind}/32")
        for cidr in deny_cidr or []:
            ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    if (why := launch.missing()) is not None:
        err.print(f"[red]error:[/red] {escape(why)}")
        raise typer.Exit(1)
    try:
        argv, env = launch.command(hostgroup, bind, Path(data_dir), mode, deny_cidr, http_port, tls_port)
    except (CAError, OSError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))} (run as root, or give --data-dir)")
        raise typer.Exit(1) from None
    os.execve(argv[0], argv, env)  # the proxy takes this process's place: signals reach it directly


# -- clients ---------------------------------------------------------------------------------------
@client_app.command("create")
def client_create(
    name: str,
    set_token: Annotated[str | None, typer.Option("--set-token", "--client-token", help="Use this token (8-512 "
                         "printable characters, no spaces) instead of a new random spt_… one. (--token is the "
                         "API token, as in every command.)")] = None,
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Make a proxy client and print its token on stdout, bare, for a script to keep: it is shown this once
    (the daemon keeps only a digest).

    A guest uses it as the proxy password: [bold]HTTPS_PROXY=http://x:TOKEN@BIND:3128[/bold].

    Example: [bold]TOKEN=$(slicer proxy client create agent-1)[/bold]
    """
    with client(url, token, token_file) as c:
        made = handle(lambda: c.create_proxy_client(name, set_token))
    if json:
        dump(made)
    else:
        sys.stdout.write(made.token + "\n")
    err.print(f"proxy client {escape(made.name)} created; its token is shown only this once")


@client_app.command("list")
def client_list(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """List the proxy's clients (never their tokens). Example: [bold]slicer proxy client list[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(c.proxy_clients)
    dump(rows) if json else table([r.model_dump() for r in rows], ["name", "created_at"])


@client_app.command("delete")
def client_delete(name: str, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Delete a client: its token stops working and its rules go with it.

    Example: [bold]slicer proxy client delete agent-1[/bold]
    """
    with client(url, token, token_file) as c:
        handle(lambda: c.delete_proxy_client(name))
    out.print(f"[green]deleted[/green] {escape(name)}")


# -- secrets ---------------------------------------------------------------------------------------
def _secret_value(value: str | None, value_file: str | None) -> str:
    if (value is None) == (value_file is None):
        fail("give --value or --value-file (--value-file - reads stdin)", 2)
    if value is not None:
        return value
    try:
        text = sys.stdin.read() if value_file == "-" else Path(str(value_file)).read_text()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {value_file}: {e}")
        raise
    return text.rstrip()  # a file's final newline is never part of a token


@secret_app.command("create")
def secret_create(
    name: str,
    host: Annotated[str, typer.Option("--host", help="The host the secret is for: a DNS name, *.suffix or *.")],
    type_: Annotated[str | None, typer.Option("--type", help="bearer (Authorization: Bearer VALUE, the default) "
                     "or basic (VALUE is user:password). The OAuth types are not supported yet.")] = None,
    value: Annotated[str | None, typer.Option("--value", help="The value (every local user sees it in the process "
                     "list: prefer --value-file).")] = None,
    value_file: Annotated[str | None, typer.Option("--value-file", "--from-file", help="Read the value from this "
                          "file, trailing whitespace trimmed; - reads stdin.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a secret of that name.")] = False,
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Store a credential for the proxy to add to a client's requests, where a rule names it
    ([bold]slicer proxy allow … --secret NAME[/bold]). The guest's own Authorization is dropped and this one
    sent: the value never enters a VM, and no answer shows it.

    Example: [bold]slicer proxy secret create gh --host api.github.com --value-file ~/.gh-token[/bold]
    """
    data = _secret_value(value, value_file)
    source = None if value_file in (None, "-") else str(Path(str(value_file)).absolute())
    with client(url, token, token_file) as c:
        s = handle(lambda: c.create_proxy_secret(name, host, data, type_, force, source))
    dump(s) if json else out.print(f"[green]created[/green] {escape(s.name)} ({s.type} for {escape(s.host)})")


@secret_app.command("list")
def secret_list(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """List the proxy's secrets (never their values). Example: [bold]slicer proxy secret list[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(c.proxy_secrets)
    columns = ["name", "host", "type", "created_at", "updated_at"]
    dump(rows) if json else table([{**r.model_dump(), "updated_at": r.updated_at or ""} for r in rows], columns)


@secret_app.command("delete")
def secret_delete(name: str, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Delete a secret. Rules that name it stop matching: they never turn into plain allows.

    Example: [bold]slicer proxy secret delete gh[/bold]
    """
    with client(url, token, token_file) as c:
        handle(lambda: c.delete_proxy_secret(name))
    out.print(f"[green]deleted[/green] {escape(name)}")


# -- rules -----------------------------------------------------------------------------------------
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``90``, ``30s``, ``10m``, ``1h``, ``2d``, ``1h30m`` → seconds."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = re.findall(r"(\d+)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"--ttl {text!r}: give a duration like 30s, 10m, 1h or 2d")
    return sum(int(n) * UNITS[u] for n, u in parts)


Client = Annotated[str, typer.Argument(metavar="client", help="The proxy client (slicer proxy client create).")]
Host = Annotated[str, typer.Option("--host", help="A DNS name, *.suffix (names under it) or * (any).")]
Methods = Annotated[list[str] | None, typer.Option("--method", help="Only this HTTP method; repeat for more "
                    "(default: any).")]
Paths = Annotated[list[str] | None, typer.Option("--path", help="Only this path: exact, * or /prefix/* (strictly "
                  "under it); repeat for more (default: any).")]
Ports = Annotated[list[int] | None, typer.Option("--port", help="Only this port; repeat for more "
                  "(default: 80 and 443).")]
Passthrough = Annotated[bool, typer.Option("--passthrough", help="Splice the TCP connection as it is: no TLS "
                        "interception, so no secret, methods or paths (e.g. SSH or a database).")]


@proxy_app.command("allow")
def allow(
    name: Client, host: Host,
    secret: Annotated[str | None, typer.Option("--secret", help="Add this proxy secret to the requests the rule "
                      "admits.")] = None,
    method: Methods = None, path: Paths = None, port: Ports = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="Let the rule expire after this long: 30s, 10m, 1h, "
                   "2d (default: never).")] = None,
    passthrough: Passthrough = False,
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Let a client reach a host, appended to its rules (tried in order; the first that matches wins).

    Requests are intercepted (TLS from the host group's CA) and each one is checked against the method and path
    filters; with [bold]--secret[/bold] the proxy adds the credential. Applies to the next connection, with
    nothing restarted.

    Example: [bold]slicer proxy allow agent-1 --host api.github.com --secret gh --method GET --path '/repos/*'
    --ttl 1h[/bold]
    """
    try:
        seconds = parse_ttl(ttl) if ttl else None
    except ValueError as e:
        fail(str(e), 2)
        raise
    with client(url, token, token_file) as c:
        rule = handle(lambda: c.add_proxy_allow(name, host, secret, method, path, port, seconds, passthrough))
    if json:
        dump(rule)
    else:
        until = f" until {rule.expires}" if rule.expires else ""
        out.print(f"[green]allowed[/green] {escape(name)} to {escape(rule.host)}{until}")


@proxy_app.command("revoke")
def revoke(
    name: Client, host: Host, method: Methods = None, path: Paths = None, port: Ports = None,
    passthrough: Passthrough = False,
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Remove a client's rules for a host: all of them, or with filters the one rule with exactly that host,
    methods, paths, ports and passthrough (its secret does not matter).

    Example: [bold]slicer proxy revoke agent-1 --host api.github.com --method GET --path '/repos/*'[/bold]
    """
    with client(url, token, token_file) as c:
        if method or path or port or passthrough:
            handle(lambda: c.revoke_proxy_allow(name, host, method, path, port, passthrough))
            out.print(f"[green]revoked[/green] the rule of {escape(name)} for {escape(host)}")
        else:
            handle(lambda: c.remove_proxy_allow(name, host))
            out.print(f"[green]revoked[/green] every rule of {escape(name)} for {escape(host)}")


def rule_row(rule: ProxyAllowRule) -> dict:
    """A rule as ``slicer proxy rules`` shows it: what an empty filter means, spelled out."""
    return {"host": rule.host, "secret": rule.secret or "-", "mode": "passthrough" if rule.passthrough else "mitm",
            "methods": ",".join(rule.methods or []) or "*",
            "ports": ",".join(str(p) for p in rule.ports or []) or "80,443",
            "paths": ",".join(rule.paths or []) or "*", "expires": rule.expires or "never"}


@proxy_app.command("rules")
def rules(name: Client, url: Url = None, token: Token = None, token_file: TokenFile = None,
          json: Json = False) -> None:
    """List a client's allow rules in the order they are tried (expired ones are gone).

    MODE is mitm (requests intercepted, checked and logged) or passthrough (TCP spliced).

    Example: [bold]slicer proxy rules agent-1[/bold]
    """
    with client(url, token, token_file) as c:
        found = handle(lambda: c.proxy_rules(name))
    columns = ["host", "secret", "mode", "methods", "ports", "paths", "expires"]
    dump(found) if json else table([rule_row(r) for r in found], columns)


def parse_since(text: str) -> str:
    """An RFC 3339 time as it is, or a duration (``10m``) as that long ago."""
    try:
        ago = parse_ttl(text)
    except ValueError:
        return text
    return datetime.fromtimestamp(datetime.now(UTC).timestamp() - ago, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@proxy_app.command("audit")
def audit(
    name: Annotated[str | None, typer.Option("--client", help="Only this client's decisions.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only from this time: RFC 3339 "
                     "(2026-01-02T15:04:05Z) or a duration ago (10m, 1h).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many, the newest.")] = 100,
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Show the proxies' decisions, oldest first: each request allowed or denied, with the secret injected or
    the reason for a denial (as [bold]slicer proxy up[/bold] logs them).

    Example: [bold]slicer proxy audit --client agent-1 --since 10m[/bold]
    """
    with client(url, token, token_file) as c:
        found = handle(lambda: c.proxy_audit(name, parse_since(since) if since else None, limit))
    if json:
        dump(found)
        return
    rows = [{**e.model_dump(), "detail": " ".join(f"{k}={v}" for k, v in (("inject", e.inject), ("reason", e.reason),
                                                                        ("mode", e.mode)) if v)}
            for e in found]
    for row in rows:
        row.update({k: "" if row[k] is None else row[k] for k in ("client", "method", "host", "port", "path",
                                                                    "status")})
    table(rows, ["time", "msg", "client", "method", "host", "port", "path", "status", "detail"])
