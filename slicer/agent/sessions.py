"""Where the SDKs' chunked copy keeps its sessions and chunks (``slicer.agent.upload``).

The guest's helper, the agent's file routes and the host (a chunk's upload waits its turn on the
bulk port: ``slicer.core.agent``) all read it from here. Standard library ``re`` only: the helper
starts once per chunked copy, and under TCG every import is felt.
"""

from __future__ import annotations

import re

SESSION_RE = re.compile(r"\.slicer-upload-[0-9a-f]{32}")


def session_of(path: str) -> str | None:
    """The chunked-copy session directory ``path``'s file lies in (``<session>/manifest.json``,
    ``<session>/chunks/NNNNNN.chunk``), if any."""
    parts = path.split("/")
    for i in (len(parts) - 2, len(parts) - 3):
        if i > 0 and SESSION_RE.fullmatch(parts[i]):
            return "/".join(parts[: i + 1])
    return None


def is_chunk(path: str) -> bool:
    """Whether ``path`` is a chunk of a chunked-copy session (``<session>/chunks/NNNNNN.chunk``)."""
    return path.endswith(".chunk") and session_of(path) is not None
