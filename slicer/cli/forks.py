"""``slicer vm tag|commit|commits|fork``: tags, commits of stopped VMs, and forks."""

from __future__ import annotations

from typing import Annotated

import typer

from slicer.cli._common import Json, Token, TokenFile, Url, client, dump, err, fail, handle, out, table
from slicer.cli.vm import vm_app

Repeat = Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")]


@vm_app.command("tag")
def vm_tag(hostname: str,
           add: Annotated[list[str] | None, typer.Option("--add", "-a", help="Tag to add (repeatable).")] = None,
           remove: Annotated[list[str] | None, typer.Option("--remove", "-r", help="Tag to remove (repeatable).")]
           = None,
           replace: Annotated[list[str] | None, typer.Option("--replace", help="Replace all tags (repeatable).")]
           = None,
           url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Show or change a VM's tags, all at once. Example: [bold]slicer vm tag vm-2 --add job=7 --remove idle[/bold]"""
    with client(url, token, token_file) as c:
        tags = handle(lambda: c.tags(hostname, add, remove, replace))
    dump(tags) if json else out.print(" ".join(tags.tags) or "(no tags)")


@vm_app.command("commit")
def vm_commit(hostname: str, tag: Repeat = None,
              label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE (repeatable).")] = None,
              cache_key: Annotated[str | None, typer.Option(help="Find the commit later by this key.")] = None,
              url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Freeze a stopped persistent VM's disk into an immutable commit to fork VMs from.

    The VM keeps working on top of it. Example: [bold]slicer vm commit vm-3 --cache-key deps-v2[/bold]
    """
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--label must be KEY=VALUE, not {item!r}")
        labels[key] = value
    with client(url, token, token_file) as c, err.status(f"committing {hostname}"):
        commit = handle(lambda: c.commit(hostname, tag, labels or None, cache_key))
    dump(commit) if json else out.print(f"[green]committed[/green] {hostname} as {commit.commit_id}")


@vm_app.command("commits")
def vm_commits(tag: Repeat = None, cache_key: str | None = None, source: str | None = None,
               delete: Annotated[str | None, typer.Option("--delete", help="Delete this commit instead.")] = None,
               url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """List commits (or [bold]--delete ID[/bold] one nothing depends on).

    Example: [bold]slicer vm commits --cache-key deps-v2[/bold]
    """
    with client(url, token, token_file) as c:
        if delete:
            handle(lambda: c.delete_commit(delete))
            out.print(f"[green]deleted[/green] {delete}")
            return
        commits = handle(lambda: c.commits(tag, cache_key, source))
    if json:
        dump(commits)
        return
    rows = [{"commit_id": x.commit_id, "source": x.source_hostname, "created_at": x.created_at[:19],
             "cache_key": x.cache_key, "tags": ",".join(x.tags)} for x in commits]
    table(rows, ["commit_id", "source", "created_at", "cache_key", "tags"])


@vm_app.command("fork")
def vm_fork(source: Annotated[str, typer.Argument(help="A running VM (live fork) or a commit id (cmt-…).")],
            count: Annotated[int, typer.Option("--count", "-n", help="Copies of a running VM.")] = 1,
            tag: Repeat = None,
            replace_tags: Annotated[bool, typer.Option(help="The tags given replace the inherited ones.")]
            = False,
            persistent: Annotated[bool, typer.Option(help="A commit's child survives shutdown.")] = False,
            wait: Annotated[bool, typer.Option(help="Return once the copies' agents answer.")] = True,
            timeout: str = "5m",
            url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Fork a running VM into COUNT live copies (memory, processes and files), or boot a VM from a commit.

    Examples: [bold]slicer vm fork sbx-2 --count 3 --tag try=fix[/bold];
    [bold]slicer vm fork cmt-0123456789abcdef --tag job=8[/bold]
    """
    with client(url, token, token_file) as c:
        if source.startswith("cmt-"):
            with err.status(f"forking {source}"):
                forks = [handle(lambda: c.fork_commit(
                    source, "agent" if wait else "none", timeout, tags=tag,
                    tag_mode="replace" if replace_tags else None, persistent=persistent))]
        else:
            with err.status(f"forking {source} into {count}"):
                forks = handle(lambda: c.fork(source, count, "agent" if wait else None, timeout, tags=tag))
    if json:
        dump(forks)
        return
    for f in forks:
        out.print(f"[green]forked[/green] {f.hostname}" + (f" ({f.ip})" if f.ip else ""))
