"""``slicer vm suspend|restore|relaunch``, ``slicer template …`` and ``slicer storage``."""

from __future__ import annotations

from typing import Annotated

import typer

from slicer.cli._common import Json, Token, TokenFile, Url, client, dump, err, handle, human, out, table
from slicer.cli.daemon import app
from slicer.cli.vm import vm_app

template_app = typer.Typer(
    help="Templates: one booted, saved VM per host group that its sandboxes restore from in about a second.",
    no_args_is_help=True,
)
app.add_typer(template_app, name="template")
Wait = Annotated[str | None, typer.Option(help="agent or userdata: return once ready; '' to return at once.")]


@vm_app.command("suspend")
def vm_suspend(hostname: str, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Save a VM's memory to the host's disk and stop it; [bold]restore[/bold] brings it back where it was.

    Example: [bold]slicer vm suspend vm-2[/bold]
    """
    with client(url, token, token_file) as c, err.status(f"suspending {hostname}"):
        out.print(handle(lambda: c.suspend(hostname)).strip())


@vm_app.command("restore")
def vm_restore(hostname: str, wait: Wait = "agent", timeout: str = "5m",
               url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Restore a suspended VM: its processes go on where they were. Example: [bold]slicer vm restore vm-2[/bold]"""
    with client(url, token, token_file) as c, err.status(f"restoring {hostname}"):
        out.print(handle(lambda: c.restore(hostname, wait or None, timeout)).strip())


@vm_app.command("relaunch")
def vm_relaunch(hostname: str, wait: Wait = "agent", timeout: str = "5m",
                url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Boot a shut-down persistent VM (or a crashed one) again from its disk.

    A suspended VM is booted too, and its saved memory discarded. Example: [bold]slicer vm relaunch vm-3[/bold]
    """
    with client(url, token, token_file) as c, err.status(f"relaunching {hostname}"):
        node = handle(lambda: c.relaunch(hostname, wait or None, timeout))
    dump(node) if json else out.print(f"[green]relaunched[/green] {node.hostname} ({node.ip})")


app.command("relaunch", help="Same as [bold]slicer vm relaunch[/bold].")(vm_relaunch)


@template_app.command("build")
def template_build(group: str, url: Url = None, token: Token = None, token_file: TokenFile = None,
                   json: Json = False) -> None:
    """Build a host group's template now (else the group's first sandbox builds it).

    Example: [bold]slicer template build sbx[/bold]
    """
    with client(url, token, token_file) as c, err.status(f"building the template of {group} (a cold boot)"):
        tpl = handle(lambda: c.build_template(group))
    dump(tpl) if json else out.print(f"[green]template[/green] {tpl.name} ({human(tpl.state_bytes + tpl.disk_bytes)})")


def _template_rows(storage) -> list[dict]:
    return [{**t.model_dump(), "memory+state": human(t.state_bytes), "disk": human(t.disk_bytes)}
            for t in storage.templates]


@template_app.command("list")
def template_list(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """List templates with what they take on disk and how many VMs use them."""
    with client(url, token, token_file) as c:
        storage = handle(c.storage)
    if json:
        dump(storage.templates)
        return
    table(_template_rows(storage), ["name", "hostgroup", "cpus", "clones", "retired", "memory+state", "disk"])


@app.command()
def storage(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Show what templates, VM disks, saved states, commits and kept disks take on the host's disk.

    Example: [bold]slicer storage[/bold]
    """
    with client(url, token, token_file) as c:
        s = handle(c.storage)
    if json:
        dump(s)
        return
    table(_template_rows(s), ["name", "hostgroup", "clones", "retired", "memory+state", "disk"], title="Templates")
    rows = [{**n.model_dump(), "disk_used": human(n.disk_bytes), "saved_state": human(n.state_bytes)} for n in s.nodes]
    table(rows, ["hostname", "hostgroup", "status", "template", "disk_used", "saved_state"], title="VMs")
    if s.commits:
        table([{**c, "disk_used": human(c.get("disk_bytes", 0))} for c in s.commits],
              ["commit_id", "source_hostname", "disk_used"], title="Commits")
    if s.kept_disks:
        table([{"disk": k.disk, "disk_used": human(k.disk_bytes)} for k in s.kept_disks], ["disk", "disk_used"],
              title="Disks kept from deleted persistent VMs")
    out.print(f"total: {human(s.total_bytes)}")
