"""The agent's HTTP protocol, declared once: the contract between the guest and the host.

Every route the guest agent serves is one ``Endpoint`` in ``ENDPOINTS``: its name, method, path
(aiohttp's ``{param}`` syntax), what the request carries (query parameters, a JSON body, or raw
bytes) and what the answer is (JSON, a byte stream, or a WebSocket), with TypedDicts for the
shapes. The guest registers one handler per name (``slicer.agent.server`` refuses to start when a
name has no handler or a handler no name); the host's ``slicer.core.agent.AgentClient`` has one
method per name and builds every path from here, so no other code spells an agent path.

Guest-side code: the standard library only (it runs on Debian's Python 3.11 in the guest).
Errors are ``{"error": "...", "code": "..."}`` with the codes listed in ``ERROR_CODES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict
from urllib.parse import quote

Method = Literal["GET", "POST", "PUT", "DELETE"]
# What the answer is: a JSON value read whole, bytes relayed as they come, or a WebSocket.
Answer = Literal["json", "stream", "websocket"]
# What the request carries besides its query: nothing, a JSON body, or raw bytes (a file, a tar, stdin).
Body = Literal["none", "json", "bytes"]

# The error codes the agent answers with (the host passes these on; see slicer.core.agent_answers).
ERROR_CODES = frozenset({
    "invalid_request", "copy_failed", "fs_error", "not_found", "invalid_cwd", "unsafe_tar", "exec_failed",
    "is_directory", "not_a_directory", "not_empty", "exists", "unsafe_path", "unsafe_session", "gone",
    "too_large", "permission_denied", "budget_exhausted", "bulk_busy", "bulk_unavailable", "conflict",
})


class Error(TypedDict):
    error: str
    code: str


# --- status --------------------------------------------------------------------------------------

class Health(TypedDict):
    hostname: str
    agent_uptime: int
    agent_version: str
    system_uptime: int
    userdata_ran: bool
    userdata_exit_code: int | None
    bulk: NotRequired[bool]  # the agent holds the bulk port (slicer.channel.bulk)


class Stats(TypedDict, total=False):
    """The meter's snapshot (slicer.agent.meter); camelCase as the Go SDK reads it."""
    hostname: str
    arch: str
    timestamp: str
    uptime: str
    totalCpus: int
    totalMemory: int
    memoryUsed: int
    memoryAvailable: int
    loadAvg1: float
    diskSpaceTotal: int
    diskSpaceFree: int


class PowerQuery(TypedDict):
    action: Literal["shutdown", "reboot"]


class Message(TypedDict):
    message: str


# --- exec ----------------------------------------------------------------------------------------

class ExecQuery(TypedDict, total=False):
    """Query of ``POST /exec`` (repeated: args, env as KEY=VALUE); the body is stdin when stdin=true."""
    cmd: str
    args: list[str]
    env: list[str]
    uid: int
    gid: int
    cwd: str
    shell: str
    stdin: bool
    stdout: bool
    stderr: bool
    stdio: Literal["text", "base64"]
    buffered: bool
    background: bool
    ring_bytes: int


class ExecStarted(TypedDict):
    """A background exec's answer (201)."""
    exec_id: str
    pid: int
    started_at: str
    ring_bytes: int


class ExecInfo(TypedDict):
    exec_id: str
    pid: int
    command: str
    args: list[str]
    cwd: str
    uid: int
    started_at: str
    running: bool
    exit_code: int | None
    signal: str
    ended_at: str | None
    bytes_written: int
    bytes_dropped: int
    next_id: int
    ring_bytes: int


class Reaped(TypedDict):
    exec_id: str
    reaped: bool


class LogsQuery(TypedDict, total=False):
    follow: bool
    from_id: int
    stdio: Literal["text", "base64"]  # default: as the exec was started


class KillRequest(TypedDict, total=False):
    signal: str  # TERM (escalates to KILL after grace_ms), KILL, INT, HUP, QUIT, USR1, USR2
    grace_ms: int


class Killed(TypedDict):
    exec_id: str
    pid: int
    running: bool
    signal_sent: str


class WaitQuery(TypedDict, total=False):
    timeout: float  # seconds, at most 600


class Exited(TypedDict):
    exec_id: str
    running: bool
    exit_code: int | None
    signal: str
    ended_at: str | None
    timed_out: bool


# --- files ---------------------------------------------------------------------------------------

class CpQuery(TypedDict, total=False):
    path: str
    mode: Literal["binary", "tar", "cp-v1-binary", "cp-v1-tar", "cp-v1-recursive"]
    uid: int
    gid: int
    permissions: str  # octal
    source_name: str
    source_type: Literal["file", "directory"]
    copy_contents: bool
    exclude: list[str]
    # The copy's bytes go on the bulk port, as the transfer with this token (32 hex; see
    # slicer.channel.bulk). Upload: the answer is NDJSON, ``{"ready": true}`` once the agent reads
    # the port (with ``"digest": true`` for a chunked copy's chunk: the host sends the payload's
    # SHA-256 before the transfer's end), then ``{"status": N, "answer": Copied | Error}``.
    # Download: the answer has the headers (``X-Slicer-Content-Length`` for a file's size) and no body.
    bulk: str


class Copied(TypedDict):
    path: str
    mode: Literal["binary", "tar"]
    size: NotRequired[int]  # binary
    entries: NotRequired[int]  # tar


class PathQuery(TypedDict, total=False):
    path: str
    uid: int  # the guest user whose rights apply (the agent's rule for paths without one)


class RemoveQuery(PathQuery, total=False):
    recursive: bool


class MkdirRequest(TypedDict):
    path: str
    recursive: NotRequired[bool]
    mode: NotRequired[str]
    uid: NotRequired[int]


class DirEntry(TypedDict):
    name: str
    type: str
    size: int
    mtime: str  # RFC 3339, UTC
    mode: str


class Created(TypedDict):
    path: str
    created: bool


class Removed(TypedDict):
    path: str
    removed: bool


class WatchQuery(TypedDict, total=False):
    paths: list[str]
    patterns: list[str]
    events: list[str]
    recursive: bool
    one_shot: bool
    debounce: str
    timeout: str
    max_events: int


class ShellQuery(TypedDict, total=False):
    uid: int
    gid: int
    shell: str
    cwd: str


# --- provisioning --------------------------------------------------------------------------------

class Secret(TypedDict):
    data: str  # base64
    permissions: str  # octal
    uid: int
    gid: int


class SecretsSynced(TypedDict):
    secrets: list[str]
    removed: list[str]


class SshKeys(TypedDict):
    keys: list[str]
    user: NotRequired[str]


class KeysInstalled(TypedDict):
    user: str
    keys: int


class Userdata(TypedDict):
    script: str


class UserdataStatus(TypedDict):
    status: str


class CAInstalled(TypedDict):
    """``PUT /ca`` (the body: PEM certificate blocks, at most 1 MiB): the short ids (12 hex of
    each block's SHA-256) of the bundle, and whether anything was written (false: it was there)."""
    certificates: list[str]
    changed: bool


class Identity(TypedDict, total=False):
    """A restored or forked guest's new self (built by slicer.core.identity)."""
    seed: str  # base64, mixed into the guest's entropy
    time_ns: int
    ip: str
    gateway: str
    mac: str
    dns: list[str]
    hostname: str
    machine_id: str
    ssh_host_keys: dict[str, Any]


class IdentityReset(TypedDict):
    reset: list[str]


class Settled(TypedDict):
    settled: bool


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: Method
    path: str
    answer: Answer
    response: Any  # the TypedDict (or list of one) of a JSON answer; None for a stream
    query: type | None = None
    body: Body = "none"
    request: type | None = None  # the TypedDict of a JSON body

    @property
    def params(self) -> tuple[str, ...]:
        """The names of the path's ``{param}``s, in order."""
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{") and part.endswith("}"))

    def url(self, **params: str) -> str:
        """The path with its parameters filled in (each one quoted whole: no ``/`` can slip in)."""
        if set(params) != set(self.params):
            raise TypeError(f"{self.name} takes path parameters {self.params}, not {tuple(params)}")
        path = self.path
        for key, value in params.items():
            path = path.replace("{" + key + "}", quote(str(value), safe=""))
        return path


def _table(*endpoints: Endpoint) -> dict[str, Endpoint]:
    table = {e.name: e for e in endpoints}
    assert len(table) == len(endpoints), "endpoint names must be unique"
    return table


ENDPOINTS: dict[str, Endpoint] = _table(
    # status
    Endpoint("health", "GET", "/health", "json", Health),
    Endpoint("stats", "GET", "/stats", "json", Stats),
    Endpoint("power", "POST", "/power", "json", Message, query=PowerQuery),
    # exec (slicer.agent.http_exec)
    Endpoint("exec", "POST", "/exec", "stream", None, query=ExecQuery, body="bytes"),
    Endpoint("list_execs", "GET", "/exec", "json", list[ExecInfo]),
    Endpoint("exec_status", "GET", "/exec/{exec_id}", "json", ExecInfo),
    Endpoint("reap_exec", "DELETE", "/exec/{exec_id}", "json", Reaped),
    Endpoint("exec_logs", "GET", "/exec/{exec_id}/logs", "stream", None, query=LogsQuery),
    Endpoint("kill_exec", "POST", "/exec/{exec_id}/kill", "json", Killed, body="json", request=KillRequest),
    Endpoint("wait_exit", "GET", "/exec/{exec_id}/wait-exit", "json", Exited, query=WaitQuery),
    # files (slicer.agent.http_files, http_fs)
    Endpoint("cp_in", "POST", "/cp", "json", Copied, query=CpQuery, body="bytes"),
    Endpoint("cp_out", "GET", "/cp", "stream", None, query=CpQuery),
    Endpoint("readdir", "GET", "/fs/readdir", "json", list[DirEntry], query=PathQuery),
    Endpoint("stat", "GET", "/fs/stat", "json", DirEntry, query=PathQuery),
    Endpoint("mkdir", "POST", "/fs/mkdir", "json", Created, body="json", request=MkdirRequest),
    Endpoint("remove", "DELETE", "/fs/remove", "json", Removed, query=RemoveQuery),
    Endpoint("watch", "GET", "/fs/watch", "stream", None, query=WatchQuery),
    # shell (slicer.agent.http_shell)
    Endpoint("shell", "GET", "/shell", "websocket", None, query=ShellQuery),
    # provisioning (slicer.agent.http_provision)
    Endpoint("identity", "POST", "/identity", "json", IdentityReset, body="json", request=Identity),
    Endpoint("settle", "POST", "/settle", "json", Settled),
    Endpoint("put_secrets", "PUT", "/secrets", "json", SecretsSynced, body="json", request=dict[str, Secret]),
    Endpoint("put_ssh_keys", "PUT", "/ssh-keys", "json", KeysInstalled, body="json", request=SshKeys),
    Endpoint("userdata", "POST", "/userdata", "json", UserdataStatus, body="json", request=Userdata),
    Endpoint("put_ca", "PUT", "/ca", "json", CAInstalled, body="bytes"),
)

