"""``slicer ca init|issue``: a host group's CA on this host (no daemon needed; slicer.core.ca)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from slicer.cli.daemon import DEFAULT_DATA_DIR, DataDir, _logging, app, err

ca_app = typer.Typer(
    help="A host group's certificate authority: what its VMs trust with [bold]ca: {generate: true}[/bold] and what "
         "the egress proxy signs with. Files live in DATA_DIR/ca/GROUP/ (root's only).",
    no_args_is_help=True,
)
app.add_typer(ca_app, name="ca")
HostGroupOpt = Annotated[str, typer.Option("--hostgroup", "-g", help="The host group whose CA this is.")]


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


@ca_app.command("init")
def ca_init(
    hostgroup: HostGroupOpt,
    force: Annotated[bool, typer.Option("--force", help="Make a new CA even if a valid one exists.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Make the host group's CA (RSA 2048, 3 years), or show the one there is; print its path.

    The daemon makes it by itself at start for a group with [bold]ca: {generate: true}[/bold], and makes it anew when
    it ends within 7 days. After [bold]--force[/bold], restart the daemon so that VMs trust the new one.

    Example: [bold]sudo slicer ca init --hostgroup sbox[/bold]
    """
    from slicer.core.ca import CAError, ensure_group_ca, load_group_ca

    _logging()  # the "[CA] ... generated CA" line
    try:
        cert_path, key_path = ensure_group_ca(data_dir, hostgroup, force=force)
        cert, _ = load_group_ca(data_dir, hostgroup)
    except (CAError, OSError) as e:
        _fail(f"{e} (the CA lives in {data_dir / 'ca'}: run as root, or give --data-dir)")
        return
    typer.echo(str(cert_path))
    err.print(f"CA of host group {escape(hostgroup)}: {cert.subject.rfc4514_string()}, expires "
              f"{cert.not_valid_after_utc:%Y-%m-%d}; key {escape(str(key_path))} (0600)")


@ca_app.command("issue")
def ca_issue(
    hostgroup: HostGroupOpt,
    host: Annotated[list[str], typer.Option(
        "--host", help="A name (DNS SAN) or an IP address (IP SAN) the certificate is for; repeat for more.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes OUT.crt (with the CA after it) and OUT.key (0600).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Issue a server certificate (1 year, serverAuth) signed by the host group's CA.

    For a service the group's VMs reach over TLS: they trust it already. The CA is made first if there is none.

    Example: [bold]sudo slicer ca issue --hostgroup sbox --host registry.internal --host 192.168.137.1 --out
    ./registry[/bold] writes registry.crt and registry.key
    """
    from slicer.core.ca import CAError, issue_leaf

    _logging()
    try:
        crt, key = issue_leaf(data_dir, hostgroup, host, out)
    except (CAError, OSError) as e:
        _fail(str(e))
        return
    typer.echo(f"{crt}\n{key}")
