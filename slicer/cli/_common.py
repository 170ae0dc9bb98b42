"""What every client command shares: the connection options, output, and errors."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slicer.client import APIError, ConnectionFailed, SlicerClient, UnsafeArchive

out = Console()
# Messages are never wrapped: a path or command in one must stay copyable whatever the width.
err = Console(stderr=True, soft_wrap=True)

Url = Annotated[str | None, typer.Option("--url", "--api", envvar="SLICER_URL",
                                         help="Daemon URL or unix socket path [default: http://127.0.0.1:8080]")]
TOKEN_HELP = "API token (every local user sees it in the process list: prefer --token-file or SLICER_TOKEN)."
Token = Annotated[str | None, typer.Option("--token", envvar="SLICER_TOKEN", help=TOKEN_HELP)]
TokenFile = Annotated[str | None, typer.Option("--token-file", envvar="SLICER_TOKEN_FILE",
                                               help="File holding the API token [default: /var/lib/slicer/auth/token]")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def client(url: str | None, token: str | None, token_file: str | None) -> SlicerClient:
    try:
        return SlicerClient(url, token=token, token_file=token_file)
    except OSError as e:
        fail(f"cannot read the token file: {e}")
        raise


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def handle(fn):
    """Run a command body, turning API and connection errors into one clear line and exit 1."""
    try:
        return fn()
    except APIError as e:
        fail(f"{e.error} ({e.code}, HTTP {e.status})")
    except (ConnectionFailed, UnsafeArchive) as e:
        fail(str(e))


def dump(value: Any) -> None:
    def plain(v: Any) -> Any:
        if hasattr(v, "model_dump"):
            return v.model_dump()
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    sys.stdout.write(json.dumps(plain(value), indent=2) + "\n")


def table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c.upper())
    for row in rows:  # cells are data (names, paths a guest chose), never Rich markup
        t.add_row(*(escape(",".join(map(str, v)) if isinstance(v := row.get(c, ""), list) else str(v))
                    for c in columns))
    out.print(t)


def human(n: float) -> str:
    """``1 GiB``, ``384 MiB``: sizes as people read them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)
