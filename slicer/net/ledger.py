"""The bridges this daemon made (``<data-dir>/run/network.json``), kept across a crash: only
those are deleted at stop or by the next daemon; a bridge someone else made keeps existing and
loses only the gateway address the daemon gave it."""

from __future__ import annotations

import json
from pathlib import Path


class BridgeLedger:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> BridgeLedger:
        return cls(data_dir / "run" / "network.json")

    def bridges(self) -> list[str]:
        """What the record names; nothing if it is missing or unreadable."""
        try:
            return list(json.loads(self.path.read_text()).get("bridges", []))
        except (OSError, ValueError, AttributeError, TypeError):
            return []

    def made(self, name: str) -> None:
        self._save([*self.bridges(), name])

    def owns(self, name: str) -> bool:
        return name in self.bridges()

    def forget(self, name: str) -> None:
        self._save([b for b in self.bridges() if b != name])

    def _save(self, bridges: list[str]) -> None:
        """Written to a temporary and renamed: a crash leaves the old record or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bridges": sorted(set(bridges))}))
        tmp.replace(self.path)
