"""``slicer image pull|list|rm``: the cache of users' OCI images in the data directory."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from slicer.cli._common import human
from slicer.cli.daemon import DEFAULT_DATA_DIR, DataDir, err, image_app, tool_output
from slicer.image.oci import ImageStore, OCIError


@image_app.command("pull")
def image_pull(
    ref: Annotated[str, typer.Argument(help="OCI reference: registry/name:tag, docker://…, oci:DIR:tag, "
                                            "oci-archive:FILE, docker-archive:FILE.")],
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP / unverified TLS registry.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Pull an image (again, if cached) and make its disk, for [bold]image:[/bold] or [bold]disk_image[/bold].

    Example: [bold]slicer image pull --insecure 127.0.0.1:5000/app:1[/bold]
    """
    try:
        image = ImageStore.of(data_dir).pull(ref, insecure, progress=tool_output)
    except OCIError as e:
        err.print(f"[red]{escape(e.message)}[/red]")
        raise typer.Exit(1) from e
    typer.echo(image.digest)


@image_app.command("list")
def image_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The images in the cache, with their disk sizes. Example: [bold]slicer image list[/bold]"""
    images = [i.view() for i in ImageStore.of(data_dir).list()]
    if as_json:
        typer.echo(json.dumps(images, indent=2))
        return
    table = Table("REFERENCE", "DIGEST", "DISK", "FILES", "PULLED")
    for i in images:
        table.add_row(", ".join(i["refs"]) or "-", i["digest"].removeprefix("sha256:")[:12],
                      human(i["size_bytes"]), human(i["content_bytes"]), i["pulled_at"] or "-")
    from rich.console import Console

    Console().print(table)


@image_app.command("rm")
def image_rm(
    ref: Annotated[str, typer.Argument(help="A reference as pulled, or a digest (sha256:…).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Remove an image from the cache; refused while a VM or commit boots from it.

    Example: [bold]slicer image rm 127.0.0.1:5000/app:1[/bold]
    """
    from slicer.core.images import users_of_images
    store = ImageStore.of(data_dir)
    try:
        image = store.remove(ref, lambda digest: users_of_images(data_dir, store).get(digest))
    except OCIError as e:
        err.print(f"[red]{escape(e.message)}[/red]")
        raise typer.Exit(1) from e
    typer.echo(f"removed {image.digest}")


@image_app.command("prune")
def image_prune(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Remove every cached image no VM, commit or template boots from.

    A host group's image that no VM uses yet goes too: the daemon pulls it again at its next
    start. Example: [bold]slicer image prune[/bold]
    """
    from slicer.core.images import users_of_images
    store = ImageStore.of(data_dir)
    users = users_of_images(data_dir, store)
    for image in store.list():
        if image.digest in users:
            continue
        try:
            store.remove(image.digest, lambda d: users_of_images(data_dir, store).get(d))
        except OCIError as e:  # taken into use meanwhile
            err.print(f"[yellow]{e.message}[/yellow]")
            continue
        typer.echo(f"removed {image.digest} ({', '.join(image.meta.get('refs', [])) or 'no name'})")
