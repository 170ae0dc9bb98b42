"""The ``slicer`` command: run the daemon, build the guest image."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from slicer.core.config import DEFAULT_CONFIG, load_config
from slicer.core.errors import SlicerError

app = typer.Typer(
    help="Slicer: micro-VMs on your own Linux host, behind an HTTP API.",
    no_args_is_help=True, rich_markup_mode="rich",
)
image_app = typer.Typer(help="Build the guest image; pull and manage users' OCI images.", no_args_is_help=True)
app.add_typer(image_app, name="image")
err = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", envvar="SLICER_DATA_DIR",
        help="Where images, disks, logs, secrets and state live.",
    ),
]
DEFAULT_DATA_DIR = Path("/var/lib/slicer")


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SLICER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # it logs every socket event
    logging.getLogger("httpx").setLevel(logging.WARNING)  # and this every agent request


@app.command()
def up(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; omit to use the embedded default (one VM).")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    build: Annotated[bool, typer.Option(help="Build the guest image first if it is missing.")] = True,
    suspend_on_shutdown: Annotated[bool, typer.Option(
        "--suspend-on-shutdown",
        help="On stop, save services' memory to disk instead of shutting them down; restore them at the next start.",
    )] = False,
    warm: Annotated[bool, typer.Option(
        "--warm", help="Build each host group's template at start, so even the first sandbox restores in a second.",
    )] = False,
    template_cache: Annotated[Path | None, typer.Option(
        "--template-cache", envvar="SLICER_TEMPLATE_CACHE",
        help="A directory of templates shared by the daemons of this host: a template another daemon built is "
             "copied from there instead of booted cold (root's alone: chmod 700).",
    )] = None,
) -> None:
    """Run the daemon: boot the config's VMs and serve the API until Ctrl-C.

    Example: [bold]slicer up[/bold] (embedded config: host group "vm", one VM, API on
    127.0.0.1:8080), or [bold]slicer up vm.yaml --data-dir /srv/slicer[/bold].
    """
    _logging()
    try:
        text = config.read_text() if config else DEFAULT_CONFIG
        cfg = load_config(text, config.parent if config else None)
        cfg.suspend_on_shutdown |= suspend_on_shutdown
        cfg.warm |= warm
        if template_cache is not None:
            cfg.template_cache = str(template_cache.absolute())
    except OSError as e:
        err.print(f"[red]cannot read {config}: {e}[/red]")
        raise typer.Exit(2) from e
    except SlicerError as e:
        err.print(f"[red]{escape(e.message)}[/red]")
        raise typer.Exit(2) from e
    from slicer.daemon import lock_data_dir, run_daemon
    from slicer.image.build import ImageError, build_image, current_image

    try:
        lock_data_dir(data_dir)  # before the image build too: a second daemon touches nothing
        try:
            current_image(data_dir)
        except ImageError:
            if not build:
                raise
            build_image(data_dir, progress=lambda m: err.print(f"[cyan]image:[/cyan] {m}"))
        run_daemon(cfg, data_dir)
    except (ImageError, SlicerError) as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from e


def tool_output(line: str) -> None:
    """A line of skopeo's, umoci's or buildah's output, as it is (no markup, no wrapping)."""
    err.print(line, markup=False, highlight=False, soft_wrap=True)


@image_app.command("build")
def image_build(
    context: Annotated[Path | None, typer.Argument(help="Build context of a Dockerfile build (default: .).")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Build this Dockerfile with buildah.")] = None,
    tag: Annotated[str | None, typer.Option("-t", "--tag", help="Name of the built image (for image:).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="FROM a plain-HTTP registry.")] = False,
    dns: Annotated[list[str] | None, typer.Option(
        "--dns", help="Nameserver for RUN steps (repeat; default: the host's that are not loopback).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    force: Annotated[bool, typer.Option(help="Rebuild even if a cached image matches.")] = False,
) -> None:
    """Build the guest image, or (with -f) a user's image from a Dockerfile.

    Without -f: the project's image (Debian cloud kernel, initramfs, ext4 root with the agent,
    the agent's runtime disk), cached by content: a second run returns at once. Needs root,
    mmdebstrap, apt and busybox-static. Example: [bold]slicer image build --data-dir /var/lib/slicer[/bold]

    With -f: buildah builds the Dockerfile (FROM a registry's image, one built before, or
    [bold]slicer/base[/bold], the project's Debian tree) and the result is cached as the -t name.
    Example: [bold]slicer image build -f Dockerfile -t myapp:1 .[/bold] then [bold]image: myapp:1[/bold]
    """
    from slicer.image.build import ImageError, build_image, current_image

    if file is None:
        if tag or context or dns:
            err.print("[red]-t, --dns and a context go with -f (a Dockerfile build)[/red]")
            raise typer.Exit(2)
        try:
            image = build_image(data_dir, progress=lambda m: err.print(f"[cyan]image:[/cyan] {m}"), force=force)
        except ImageError as e:
            err.print(f"[red]{escape(str(e))}[/red]")
            raise typer.Exit(1) from e
        typer.echo(str(image.directory))
        return
    if not tag:
        err.print("[red]-t NAME is required with -f: the name VMs boot it by (image: NAME)[/red]")
        raise typer.Exit(2)
    from slicer.image.build import images_dir
    from slicer.image.dockerfile import Builder
    from slicer.image.oci import ImageStore, OCIError

    try:
        builder = Builder(images_dir(data_dir), ImageStore.of(data_dir), current_image(data_dir))
        image = builder.build(file, tag, context or Path("."), insecure, progress=tool_output,
                              dns=tuple(dns) if dns else None)
    except (OCIError, ImageError) as e:
        err.print(f"[red]{escape(str(getattr(e, 'message', e)))}[/red]")
        raise typer.Exit(1) from e
    typer.echo(image.digest)


service_app = typer.Typer(help="Run the daemon as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")

UNIT = """[Unit]
Description=Slicer: micro-VMs behind an HTTP API ({name})
After=network-online.target
Wants=network-online.target

[Service]
User={user}
ExecStart={exec_start}
# SIGTERM: sandboxes deleted, services shut down gracefully. Only the daemon is signalled: its
# QEMUs are its to stop, and after a crash (or `kill -QUIT`, to upgrade) the next start adopts them.
KillMode=process
TimeoutStopSec={timeout}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


@service_app.command("generate")
def service_generate(
    config: Annotated[Path | None, typer.Argument(help="YAML config (default: the embedded one).")] = None,
    name: str = "slicer", user: str = "root", data_dir: DataDir = DEFAULT_DATA_DIR,
    suspend_on_shutdown: Annotated[bool, typer.Option("--suspend-on-shutdown")] = False,
    timeout_stop_sec: Annotated[int, typer.Option(help="How long a stop may take (guests power off).")] = 120,
    install: Annotated[bool, typer.Option(
        "--install", help="Write it to /etc/systemd/system, then enable and start it, as Slicer does.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --install: replace a unit that differs.")] = False,
) -> None:
    """Print (or install, enable and start) a systemd unit that runs [bold]slicer up[/bold].
    Example: [bold]slicer service generate ./vm.yaml --install[/bold]"""
    import shlex
    import shutil
    import subprocess

    argv = [shutil.which("slicer") or f"{sys.executable} -m slicer", "up"]
    argv += [str(config.resolve())] if config else []
    argv += ["--data-dir", str(data_dir)] + (["--suspend-on-shutdown"] if suspend_on_shutdown else [])
    unit = UNIT.format(name=name, user=user, timeout=timeout_stop_sec,
                       exec_start=" ".join(a if " " in a and a.startswith(sys.executable) else shlex.quote(a)
                                           for a in argv))
    if not install:
        typer.echo(unit, nl=False)
        return
    # SLICER_SYSTEMD_DIR: another unit directory (a chroot's, or a test's)
    path = Path(os.environ.get("SLICER_SYSTEMD_DIR", "/etc/systemd/system")) / f"{name}.service"
    try:
        if path.exists() and path.read_text() != unit and not force:
            err.print(f"[red]{path} exists and differs from this unit: --force replaces it[/red]")
            raise typer.Exit(1)
        path.write_text(unit)
    except OSError as e:
        err.print(f"[red]cannot write {path}: {e.strerror} (run as root)[/red]")
        raise typer.Exit(1) from e
    systemctl = shutil.which("systemctl")
    for step in (["daemon-reload"], ["enable", "--now", f"{name}.service"]):
        done = subprocess.run([systemctl or "systemctl", *step], capture_output=True, text=True) if systemctl else None
        if done is None or done.returncode != 0:
            why = done.stderr.strip() if done is not None else "no systemctl here"
            err.print(f"[red]wrote {path}, but systemctl {' '.join(step)} failed: {why}[/red]")
            raise typer.Exit(1)
    typer.echo(f"installed {path}; {name} is enabled and started (logs: journalctl -u {name} -f)")


@app.command()
def version() -> None:
    """Print the version."""
    from slicer import __version__

    typer.echo(__version__)


def main() -> None:  # pragma: no cover
    sys.exit(app())
