"""Secrets: stored on the host (0700 directory, one 0600 JSON file each, written atomically)
and pushed to the guests, which keep them on tmpfs at ``/run/slicer/secrets/<name>``."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, Conflict, NotFound

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
MAX_SIZE = 1 << 20


def _permissions(value: object, default: str = "0600") -> str:
    value = value or default
    if not isinstance(value, str):  # 600 as a number is ambiguous (decimal 600 is 0o1130): refuse it
        raise BadRequest(f"permissions must be an octal string like \"0600\", not {value!r}",
                         ErrorCode.INVALID_PERMISSIONS)
    if not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise BadRequest(f"permissions must be octal like 0600, not {value!r}", ErrorCode.INVALID_PERMISSIONS)
    return f"{int(value, 8):04o}"


def _id(value, name: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise BadRequest(f"{name} must be an integer between 0 and 4294967295", ErrorCode.INVALID_REQUEST)
    return value


def _decode(data) -> bytes:
    if not isinstance(data, str):
        raise BadRequest("data must be a base64 string", ErrorCode.INVALID_REQUEST)
    if len(data) > MAX_SIZE * 4 // 3 + 4:
        raise BadRequest(f"secret data over {MAX_SIZE} bytes", ErrorCode.TOO_LARGE)
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise BadRequest("data is not valid base64", ErrorCode.INVALID_BASE64) from None
    if len(raw) > MAX_SIZE:
        raise BadRequest(f"secret data over {MAX_SIZE} bytes", ErrorCode.TOO_LARGE)
    return raw


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise BadRequest("secret names are 1-128 letters, digits, '.', '_' or '-' (no '/', no '..')",
                         ErrorCode.INVALID_NAME)
    return name


class SecretStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.json"

    def _read(self, name: str) -> dict:
        try:
            return json.loads(self._path(name).read_text())
        except FileNotFoundError:
            raise NotFound(f"secret {name!r} not found", ErrorCode.SECRET_NOT_FOUND) from None

    def _write(self, record: dict) -> None:
        path = self._path(record["name"])
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # the old version stays whole until the new one is
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def metadata(record: dict) -> dict:
        meta = {k: record[k] for k in ("name", "size", "permissions", "uid", "gid", "mod_time")}
        return {**meta, "modified_at": meta["mod_time"]}  # the TypeScript SDK's name for mod_time

    def list(self) -> list[dict]:
        names = sorted(p.stem for p in self.dir.glob("*.json"))
        return [self.metadata(self._read(n)) for n in names]

    def create(self, body: dict) -> dict:
        unknown = set(body) - {"name", "data", "permissions", "uid", "gid"}
        if unknown:
            raise BadRequest(f"unknown field {sorted(unknown)[0]!r}", ErrorCode.INVALID_REQUEST)
        name = check_name(body.get("name"))
        if self._path(name).exists():
            raise Conflict(f"secret {name!r} already exists; PATCH it to change it", ErrorCode.EXISTS)
        raw = _decode(body.get("data"))
        record = {"name": name, "size": len(raw), "data": base64.b64encode(raw).decode(),
                  "permissions": _permissions(body.get("permissions")), "uid": _id(body.get("uid"), "uid"),
                  "gid": _id(body.get("gid"), "gid"), "mod_time": datetime.now(UTC).isoformat()}
        self._write(record)
        return self.metadata(record)

    def update(self, name: str, body: dict) -> dict:
        unknown = set(body) - {"data", "permissions", "uid", "gid"}
        if unknown:
            raise BadRequest(f"unknown field {sorted(unknown)[0]!r}", ErrorCode.INVALID_REQUEST)
        record = self._read(check_name(name))
        if "data" in body:
            raw = _decode(body["data"])
            record["data"], record["size"] = base64.b64encode(raw).decode(), len(raw)
        if "permissions" in body:
            record["permissions"] = _permissions(body["permissions"])
        for key in ("uid", "gid"):
            if key in body:
                record[key] = _id(body[key], key)
        record["mod_time"] = datetime.now(UTC).isoformat()
        self._write(record)
        return self.metadata(record)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"secret {name!r} not found", ErrorCode.SECRET_NOT_FOUND) from None

    def for_guest(self, allowed: list[str] | None) -> dict[str, dict]:
        """What a VM should hold: all secrets, or only ``allowed`` when the VM was given a list."""
        out = {}
        for p in self.dir.glob("*.json"):
            if allowed is not None and p.stem not in allowed:
                continue
            rec = json.loads(p.read_text())
            out[rec["name"]] = {k: rec[k] for k in ("data", "permissions", "uid", "gid")}
        return out
