"""``slicer vm …``, ``slicer secret …``, ``slicer info`` and ``slicer new``: the API from a terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from slicer.cli._common import Json, Token, TokenFile, Url, client, dump, err, fail, handle, out, table
from slicer.cli.daemon import app

vm_app = typer.Typer(help="Create, inspect and use VMs.", no_args_is_help=True)
secret_app = typer.Typer(help="Secrets pushed to /run/slicer/secrets in every VM.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
app.add_typer(secret_app, name="secret")

NODE_COLUMNS = ["hostname", "hostgroup", "ip", "status", "cpus", "ram_bytes", "tags", "created_at"]


@app.command()
def info(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Show the daemon's version, accelerator and image. Example: [bold]slicer info[/bold]"""
    with client(url, token, token_file) as c:
        i = handle(c.info)
    if json:
        dump(i)
    else:
        table([i.model_dump()], ["version", "git_commit", "platform", "arch", "accelerator"])


@app.command()
def new(name: Annotated[str, typer.Argument(help="Host group name (VMs are NAME-1, NAME-2, …).")],
        count: int = 1, vcpu: int = 2, ram_gb: int = 2, storage_size: str = "10G") -> None:
    """Print a config for [bold]slicer up[/bold]. Example: [bold]slicer new api --count 3 > api.yaml[/bold]"""
    typer.echo(f"""config:
  host_groups:
  - name: {name}
    count: {count}
    vcpu: {vcpu}
    ram_gb: {ram_gb}
    storage: image
    storage_size: {storage_size}
    network:
      gateway: 192.168.137.1/24
  api:
    bind_address: 127.0.0.1
    port: 8080
    auth:
      enabled: true
""")


# -- vm ------------------------------------------------------------------------------------------
@vm_app.command("list")
def vm_list(group: Annotated[str | None, typer.Option("--group", "-g", help="Only this host group.")] = None,
            tag: str | None = None, tag_prefix: str | None = None,
            url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """List VMs. Example: [bold]slicer vm list --tag ci[/bold]"""
    with client(url, token, token_file) as c:
        nodes = handle(lambda: c.nodes(group, tag, tag_prefix))
    if json:
        dump(nodes)
    else:
        table([n.model_dump() for n in nodes], NODE_COLUMNS)


@vm_app.command("get")
def vm_get(hostname: str, url: Url = None, token: Token = None, token_file: TokenFile = None,
           json: Json = False) -> None:
    """Show one VM. Example: [bold]slicer vm get vm-1 --json[/bold]"""
    with client(url, token, token_file) as c:
        node = handle(lambda: c.get_node(hostname))
    dump(node) if json else table([node.model_dump()], NODE_COLUMNS)


@vm_app.command("add")
def vm_add(
    group: Annotated[str, typer.Argument(help="Host group to add the VM to.")],
    cpus: int | None = None,
    ram_gb: float | None = typer.Option(None, "--ram-gb"),
    userdata: str | None = None,
    userdata_file: Path | None = None,
    ssh_key: Annotated[list[str] | None, typer.Option("--ssh-key", help="Public key (repeatable).")] = None,
    import_user: Annotated[str | None, typer.Option(help="GitHub user whose keys to install.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")] = None,
    secrets: Annotated[list[str] | None, typer.Option("--secrets", help="Only these secrets (repeatable).")] = None,
    no_secrets: Annotated[bool, typer.Option("--no-secrets", help="No secrets at all (default: every secret).")]
    = False,
    persistent: bool = False,
    cold: Annotated[bool, typer.Option("--cold", help="Boot the kernel, not a restore from the group's template.")]
    = False,
    wait: Annotated[str | None, typer.Option(help="agent or userdata: return once ready.")] = "agent",
    timeout: str = "5m",
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Create a sandbox VM. Example: [bold]slicer vm add vm --tag ci --userdata-file setup.sh[/bold]"""
    if userdata_file:
        userdata = userdata_file.read_text()
    if no_secrets and secrets:
        fail("give --secrets or --no-secrets, not both")
    fields = {"cpus": cpus, "ram_bytes": int(ram_gb * (1 << 30)) if ram_gb else None, "userdata": userdata,
              "ssh_keys": ssh_key or None, "import_user": import_user, "tags": tag or None,
              "secrets": [] if no_secrets else secrets or None,
              "persistent": persistent or None, "boot": "cold" if cold else None}
    with client(url, token, token_file) as c, err.status(f"creating a VM in {group}" + (f", waiting for {wait}"
                                                                                          if wait else "")):
        node = handle(lambda: c.create_node(group, wait=wait or None, timeout=timeout, **fields))
    dump(node) if json else out.print(f"[green]created[/green] {node.hostname} ({node.ip})")


@vm_app.command("delete")
def vm_delete(hostname: str, group: Annotated[str | None, typer.Option("--group", "-g")] = None,
              url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Delete a sandbox VM and its disk. Example: [bold]slicer vm delete vm-2[/bold]"""
    with client(url, token, token_file) as c:
        group = group or handle(lambda: c.get_node(hostname)).hostgroup
        result = handle(lambda: c.delete_node(group, hostname))
    dump(result) if json else out.print(f"[green]deleted[/green] {hostname}")


def _power(action: str):
    def command(hostname: str, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
        with client(url, token, token_file) as c:
            text = handle(lambda: getattr(c, action)(hostname) if action in ("pause", "resume")
                          else c.shutdown(hostname, action))
        out.print(text.strip())

    command.__doc__ = {"pause": "Pause a VM's vCPUs. Example: [bold]slicer vm pause vm-1[/bold]",
                       "resume": "Resume a paused VM. Example: [bold]slicer vm resume vm-1[/bold]",
                       "shutdown": "Power a VM off (sandboxes are then deleted). Example: "
                                   "[bold]slicer vm shutdown vm-2[/bold]",
                       "reboot": "Reboot a VM. Example: [bold]slicer vm reboot vm-1[/bold]"}[action]
    return command


for _action in ("pause", "resume", "shutdown", "reboot"):
    vm_app.command(_action)(_power(_action))


@vm_app.command("logs")
def vm_logs(hostname: str, lines: Annotated[int, typer.Option("--lines", "-n", help="0 for everything.")] = 20,
            url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Print the VM's serial console. Example: [bold]slicer vm logs vm-1 -n 0[/bold]"""
    with client(url, token, token_file) as c:
        sys.stdout.write(handle(lambda: c.logs(hostname, lines)))


@vm_app.command("health")
def vm_health(hostname: str, url: Url = None, token: Token = None, token_file: TokenFile = None,
              json: Json = False) -> None:
    """Ask the VM's agent how it is. Example: [bold]slicer vm health vm-1[/bold]"""
    with client(url, token, token_file) as c:
        h = handle(lambda: c.health(hostname))
    dump(h) if json else table([h.model_dump()], ["hostname", "agent_version", "agent_uptime", "system_uptime",
                                                  "userdata_ran"])


@vm_app.command("ready")
def vm_ready(hostname: str, agent: bool = True, userdata: bool = False, timeout: float = 300,
             url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Wait until the agent answers (and userdata ran, with --userdata); exit 1 on timeout.
    Example: [bold]slicer vm ready vm-1 --userdata --timeout 120[/bold]"""
    with client(url, token, token_file) as c, err.status(f"waiting for {hostname}"):
        handle(lambda: c.wait_ready(hostname, userdata=userdata, timeout=timeout))
    out.print(f"{hostname} is ready")


@vm_app.command("top")
def vm_top(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """CPU, memory and disk of every VM. Example: [bold]slicer vm top[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(c.stats)
    if json:
        dump(rows)
        return
    view = []
    for r in rows:
        s = r.snapshot or {}
        view.append({"hostname": r.hostname, "status": r.status, "load1": s.get("loadAvg1", ""),
                     "mem": f"{s.get('memoryUsedPercent', 0):.0f}%" if s else r.error or "",
                     "disk": f"{s.get('diskSpaceUsedPercent', 0):.0f}%" if s else "", "uptime": s.get("uptime", "")})
    table(view, ["hostname", "status", "load1", "mem", "disk", "uptime"])


@vm_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_exec(
    hostname: str,
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    uid: int | None = None, gid: int | None = None, cwd: str | None = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")] = None,
    shell: Annotated[str | None, typer.Option(help="Shell to run it with; '' runs it directly.")] = None,
    stdin: Annotated[bool, typer.Option(help="Send this terminal's stdin to the command.")] = False,
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Run a command in a VM; output streams, the exit status is the command's.
    Example: [bold]slicer vm exec vm-1 -- uname -a[/bold]"""
    envs = dict(e.split("=", 1) for e in env or [] if "=" in e)
    body = iter(lambda: os.read(0, 65536), b"") if stdin else None
    code = 0
    with client(url, token, token_file) as c:
        def run() -> int:
            for f in c.exec_stream(hostname, command[0], args=command[1:], env=envs, uid=uid, gid=gid, cwd=cwd,
                                   shell=shell, stdin=body):
                if f.type == "stdout":
                    sys.stdout.write(f.data)
                    sys.stdout.flush()
                elif f.type == "stderr":
                    sys.stderr.write(f.data)
                    sys.stderr.flush()
                elif f.type == "exit":
                    return f.exit_code
                elif f.error:
                    fail(f.error)
            return 1

        code = handle(run)
    raise typer.Exit(code)


def _split_remote(spec: str) -> tuple[str | None, str]:
    host, sep, path = spec.partition(":")
    if sep and path.startswith("/") and "/" not in host:
        return host, path
    return None, spec


@vm_app.command("cp")
def vm_cp(
    source: Annotated[str, typer.Argument(help="Local path or VM:/path.")],
    dest: Annotated[str, typer.Argument(help="Local path or VM:/path.")],
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Copy a directory (tar mode).")] = False,
    uid: int | None = None, gid: int | None = None, permissions: str | None = None,
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Copy files in or out, streamed, with a progress bar.
    Examples: [bold]slicer vm cp ./app vm-1:/usr/local/bin/app[/bold], [bold]slicer vm cp -r vm-1:/etc ./etc[/bold]"""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    src_vm, src_path = _split_remote(source)
    dst_vm, dst_path = _split_remote(dest)
    if bool(src_vm) == bool(dst_vm):
        fail("exactly one side must be VM:/path")
    with client(url, token, token_file) as c, Progress(*Progress.get_default_columns(), DownloadColumn(),
                                                       TransferSpeedColumn(), console=err, transient=True) as bar:
        if dst_vm:
            local = Path(src_path)
            if local.is_dir() and not recursive:
                fail(f"{local} is a directory: use -r")
            if not recursive and (dst_path.endswith("/") or _remote_is_dir(c, dst_vm, dst_path)):
                dst_path = dst_path.rstrip("/") + "/" + local.name  # like cp: into the directory
            total = None if recursive else local.stat().st_size
            task = bar.add_task(f"→ {dest}", total=total)
            handle(lambda: c.upload(dst_vm, local, dst_path, tar=recursive, uid=uid, gid=gid, permissions=permissions,
                                    progress=lambda n: bar.update(task, completed=n)))
        else:
            task = bar.add_task(f"← {source}", total=None)
            if recursive:
                handle(lambda: c.download(src_vm, src_path, Path(dst_path), tar=True))
            else:
                target = Path(dst_path)
                if target.is_dir():
                    target = target / Path(src_path).name
                handle(lambda: c.download(src_vm, src_path, target, progress=lambda n: bar.update(task, completed=n)))


def _remote_is_dir(c, hostname: str, path: str) -> bool:
    from slicer.client import NotFoundError

    try:
        return c.stat(hostname, path)["type"] == "directory"
    except NotFoundError:
        return False


@vm_app.command("shell")
def vm_shell(hostname: str, uid: int | None = None, gid: int | None = None, shell: str | None = None,
             cwd: str | None = None, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """An interactive shell in the VM (no SSH needed). Example: [bold]slicer vm shell vm-1[/bold]"""
    from slicer.cli.terminal import run_shell

    query = {k: v for k, v in (("uid", uid), ("gid", gid), ("shell", shell), ("cwd", cwd)) if v is not None}
    with client(url, token, token_file) as c:
        ws = handle(lambda: _open_shell(c, hostname, query))
        code = run_shell(ws)
    raise typer.Exit(code)


def _open_shell(c, hostname: str, query: dict):
    from websockets.exceptions import InvalidStatus

    try:
        return c.shell(hostname, **query)
    except InvalidStatus as e:
        from slicer.client._errors import error_for

        raise error_for(e.response.status_code, e.response.body or b"") from None


@vm_app.command("forward")
def vm_forward(
    hostname: str,
    local: Annotated[list[str], typer.Option("-L", help="[addr:]port:[host:]port — local to VM (repeatable).")],
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Forward local TCP ports to ports in the VM until Ctrl-C.
    Example: [bold]slicer vm forward vm-1 -L 8080:127.0.0.1:80[/bold]"""
    from slicer.cli.terminal import forward_ports

    specs = []
    for spec in local:
        parts = spec.split(":")
        if len(parts) == 2:
            specs.append(("127.0.0.1", int(parts[0]), f"127.0.0.1:{parts[1]}"))
        elif len(parts) == 3:
            specs.append(("127.0.0.1", int(parts[0]), f"{parts[1]}:{parts[2]}"))
        elif len(parts) == 4:
            specs.append((parts[0], int(parts[1]), f"{parts[2]}:{parts[3]}"))
        else:
            fail(f"-L {spec}: expected [addr:]port:[host:]port")
    with client(url, token, token_file) as c:
        forward_ports(c, hostname, specs)


# -- secrets -------------------------------------------------------------------------------------
def _secret_data(value: str | None, file: Path | None) -> bytes:
    if file is not None:
        return file.read_bytes()
    if value is not None:
        return value.encode()
    if not sys.stdin.isatty():
        return sys.stdin.buffer.read()
    fail("give --value, --file, or pipe the secret on stdin")
    return b""


@secret_app.command("create")
def secret_create(name: str, value: str | None = None, file: Path | None = None, permissions: str = "0600",
                  uid: int = 0, gid: int = 0, url: Url = None, token: Token = None, token_file: TokenFile = None,
                  json: Json = False) -> None:
    """Create a secret. Example: [bold]echo -n hunter2 | slicer secret create db-pass --uid 1000[/bold]"""
    data = _secret_data(value, file)
    with client(url, token, token_file) as c:
        s = handle(lambda: c.create_secret(name, data, permissions, uid, gid))
    dump(s) if json else out.print(f"[green]created[/green] {s.name} ({s.size} bytes)")


@secret_app.command("update")
def secret_update(name: str, value: str | None = None, file: Path | None = None, permissions: str | None = None,
                  uid: int | None = None, gid: int | None = None, url: Url = None, token: Token = None,
                  token_file: TokenFile = None, json: Json = False) -> None:
    """Change a secret's data or owner. Example: [bold]slicer secret update db-pass --file new.txt[/bold]"""
    data = _secret_data(value, file) if value is not None or file is not None else None
    with client(url, token, token_file) as c:
        s = handle(lambda: c.update_secret(name, data=data, permissions=permissions, uid=uid, gid=gid))
    dump(s) if json else out.print(f"[green]updated[/green] {s.name}")


@secret_app.command("list")
def secret_list(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """List secrets (never their data). Example: [bold]slicer secret list[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(c.secrets)
    dump(rows) if json else table([r.model_dump() for r in rows], ["name", "size", "permissions", "uid", "gid",
                                                                     "mod_time"])


@secret_app.command("remove")
def secret_remove(name: str, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Delete a secret (also from every VM). Example: [bold]slicer secret remove db-pass[/bold]"""
    with client(url, token, token_file) as c:
        handle(lambda: c.delete_secret(name))
    out.print(f"[green]removed[/green] {name}")

