"""``slicer bg …`` (also ``slicer vm bg …``): commands that run on in a VM after the call returns."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from slicer.cli._common import Json, Token, TokenFile, Url, client, dump, fail, handle, out, table
from slicer.cli.daemon import app
from slicer.cli.vm import vm_app

bg_app = typer.Typer(help="Background commands: start, list, follow their logs, signal, wait, remove.",
                     no_args_is_help=True)
app.add_typer(bg_app, name="bg")
vm_app.add_typer(bg_app, name="bg")

ExecId = Annotated[str, typer.Argument(help="The id `bg exec` printed (ex_…).")]


def _duration_seconds(text: str) -> int:
    """``10m``, ``90s``, ``1h`` or plain seconds (Go-style durations, as Slicer's CLI takes)."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        fail(f"not a duration: {text!r} (try 30s, 10m)")
        raise


@bg_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bg_exec(
    hostname: str,
    command: Annotated[list[str] | None, typer.Argument(help="Command and arguments (after --).")] = None,
    cmd: Annotated[str | None, typer.Option("-c", "--cmd", help="The command (instead of after --).")] = None,
    arg: Annotated[list[str] | None, typer.Option("-a", "--arg", help="An argument for -c (repeatable).")] = None,
    shell: Annotated[str | None, typer.Option("-s", "--shell", help="Run it with this shell; '' runs it directly.")]
    = None,
    uid: int | None = None, gid: int | None = None, cwd: str | None = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")] = None,
    ring_bytes: Annotated[int | None, typer.Option(help="Output kept for `bg logs` (default 1 MiB).")] = None,
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Start a command that runs on after this returns; prints its id.
    Examples: [bold]slicer bg exec vm-1 --cwd /app -- npm run dev[/bold],
    [bold]slicer bg exec vm-1 -c npm -a run -a dev[/bold]"""
    argv = [cmd, *(arg or [])] if cmd else list(command or [])
    if not argv:
        fail("give the command after --, or with -c")
    envs = dict(e.split("=", 1) for e in env or [] if "=" in e)
    options = {k: v for k, v in (("uid", uid), ("gid", gid), ("cwd", cwd), ("shell", shell),
                                 ("ring_bytes", ring_bytes)) if v is not None}
    with client(url, token, token_file) as c:
        started = handle(lambda: c.exec_background(hostname, argv[0], args=argv[1:], env=envs, **options))
    dump(started) if json else out.print(started.exec_id)


@bg_app.command("list")
def bg_list(hostname: str, url: Url = None, token: Token = None, token_file: TokenFile = None,
            json: Json = False) -> None:
    """Background commands of a VM. Example: [bold]slicer bg list vm-1[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(lambda: c.background_execs(hostname))
    dump(rows) if json else table([r.model_dump() for r in rows], ["exec_id", "pid", "running", "exit_code"])


@bg_app.command("info")
def bg_info(hostname: str, exec_id: ExecId, url: Url = None, token: Token = None, token_file: TokenFile = None,
            json: Json = False) -> None:
    """One background command. Example: [bold]slicer bg info vm-1 ex_abc123[/bold]"""
    with client(url, token, token_file) as c:
        info = handle(lambda: c.background_info(hostname, exec_id))
    dump(info) if json else table([info.model_dump()], ["exec_id", "pid", "running", "exit_code"])


@bg_app.command("logs")
def bg_logs(hostname: str, exec_id: ExecId,
            follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until it exits.")] = False,
            from_id: Annotated[int | None, typer.Option(help="Replay from this frame id.")] = None,
            url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Its output (replayed, then followed with -f). Example: [bold]slicer bg logs vm-1 ex_abc123 -f[/bold]"""
    with client(url, token, token_file) as c:
        def run() -> None:
            for f in c.background_logs(hostname, exec_id, follow=follow, from_id=from_id):
                stream = sys.stderr if f.type == "stderr" else sys.stdout
                if f.type in ("stdout", "stderr"):
                    stream.write(f.data)
                    stream.flush()
                elif f.type == "gap":
                    print(f"[{f.model_dump().get('message', 'frames were evicted')}]", file=sys.stderr)

        handle(run)


@bg_app.command("kill")
def bg_kill(hostname: str, exec_id: ExecId, signal: str = "TERM",
            grace: Annotated[str, typer.Option(help="Then KILL after this long (e.g. 5s).")] = "5s",
            url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Signal it (TERM, then KILL after --grace). Example: [bold]slicer bg kill vm-1 ex_abc123 --grace 5s[/bold]"""
    with client(url, token, token_file) as c:
        result = handle(lambda: c.background_kill(hostname, exec_id, signal, _duration_seconds(grace) * 1000))
    dump(result) if json else out.print(f"signalled {exec_id}")


@bg_app.command("wait")
def bg_wait(hostname: str, exec_id: ExecId, timeout: str = "30s", url: Url = None, token: Token = None,
            token_file: TokenFile = None, json: Json = False) -> None:
    """Wait for it to exit; exits with its code. Example: [bold]slicer bg wait vm-1 ex_abc123 --timeout 10m[/bold]"""
    with client(url, token, token_file) as c:
        result = handle(lambda: c.background_wait(hostname, exec_id, _duration_seconds(timeout)))
    if json:
        dump(result)
    if result.get("timed_out") or result.get("running"):
        fail(f"{exec_id} still runs after {timeout}")
    raise typer.Exit(int(result.get("exit_code") or 0))


@bg_app.command("remove")
def bg_remove(hostname: str, exec_id: ExecId, url: Url = None, token: Token = None,
              token_file: TokenFile = None) -> None:
    """Forget it (and its logs). Example: [bold]slicer bg remove vm-1 ex_abc123[/bold]"""
    with client(url, token, token_file) as c:
        handle(lambda: c.background_delete(hostname, exec_id))
    out.print(f"removed {exec_id}")
