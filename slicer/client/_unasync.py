"""Generate ``_sync.py`` from ``_async.py`` with unasync (a development tool: unasync is in the
``test`` extra, not needed to use the SDK).

    python -m slicer.client._unasync          # rewrite _sync.py
    python -m slicer.client._unasync --check  # exit 1 if _sync.py is not what _async.py gives
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCE, TARGET = HERE / "_async.py", HERE / "_sync.py"

# Names unasync does not know, beyond its own (AsyncIterator -> Iterator, __aenter__ -> __enter__...).
RENAMES = {
    "AsyncSlicerClient": "SlicerClient",
    "AsyncClient": "Client",
    "AsyncHTTPTransport": "HTTPTransport",
    "AsyncWebSocket": "WebSocket",
    "aclose": "close",
    "aread": "read",
    "aiter_lines": "iter_lines",
    "aiter_raw": "iter_raw",
    "async_sleep": "sleep",
    "async_upload_body": "upload_body",
    "async_extract_tar": "extract_tar",
    "async_ws_connect": "ws_connect",
    "async_duplex_transport": "duplex_transport",
}
SYNC_DOC = (
    "# GENERATED from _async.py by `python -m slicer.client._unasync`: do not edit.\n"
    '"""The synchronous client, :class:`SlicerClient`: the methods of :class:`AsyncSlicerClient`, not\n'
    "awaited (this file is generated from ``_async.py``; change that one).\n"
    '"""\n'
)


def render(async_source: str) -> str:
    """The sync client's source for ``async_source`` (the text of ``_async.py``)."""
    import unasync

    if not async_source.startswith('"""'):
        raise ValueError("_async.py must start with its docstring (replaced by the sync one's)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "_async", "client.py")
        src.parent.mkdir()
        src.write_text(async_source)
        unasync.unasync_files([str(src)], [unasync.Rule("/_async/", "/_sync/", additional_replacements=RENAMES)])
        generated = Path(tmp, "_sync", "client.py").read_text()
    end = generated.index('"""', 3) + len('"""\n')
    return SYNC_DOC + generated[end:]


def main(argv: list[str]) -> int:
    wanted = render(SOURCE.read_text())
    if "--check" in argv:
        if TARGET.read_text() != wanted:
            print(f"{TARGET} is stale: run python -m slicer.client._unasync", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
