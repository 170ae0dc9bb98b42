"""Typed views of the API's JSON (pydantic). Unknown fields are kept, so a newer daemon
does not break an older SDK."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Info(_Model):
    version: str
    git_commit: str = ""
    platform: str = ""
    arch: str = ""
    accelerator: str = ""


class HostGroup(_Model):
    name: str
    count: int
    ram_bytes: int
    cpus: int
    gpu_count: int = 0
    arch: str = "x86_64"


class Node(_Model):
    hostname: str
    hostgroup: str = ""
    ip: str = ""
    ram_bytes: int = 0
    cpus: int = 0
    created_at: str = ""
    tags: list[str] = []
    arch: str = "x86_64"
    status: str = ""
    boot: str | None = None  # how the running VM started: boot, template or suspend


class CreatedNode(_Model):
    hostname: str
    hostgroup: str
    ip: str
    created_at: str
    arch: str


class Health(_Model):
    hostname: str
    agent_uptime: int
    agent_version: str
    system_uptime: int
    userdata_ran: bool = False


class ExecFrame(_Model):
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


class ExecResult(_Model):
    stdout: str
    stderr: str
    exit_code: int


class BackgroundExec(_Model):
    exec_id: str
    pid: int | None = None
    running: bool | None = None
    exit_code: int | None = None
    ring_bytes: int | None = None


class Secret(_Model):
    name: str
    size: int
    permissions: str
    uid: int
    gid: int
    mod_time: str


class NodeStats(Node):
    snapshot: dict | None = None
    error: str | None = None


class TemplateUsage(_Model):
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


class NodeUsage(_Model):
    hostname: str
    hostgroup: str = ""
    status: str = ""
    template: str | None = None
    disk: str = ""
    disk_bytes: int = 0
    state_bytes: int = 0


class KeptDisk(_Model):
    disk: str
    disk_bytes: int = 0


class Storage(_Model):
    templates: list[TemplateUsage] = []
    nodes: list[NodeUsage] = []
    kept_disks: list[KeptDisk] = []
    commits: list[dict] = []  # commit_id, source_hostname, disk_bytes
    total_bytes: int = 0


class Tags(_Model):
    hostname: str
    tags: list[str] = []


class Commit(_Model):
    """A VM's disk frozen as an immutable parent that VMs fork from."""

    commit_id: str
    source_hostname: str = ""
    source_host_group: str = ""
    created_at: str = ""
    mode: str = "disk"
    tags: list[str] = []
    labels: dict[str, str] = {}
    cache_key: str = ""
    # in the answer to a commit
    hostname: str = ""
    status: str = ""
    parent_status: str = ""


class Fork(_Model):
    """A VM made from a commit (cold fork) or from a running VM (live fork)."""

    hostname: str
    source_hostname: str = ""
    commit_id: str = ""
    status: str = ""
    parent_status: str = ""
    child_status: str = ""
    mode: str = ""
    persistent: bool = False
    ip: str = ""
