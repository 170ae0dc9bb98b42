"""``slicer vm …``, ``slicer secret …``, ``slicer info`` and ``slicer new``: the API from a terminal."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from slicer.cli._common import Json, Token, TokenFile, Url, client, dump, err, fail, handle, human, out, table
from slicer.cli.daemon import app

vm_app = typer.Typer(help="Create, inspect and use VMs.", no_args_is_help=True)
secret_app = typer.Typer(help="Secrets pushed to /run/slicer/secrets in every VM.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
app.add_typer(secret_app, name="secret")

NODE_COLUMNS = ["hostname", "hostgroup", "ip", "status", "cpus", "ram", "tags"]  # fits 80 columns; --json: all


def _node_rows(nodes) -> list[dict]:
    return [{**n.model_dump(), "ram": human(n.ram_bytes)} for n in nodes]


@app.command()
def info(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """Show the daemon's version, accelerator and image. Example: [bold]slicer info[/bold]"""
    with client(url, token, token_file) as c:
        i = handle(c.info)
    if json:
        dump(i)
    else:
        table([i.model_dump()], ["version", "git_commit", "platform", "arch", "accelerator"])


def _bool_text(flag: str, value: str) -> bool:
    """Slicer's CLI takes ``--flag=false``: a boolean written as text."""
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        fail(f"{flag} takes true or false")
    return value.lower() in ("true", "1", "yes")


def _network_section(net: str | None, cidr: str | None, range_: str | None, allow: list[str] | None,
                     drop: list[str] | None, tap_prefix: str | None) -> dict:
    """The group's ``network:`` from ``slicer new``'s flags."""
    import ipaddress

    network: dict = {"mode": net} if net else {}
    if cidr:
        try:
            subnet = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            fail(f"--cidr {cidr}: not a CIDR")
            raise
        if net == "isolated":
            network["range"] = str(subnet)
        else:
            network["gateway"] = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    elif net in (None, "bridge"):
        network["gateway"] = "192.168.137.1/24"
    if range_:
        network["range"] = range_
    for key, value in (("allow", allow), ("drop", drop)):
        if value:
            network[key] = list(value)
    if tap_prefix:
        network["tap_prefix"] = tap_prefix
    return network


@app.command()
def new(name: Annotated[str, typer.Argument(help="Host group name (VMs are NAME-1, NAME-2, …).")],
        count: Annotated[int, typer.Option(help="VMs started with the daemon; 0: only API-created ones.")] = 1,
        vcpu: Annotated[int, typer.Option("--vcpu", "--cpu", "--cpus")] = 2,
        ram: Annotated[float, typer.Option("--ram", "--ram-gb", help="GiB of RAM per VM.")] = 2,
        storage: Annotated[str, typer.Option(help="image (devmapper and zfs are not supported yet).")] = "image",
        storage_size: str = "10G",
        persistent: Annotated[str | None, typer.Option(help="true or false: keep disks across restarts.")] = None,
        net: Annotated[str | None, typer.Option(help="Network mode: bridge, isolated or passt.")] = None,
        cidr: Annotated[str | None, typer.Option(help="The group's subnet (bridge: gateway .1).")] = None,
        range_: Annotated[str | None, typer.Option("--range", help="bridge: A-B; isolated: a CIDR of /30s.")] = None,
        allow: Annotated[list[str] | None, typer.Option(
            help="isolated: CIDRs or IP:PORTs VMs may reach (repeatable), e.g. --drop 0.0.0.0/0 --allow 10.0.0.1:3128.")
        ] = None,
        drop: Annotated[list[str] | None, typer.Option(
            help="isolated: CIDRs or IP:PORTs VMs may not reach (repeatable); the most specific entry wins.")]
        = None,
        tap_prefix: str | None = None,
        userdata_file: Annotated[str | None, typer.Option(help="Script run once on each VM's first boot.")] = None,
        github: Annotated[str | None, typer.Option(help="GitHub user whose keys every VM gets.")] = None,
        ssh_key: Annotated[list[str] | None, typer.Option(help="Public key for every VM (repeatable).")] = None,
        graceful_shutdown: Annotated[str, typer.Option(help="true or false: ask guests to power off on stop.")]
        = "true",
        hypervisor: Annotated[str | None, typer.Option(help="firecracker, cloud-hypervisor or qemu.")] = None,
        api_bind: str = "127.0.0.1", api_port: int = 8080,
        api_auth: Annotated[str, typer.Option(help="true or false (false only on loopback).")] = "true",
        socket: Annotated[str | None, typer.Option(help="Serve the API on this unix socket instead.")] = None,
        ca: Annotated[bool, typer.Option("--ca", help="VMs trust a CA of the group's own (ca: {generate: true}), "
                                         "made at start; the egress proxy signs with it.")] = False,
        ) -> None:
    """Print a config for [bold]slicer up[/bold] (Slicer's flags).
    Examples: [bold]slicer new api --count 3 > api.yaml[/bold],
    [bold]slicer new sandbox --count=0 --graceful-shutdown=false > sandbox.yaml[/bold],
    [bold]slicer new jobs --net isolated --drop 10.0.0.0/8 > jobs.yaml[/bold]"""
    import yaml

    group: dict = {"name": name, "count": count, "vcpu": vcpu,
                   "ram_gb": int(ram) if float(ram).is_integer() else ram,
                   "storage": storage, "storage_size": storage_size}
    if persistent is not None:
        group["persistent"] = _bool_text("--persistent", persistent)
    if userdata_file:
        group["userdata_file"] = userdata_file
    network = _network_section(net, cidr, range_, allow, drop, tap_prefix)
    if network:
        group["network"] = network
    if ca:
        group["ca"] = {"generate": True}
    config: dict = {"host_groups": [group]}
    if github:
        config["github_user"] = github
    if ssh_key:
        config["ssh_keys"] = list(ssh_key)
    if hypervisor:
        config["hypervisor"] = hypervisor
    if not _bool_text("--graceful-shutdown", graceful_shutdown):
        config["graceful_shutdown"] = False
    config["api"] = {"bind_address": socket or api_bind, **({} if socket else {"port": api_port}),
                     "auth": {"enabled": _bool_text("--api-auth", api_auth)}}
    typer.echo(yaml.safe_dump({"config": config}, sort_keys=False), nl=False)


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
        table(_node_rows(nodes), NODE_COLUMNS)


@vm_app.command("get")
def vm_get(hostname: str, url: Url = None, token: Token = None, token_file: TokenFile = None,
           json: Json = False) -> None:
    """Show one VM. Example: [bold]slicer vm get vm-1 --json[/bold]"""
    with client(url, token, token_file) as c:
        node = handle(lambda: c.get_node(hostname))
    dump(node) if json else table(_node_rows([node]), [*NODE_COLUMNS, "created_at"])


@vm_app.command("add")
def vm_add(
    group: Annotated[str | None, typer.Argument(help="Host group to add the VM to (default: the only one).")] = None,
    cpus: int | None = None,
    ram_gb: float | None = typer.Option(None, "--ram-gb"),
    userdata: str | None = None,
    userdata_file: Path | None = None,
    ssh_key: Annotated[list[str] | None, typer.Option("--ssh-key", help="Public key (repeatable).")] = None,
    import_user: Annotated[str | None, typer.Option(help="GitHub user whose keys to install.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")] = None,
    secrets: Annotated[list[str] | None, typer.Option("--secrets", "--secret",
                                                      help="Only these secrets (repeatable).")] = None,
    no_secrets: Annotated[bool, typer.Option("--no-secrets", help="No secrets at all (default: every secret).")]
    = False,
    persistent: bool = False,
    cold: Annotated[bool, typer.Option("--cold", help="Boot the kernel, not a restore from the group's template.")]
    = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return once its agent answers.")] = False,
    wait_userdata: Annotated[bool, typer.Option("--wait-userdata", help="Return once its userdata ran.")] = False,
    timeout: Annotated[str, typer.Option(help="How long --wait may take (e.g. 60s, 5m).")] = "5m",
    url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False,
) -> None:
    """Create a VM (also [bold]slicer vm launch[/bold]; the group may be left out when the daemon has one).
    Example: [bold]slicer vm add vm --wait --tag ci --userdata-file setup.sh[/bold]"""
    wait_for = "userdata" if wait_userdata else "agent" if wait else None
    if userdata_file:
        userdata = userdata_file.read_text()
    if no_secrets and secrets:
        fail("give --secrets or --no-secrets, not both")
    fields = {"cpus": cpus, "ram_bytes": int(ram_gb * (1 << 30)) if ram_gb else None, "userdata": userdata,
              "ssh_keys": ssh_key or None, "import_user": import_user, "tags": tag or None,
              "secrets": [] if no_secrets else secrets or None,
              "persistent": persistent or None, "boot": "cold" if cold else None}
    with client(url, token, token_file) as c:
        if group is None:
            groups = [g.name for g in handle(c.host_groups)]
            if len(groups) != 1:
                fail(f"give the host group: the daemon has {', '.join(groups) or 'none'}")
            group = groups[0]
        with err.status(f"creating a VM in {group}" + (f", waiting for its {wait_for}" if wait_for else "")):
            node = handle(lambda: c.create_node(group, wait=wait_for, timeout=timeout, **fields))
    dump(node) if json else out.print(f"[green]created[/green] {node.hostname} ({node.ip})")


vm_app.command("launch", help="Same as [bold]vm add[/bold].")(vm_add)


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
                       "reboot": "Reboot a VM's guest. As in Slicer, that ends a sandbox (deleted) or a "
                                 "persistent VM (stopped; [bold]slicer vm relaunch[/bold] brings it back); a "
                                 "service boots again. Example: [bold]slicer vm reboot vm-1[/bold]"}[action]
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
    if json:
        dump(h)
        return
    row = {**h.model_dump(), "agent_uptime": _duration(h.agent_uptime_seconds),
           "system_uptime": _duration(h.system_uptime_seconds)}
    table([row], ["hostname", "ip", "agent_version", "agent_uptime", "system_uptime", "userdata_ran"])


def _duration(seconds: int) -> str:
    """``1h2m3s``, as Go prints a duration."""
    hours, rest = divmod(seconds, 3600)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (rest // 60, "m")) if n or unit == "m" and hours) + \
        f"{rest % 60}s"


@vm_app.command("ready")
def vm_ready(hostname: str, agent: bool = True, userdata: bool = False, timeout: float = 300,
             url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Wait until the agent answers (and userdata ran, with --userdata); exit 1 on timeout.
    Example: [bold]slicer vm ready vm-1 --userdata --timeout 120[/bold]"""
    with client(url, token, token_file) as c, err.status(f"waiting for {hostname}"):
        handle(lambda: c.wait_ready(hostname, userdata=userdata, timeout=timeout))
    out.print(f"{hostname} is ready")


TOP_COLUMNS = ["hostname", "ip", "status", "cpus", "load", "mem", "disk", "net rx/tx", "disk r/w", "conns", "uptime"]


@vm_app.command("top")
def vm_top(url: Url = None, token: Token = None, token_file: TokenFile = None, json: Json = False) -> None:
    """What every VM uses, from its agent's meter: vCPUs, load (1/5/15 min), memory and disk (used of
    total), network and disk bytes since boot, open connections, uptime.
    Example: [bold]slicer vm top[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(c.stats)
    if json:
        dump(rows)
        return
    table([_top_row(r) for r in rows], TOP_COLUMNS)


def _top_row(r) -> dict:
    s = r.snapshot or {}
    row = {"hostname": r.hostname, "ip": r.ip, "status": r.status, "cpus": s.get("totalCpus", r.cpus)}
    if not s:
        return {**row, "mem": r.error or ""}

    def size(key: str) -> str:
        value = s.get(key)
        return human(value) if isinstance(value, int | float) and not isinstance(value, bool) else "?"

    def used(used_key: str, total_key: str) -> str:
        total = s.get(total_key)
        percent = f" ({100 * s.get(used_key, 0) / total:.0f}%)" if isinstance(total, int | float) and total else ""
        return f"{size(used_key)} / {size(total_key)}{percent}"

    loads = [s.get(f"loadAvg{n}") for n in (1, 5, 15)]
    return {**row, "load": " ".join(f"{x:.2f}" if isinstance(x, int | float) else "?" for x in loads),
            "mem": used("memoryUsed", "totalMemory"), "disk": used("diskSpaceUsed", "diskSpaceTotal"),
            "net rx/tx": f"{size('networkReadTotal')} / {size('networkWriteTotal')}",
            "disk r/w": f"{size('diskReadTotal')} / {size('diskWriteTotal')}",
            "conns": s.get("openConnections", ""), "uptime": s.get("uptime", "")}


@vm_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_exec(
    hostname: str,
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    uid: int | None = None, gid: int | None = None, cwd: str | None = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")] = None,
    shell: Annotated[str | None, typer.Option(help="Shell to run it with; '' runs it directly.")] = None,
    stdin: Annotated[bool | None, typer.Option(
        "--stdin/--no-stdin", help="Send stdin to the command (default: when stdin is a pipe or a file, as Slicer "
                                   "does; --no-stdin for a pipe that never ends).")] = None,
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Run a command in a VM; output streams, the exit status is the command's. A pipe into it is
    the command's stdin, sent while its output comes back.
    Example: [bold]slicer vm exec vm-1 -- uname -a[/bold]
    Example: [bold]tar c src | slicer vm exec vm-1 -- tar x -C /tmp[/bold]"""
    envs = dict(e.split("=", 1) for e in env or [] if "=" in e)
    if stdin is None:
        stdin = _piped_stdin()
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


def _piped_stdin() -> bool:
    """Whether stdin is a pipe or a file (not a terminal, /dev/null or nothing)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _split_remote(spec: str) -> tuple[str | None, str]:
    host, sep, path = spec.partition(":")
    if sep and (path.startswith(("/", "~")) or path == "") and host and "/" not in host:
        return host, path or "~"
    return None, spec


def _remote_home(c, hostname: str, path: str, uid: int | None) -> str:
    """``~`` and ``~/x`` in the VM: the home directory of ``uid`` (root's by default)."""
    if not path.startswith("~"):
        return path
    rest = path[1:].lstrip("/")
    home = "/root"
    if uid:
        result = handle(lambda: c.exec(hostname, "getent", args=["passwd", str(uid)], shell=""))
        fields = result.stdout.strip().split(":")
        home = fields[5] if len(fields) > 5 and fields[5] else "/"
    return home.rstrip("/") + "/" + rest if rest else home + "/"


@vm_app.command("cp")
def vm_cp(
    source: Annotated[str, typer.Argument(help="Local path or VM:/path.")],
    dest: Annotated[str, typer.Argument(help="Local path or VM:/path.")],
    recursive: Annotated[bool, typer.Option(
        "-r", "--recursive", help="Copy a directory (tar mode); a directory is copied so without it too.")] = False,
    mode: Annotated[str | None, typer.Option(help="binary (one file) or tar (a directory, same as -r).")] = None,
    uid: int | None = None, gid: int | None = None, permissions: str | None = None,
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Copy files in or out, streamed, with a progress bar.
    Examples: [bold]slicer vm cp ./app vm-1:/usr/local/bin/app[/bold], [bold]slicer vm cp -r vm-1:/etc ./etc[/bold],
    [bold]slicer vm cp --mode=tar vm-1:~/dir ./dir[/bold]"""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    if mode not in (None, "binary", "tar"):
        fail(f"--mode {mode}: binary or tar")
    recursive = recursive or mode == "tar"

    src_vm, src_path = _split_remote(source)
    dst_vm, dst_path = _split_remote(dest)
    if bool(src_vm) == bool(dst_vm):
        fail("exactly one side must be VM:/path (or VM:~/path)")
    with client(url, token, token_file) as c, Progress(*Progress.get_default_columns(), DownloadColumn(),
                                                       TransferSpeedColumn(), console=err, transient=True) as bar:
        if src_vm:
            src_path = _remote_home(c, src_vm, src_path, uid)
        else:
            assert dst_vm is not None
            dst_path = _remote_home(c, dst_vm, dst_path, uid)
        if dst_vm:
            local = Path(src_path)
            if local.is_dir() and not recursive:
                if mode == "binary":
                    fail(f"{local} is a directory: --mode binary copies one file")
                recursive = True  # as Slicer's cp: a directory goes as a tar
            if recursive and not local.is_dir():
                fail(f"{local} is not a directory: tar mode copies a directory")
            if not recursive and (dst_path.endswith("/") or _remote_is_dir(c, dst_vm, dst_path)):
                dst_path = dst_path.rstrip("/") + "/" + local.name  # like cp: into the directory
            total = None if recursive else local.stat().st_size
            task = bar.add_task(f"→ {dest}", total=total)
            handle(lambda: c.upload(dst_vm, local, dst_path, tar=recursive, uid=uid, gid=gid, permissions=permissions,
                                    progress=lambda n: bar.update(task, completed=n)))
        else:
            task = bar.add_task(f"← {source}", total=None)
            if not recursive and mode is None and _remote_is_dir(c, src_vm, src_path):
                recursive = True  # a directory comes out as a tar, unpacked here
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


def _forward_spec(spec: str) -> tuple[str, int | None, str]:
    """``[bind:]port[:host:port]``, ``host:port``, with a unix socket path on either side
    (``./docker.sock:/var/run/docker.sock``, ``8080:/run/app.sock``) → (local, port, target)."""
    local, _, rest = spec.partition(":") if "/" in spec.split(":")[0] else ("", "", spec)
    if local:  # a local unix socket; the rest is the VM's side
        return local, None, _target(rest, spec)
    parts = rest.split(":")
    if parts[-1].startswith("/"):  # the VM's side is a unix socket
        bind = parts[:-1]
        if len(bind) == 1 and bind[0].isdigit():
            return "127.0.0.1", int(bind[0]), "unix:" + parts[-1]
        if len(bind) == 2 and bind[1].isdigit():
            return bind[0], int(bind[1]), "unix:" + parts[-1]
    elif len(parts) == 1 and parts[0].isdigit():
        return "127.0.0.1", int(parts[0]), f"127.0.0.1:{parts[0]}"
    elif len(parts) == 2 and parts[1].isdigit():
        if parts[0].isdigit():
            return "127.0.0.1", int(parts[0]), f"127.0.0.1:{parts[1]}"
        return parts[0], int(parts[1]), f"127.0.0.1:{parts[1]}"  # addr:port, the same port in the VM
    elif len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
        return "127.0.0.1", int(parts[0]), f"{parts[1]}:{parts[2]}"
    elif len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
        return parts[0], int(parts[1]), f"{parts[2]}:{parts[3]}"
    fail(f"{spec}: expected [addr:]port[:host:port], or a unix socket path on either side")
    raise AssertionError


def _target(rest: str, spec: str) -> str:
    if rest.startswith("/"):
        return "unix:" + rest
    parts = rest.split(":")
    if len(parts) == 1 and parts[0].isdigit():
        return f"127.0.0.1:{parts[0]}"
    if len(parts) == 2 and parts[1].isdigit():
        return rest
    fail(f"{spec}: the VM's side must be port, host:port or /path")
    raise AssertionError


@vm_app.command("forward")
def vm_forward(
    hostname: str,
    ports: Annotated[list[str] | None, typer.Argument(help="[addr:]port[:host:port] (repeatable).")] = None,
    local: Annotated[list[str] | None, typer.Option("-L", help="[addr:]port:[host:]port — local to VM "
                                                               "(repeatable).")] = None,
    url: Url = None, token: Token = None, token_file: TokenFile = None,
) -> None:
    """Forward local TCP ports or unix sockets to the VM until Ctrl-C. A single port (or addr:port)
    is the same port on both sides. Examples: [bold]slicer vm forward vm-1 8080:127.0.0.1:80[/bold],
    [bold]slicer vm forward vm-1 127.0.0.1:3000[/bold],
    [bold]slicer vm forward vm-1 -L ./docker.sock:/var/run/docker.sock[/bold]"""
    from slicer.cli.terminal import forward_ports

    specs = [_forward_spec(spec) for spec in [*(ports or []), *(local or [])]]
    if not specs:
        fail("give a port to forward, e.g. 8080:127.0.0.1:80")
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


Value = Annotated[str | None, typer.Option("--value", "--from-literal", help="The secret's value.")]
File = Annotated[Path | None, typer.Option("--file", "--from-file", help="Read the value from this file.")]


@secret_app.command("create")
def secret_create(name: str, value: Value = None, file: File = None, permissions: str = "0600",
                  uid: int = 0, gid: int = 0, url: Url = None, token: Token = None, token_file: TokenFile = None,
                  json: Json = False) -> None:
    """Create a secret. Example: [bold]echo -n hunter2 | slicer secret create db-pass --uid 1000[/bold]"""
    data = _secret_data(value, file)
    with client(url, token, token_file) as c:
        s = handle(lambda: c.create_secret(name, data, permissions, uid, gid))
    dump(s) if json else out.print(f"[green]created[/green] {s.name} ({s.size} bytes)")


@secret_app.command("update")
def secret_update(name: str, value: Value = None, file: File = None, permissions: str | None = None,
                  uid: int | None = None, gid: int | None = None, url: Url = None, token: Token = None,
                  token_file: TokenFile = None, json: Json = False) -> None:
    """Change a secret's data or owner. Example: [bold]slicer secret update db-pass --file new.txt[/bold]"""
    data = _secret_data(value, file) if value is not None or file is not None else None
    with client(url, token, token_file) as c:
        s = handle(lambda: c.update_secret(name, data=data, permissions=permissions, uid=uid, gid=gid))
    dump(s) if json else out.print(f"[green]updated[/green] {s.name}")


@secret_app.command("list")
def secret_list(verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Also owner and permissions.")]
                = False, url: Url = None, token: Token = None, token_file: TokenFile = None,
                json: Json = False) -> None:
    """List secrets (never their data). Example: [bold]slicer secret list -v[/bold]"""
    with client(url, token, token_file) as c:
        rows = handle(c.secrets)
    columns = ["name", "size", "permissions", "uid", "gid", "mod_time"] if verbose else ["name", "size", "mod_time"]
    dump(rows) if json else table([r.model_dump() for r in rows], columns)


@secret_app.command("remove")
def secret_remove(name: str, url: Url = None, token: Token = None, token_file: TokenFile = None) -> None:
    """Delete a secret (also from every VM). Example: [bold]slicer secret remove db-pass[/bold]"""
    with client(url, token, token_file) as c:
        handle(lambda: c.delete_secret(name))
    out.print(f"[green]removed[/green] {name}")



# Top-level shortcuts Slicer's docs use.
for _name, _command in (("ls", vm_list), ("shell", vm_shell), ("cp", vm_cp), ("logs", vm_logs),
                        ("exec", vm_exec)):
    app.command(_name, help=f"Same as [bold]slicer vm {_command.__name__.removeprefix('vm_')}[/bold].",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True} if _name == "exec"
                else None)(_command)
