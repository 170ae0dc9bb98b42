"""Where the SDKs' chunked copy keeps its sessions and chunks (``slicer.agent.upload``).

The guest's helper, the agent's file routes and the host (a chunk's upload waits its turn on the
bulk port: ``slicer.core.agent``) all read it from here. No imports: the helper starts once per
chunked copy, and under TCG every import is felt (``re`` alone took ~0.1 s).
"""

from __future__ import annotations

VERSIONS = (1, 2)  # the manifest versions spoken (``slicer-agent upload check``)
SESSION_PREFIX = ".slicer-upload-"
HEX_DIGITS = frozenset("0123456789abcdef")


def is_session_name(name: str) -> bool:
    """Whether ``name`` is a session directory's: ``.slicer-upload-`` and 32 lowercase hex digits."""
    return (len(name) == len(SESSION_PREFIX) + 32 and name.startswith(SESSION_PREFIX)
            and HEX_DIGITS.issuperset(name[-32:]))


def session_of(path: str) -> str | None:
    """The chunked-copy session directory ``path``'s file lies in (``<session>/manifest.json``,
    ``<session>/chunks/NNNNNN.chunk``), if any."""
    parts = path.split("/")
    for i in (len(parts) - 2, len(parts) - 3):
        if i > 0 and is_session_name(parts[i]):
            return "/".join(parts[: i + 1])
    return None


def is_chunk(path: str) -> bool:
    """Whether ``path`` is a chunk of a chunked-copy session (``<session>/chunks/NNNNNN.chunk``)."""
    return path.endswith(".chunk") and session_of(path) is not None
