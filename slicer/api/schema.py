"""The API's answers as pydantic models: the OpenAPI schema shows them, routes answer through
them, and the SDK (``slicer.client``) reads answers into the same classes.

Only pydantic is imported here, not FastAPI or the daemon's modules: the SDK imports this module
and must stay light. Every model keeps keys it does not declare (``extra="allow"``): routes answer
with ``exclude_unset``, so what a route returns goes on the wire as it was (no key dropped, no
null added), and an older SDK reads a newer daemon. Fields are declared in the order routes build
them, so not even the order of keys changes. Defaults are the SDK's (an answer that leaves a
field out reads as that default); they never reach the wire.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- daemon --------------------------------------------------------------------------------------
class Liveness(Answer):
    status: str


class Info(Answer):
    version: str
    git_commit: str = ""
    platform: str = ""
    arch: str = ""
    hypervisor: str = ""
    hypervisor_requested: str = ""
    accelerator: str = ""
    image: str = ""
    kernel: str = ""
    group_images: dict[str, Any] = {}  # group → image reference, or {"error": why it cannot}
    network: dict[str, Any] = {}  # group → backend and addresses
    confinement: dict[str, Any] = {}  # VMMs' uids, seccomp filter, cgroups
    warm_pools: dict[str, Any] = {}  # group → size, ready, filling, hits, misses (groups with warm_pool)


class HostGroup(Answer):
    name: str
    count: int
    ram_bytes: int
    cpus: int
    gpu_count: int = 0
    arch: str = "x86_64"


# -- nodes ---------------------------------------------------------------------------------------
class Node(Answer):
    hostname: str
    hostgroup: str = ""
    ip: str = ""
    ram_bytes: int = 0
    cpus: int = 0
    created_at: str = ""
    tags: list[str] = []
    arch: str = "x86_64"
    status: str = ""
    persistent: bool = False
    kind: str = ""
    boot: str | None = None  # how the running VM started: boot, template, suspend, fork, adopted
    warnings: list[str] | None = None
    vmm: dict[str, Any] | None = None  # its QEMU: pid, confinement, cgroup usage
    last_agent_call: str | None = None
    channel_fault: str | None = None  # why the guest's channel was cut off


class BackgroundExecSummary(Answer):
    exec_id: str
    command: str
    pid: int
    state: str  # running, exited
    started_at: str | None = None
    exit_code: int | None = None


class Policy(Answer):
    allow: list[str] = []
    drop: list[str] = []


class NetworkView(Answer):
    mode: str
    policy_source: str  # host_group, or vm for a VM with lists of its own (as the Go SDK's tests show Slicer's)
    host_group: Policy
    override: Policy | None = None
    effective: Policy


class NodeDetail(Node):
    """``GET /vm/{hostname}``: the node, its agent connections, background execs (when its agent
    answers), storage, image, lineage and network policy."""

    open_agent_connections: int = 0
    bg_execs: list[BackgroundExecSummary] | None = None
    storage: str | None = None
    image: str | None = None
    commit_id: str | None = None
    parent_commit_id: str | None = None
    network: NetworkView | None = None


class NodeStats(Node):
    snapshot: dict[str, Any] | None = None  # the guest meter's, as it reported it
    error: str | None = None  # instead of a snapshot, when the agent did not answer


class CreatedNode(Answer):
    """Slicer's SlicerCreateNodeResponse."""

    hostname: str
    hostgroup: str
    ip: str
    created_at: str
    arch: str


class NodeDeleted(Answer):
    message: str
    disk_removed: str  # "true" or "false", as Slicer says it


class ConsoleLog(Answer):
    hostname: str
    lines: int
    content: str


class Health(Answer):
    """The guest agent's health (its own words, passed on). Uptimes are in nanoseconds, as
    Slicer's Go agent sends a ``time.Duration``; ``*_seconds`` give them in whole seconds."""

    hostname: str
    agent_uptime: int
    agent_version: str
    system_uptime: int
    userdata_ran: bool = False
    userdata_exit_code: int | None = None
    agent_uptime_seconds: int = 0
    system_uptime_seconds: int = 0
    ip: str = ""


class Tags(Answer):
    hostname: str
    tags: list[str] = []


# -- storage and templates -----------------------------------------------------------------------
class TemplateUsage(Answer):
    """A host group's saved, booted VM that sandboxes restore from, and what it takes on disk."""

    name: str
    hostgroup: str
    cpus: int = 0
    ram_bytes: int = 0
    created_at: str = ""
    retired: bool = False
    clones: int = 0
    state_bytes: int = 0
    disk_bytes: int = 0


class NodeUsage(Answer):
    hostname: str
    hostgroup: str = ""
    status: str = ""
    template: str | None = None
    disk: str = ""
    disk_bytes: int = 0
    state_bytes: int = 0


class CommitUsage(Answer):
    commit_id: str
    source_hostname: str = ""
    disk_bytes: int = 0


class KeptDisk(Answer):
    disk: str
    disk_bytes: int = 0


class Storage(Answer):
    templates: list[TemplateUsage] = []
    nodes: list[NodeUsage] = []
    commits: list[CommitUsage] = []
    kept_disks: list[KeptDisk] = []
    total_bytes: int = 0


# -- commits and forks ---------------------------------------------------------------------------
class CommitInfo(Answer):
    """A commit as ``GET /vm/commits`` lists it."""

    commit_id: str
    source_hostname: str = ""
    source_host_group: str = ""
    created_at: str = ""
    mode: str = "disk"
    tags: list[str] = []
    labels: dict[str, str] = {}
    cache_key: str = ""


class CommitCreated(Answer):
    hostname: str
    commit_id: str
    status: str  # committed
    parent_status: str
    mode: str
    tags: list[str]
    labels: dict[str, str]
    cache_key: str


class CommitDeleted(Answer):
    commit_id: str
    status: str  # deleted


class CommitFork(Answer):
    """A VM booted from a commit (cold fork)."""

    hostname: str
    child_hostname: str  # the TypeScript SDK's name for hostname
    source_hostname: str
    commit_id: str
    status: str  # forked
    parent_status: str
    child_status: str
    mode: str
    persistent: bool


class LiveFork(Answer):
    """A copy of a running VM (live fork)."""

    hostname: str
    hostgroup: str
    ip: str
    source_hostname: str
    status: str  # forked
    child_status: str
    mode: str  # memory
    persistent: bool
    created_at: str


# -- secrets -------------------------------------------------------------------------------------
class Secret(Answer):
    """A secret's metadata; its data never leaves the daemon."""

    name: str
    size: int
    permissions: str
    uid: int
    gid: int
    mod_time: str
    modified_at: str = ""  # the TypeScript SDK's name for mod_time


# -- exec and files: the guest agent's answers, passed on ----------------------------------------
class ExecFrame(Answer):
    """One NDJSON frame: ``type`` is started, stdout, stderr, exit (or gap in background logs)."""

    type: str = ""
    data: str = ""
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    pid: int | None = None
    signal: str = ""
    error: str = ""
    id: int | None = None


class ExecResult(Answer):
    """A buffered exec's whole output."""

    stdout: str
    stderr: str
    exit_code: int


class BackgroundExec(Answer):
    exec_id: str
    pid: int | None = None
    running: bool | None = None
    exit_code: int | None = None
    ring_bytes: int | None = None


class BackgroundKilled(Answer):
    exec_id: str
    pid: int | None = None
    running: bool | None = None
    signal_sent: str = ""


class BackgroundExit(Answer):
    exec_id: str
    running: bool | None = None
    exit_code: int | None = None
    signal: str = ""
    ended_at: str | None = None
    timed_out: bool = False


class BackgroundReaped(Answer):
    exec_id: str
    reaped: bool = True


class Copied(Answer):
    """``POST /vm/{hostname}/cp``: where it landed, and its size (binary) or entries (tar)."""

    path: str
    mode: str
    size: int | None = None
    entries: int | None = None


class FsEntry(Answer):
    name: str
    type: str  # file, directory, symlink
    size: int
    mtime: str  # RFC 3339, UTC (e.g. 2026-12-02T23:14:09Z): what the official SDKs parse
    mode: str  # octal permission bits


class FsChanged(Answer):
    path: str
    created: bool | None = None
    removed: bool | None = None


# -- Slicer Proxy (/proxy/v1) --------------------------------------------------------------------
class ProxyClient(Answer):
    name: str
    created_at: str = ""


class ProxyClientToken(ProxyClient):
    """A new client; its token is shown this once (the daemon keeps only a digest)."""

    token: str


class ProxySecret(Answer):
    """A proxy secret's metadata; its value never leaves the host, nor enters a VM."""

    name: str
    host: str
    type: str = "bearer"
    created_at: str = ""
    updated_at: str | None = None


class ProxyAllowRule(Answer):
    host: str
    secret: str | None = None
    methods: list[str] | None = None
    paths: list[str] | None = None
    ports: list[int] | None = None
    expires: str | None = None
    passthrough: bool | None = None


class ProxyAuditEntry(Answer):
    """One decision of a proxy (``slicer proxy up``), as its audit line says it."""

    time: str
    msg: str  # allow, deny, close (a passthrough tunnel's end)
    client: str | None = None
    method: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    inject: str | None = None
    status: int | None = None
    mode: str | None = None
    reason: str | None = None
    duration_ms: int | None = None
