"""Every ``code`` the API answers with, its statuses and its meaning (docs/api.md lists them:
``python3 -m slicer.core.error_codes`` prints the table)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every ``code`` the API answers with; :data:`ERROR_CODES` gives each its statuses and meaning."""

    # -- requests ---------------------------------------------------------------------------------
    BAD_REQUEST = "bad_request"
    INVALID_REQUEST = "invalid_request"
    INVALID_HOSTNAME = "invalid_hostname"
    INVALID_IP = "invalid_ip"
    INVALID_SIZE = "invalid_size"
    LIMIT_EXCEEDED = "limit_exceeded"
    INVALID_NETWORK = "invalid_network"
    INVALID_ACTION = "invalid_action"
    INVALID_COUNT = "invalid_count"
    INVALID_LINES = "invalid_lines"
    INVALID_TARGET = "invalid_target"
    INVALID_TIMEOUT = "invalid_timeout"
    INVALID_COMMIT_ID = "invalid_commit_id"
    INVALID_NAME = "invalid_name"
    INVALID_BASE64 = "invalid_base64"
    INVALID_PERMISSIONS = "invalid_permissions"
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED = "unsupported"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    HOST_NOT_ALLOWED = "host_not_allowed"
    PROTECTED = "protected"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_IMPLEMENTED = "not_implemented"
    # -- what does not exist ----------------------------------------------------------------------
    VM_NOT_FOUND = "vm_not_found"
    HOSTGROUP_NOT_FOUND = "hostgroup_not_found"
    COMMIT_NOT_FOUND = "commit_not_found"
    SECRET_NOT_FOUND = "secret_not_found"
    PROXY_CLIENT_NOT_FOUND = "proxy_client_not_found"
    PROXY_SECRET_NOT_FOUND = "proxy_secret_not_found"
    PROXY_RULE_NOT_FOUND = "proxy_rule_not_found"
    LOG_NOT_FOUND = "log_not_found"
    # -- a VM's state (slicer/core/actions.py) ----------------------------------------------------
    CONFLICT = "conflict"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    SUSPENDING = "suspending"
    NOT_RUNNING = "not_running"
    SUSPENDED = "suspended"
    NOT_SUSPENDED = "not_suspended"
    DELETED = "deleted"
    INVALID_STATE = "invalid_state"
    EXISTS = "exists"
    IP_IN_USE = "ip_in_use"
    NO_FREE_ADDRESS = "no_free_address"
    NOT_PERSISTENT = "not_persistent"
    NO_DISK = "no_disk"
    COMMIT_IN_USE = "commit_in_use"
    BOOT_COLD = "boot_cold"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    DISK_TAMPERED = "disk_tampered"
    # -- the guest's agent (codes it may pass through: slicer/agent/protocol.py) -------------------
    AGENT_UNAVAILABLE = "agent_unavailable"
    AGENT_ERROR = "agent_error"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    TIMEOUT = "timeout"
    SETUP_FAILED = "setup_failed"
    COPY_FAILED = "copy_failed"
    FS_ERROR = "fs_error"
    INVALID_CWD = "invalid_cwd"
    UNSAFE_TAR = "unsafe_tar"
    EXEC_FAILED = "exec_failed"
    IS_DIRECTORY = "is_directory"
    NOT_A_DIRECTORY = "not_a_directory"
    NOT_EMPTY = "not_empty"
    UNSAFE_PATH = "unsafe_path"
    UNSAFE_SESSION = "unsafe_session"
    GONE = "gone"
    PERMISSION_DENIED = "permission_denied"
    BUDGET_EXHAUSTED = "budget_exhausted"
    BULK_BUSY = "bulk_busy"
    BULK_UNAVAILABLE = "bulk_unavailable"
    # -- the host ---------------------------------------------------------------------------------
    INTERNAL_ERROR = "internal_error"
    INSUFFICIENT_STORAGE = "insufficient_storage"
    UNAVAILABLE = "unavailable"
    BAD_GATEWAY = "bad_gateway"
    VM_START_FAILED = "vm_start_failed"
    NETWORK_FAILED = "network_failed"
    NETWORK_UNAVAILABLE = "network_unavailable"
    SUSPEND_FAILED = "suspend_failed"
    STATE_MISSING = "state_missing"
    TEMPLATE_FAILED = "template_failed"
    FORK_FAILED = "fork_failed"
    COMMIT_FAILED = "commit_failed"
    COMMIT_MISSING = "commit_missing"
    KEYGEN_FAILED = "keygen_failed"
    IMAGE_ERROR = "image_error"
    IMAGE_UNAVAILABLE = "image_unavailable"
    KERNEL_UNAVAILABLE = "kernel_unavailable"
    CONFINEMENT_UNAVAILABLE = "confinement_unavailable"
    DATA_DIR = "data_dir"
    DATA_DIR_LOCKED = "data_dir_locked"


C = ErrorCode
# code → (the statuses it comes with, what it means)
ERROR_CODES: dict[ErrorCode, tuple[tuple[int, ...], str]] = {
    C.BAD_REQUEST: ((400,), "the request is malformed (a more precise code is used where there is one)"),
    C.INVALID_REQUEST: ((400,), "a field, parameter or body is invalid; the message names it"),
    C.INVALID_HOSTNAME: ((400,), "not a hostname (RFC 1123 label), or a reserved one"),
    C.INVALID_IP: ((400,), "not an IPv4 address, or not one of the host group's VM addresses"),
    C.INVALID_SIZE: ((400,), "RAM below 64 MiB"),
    C.LIMIT_EXCEEDED: ((400,), "cpus or RAM above the host group's"),
    C.INVALID_NETWORK: ((400,), "a VM's own allow/drop outside an isolated host group"),
    C.INVALID_ACTION: ((400,), "a shutdown action other than shutdown or reboot"),
    C.INVALID_COUNT: ((400,), "a fork count outside 1..32"),
    C.INVALID_LINES: ((400,), "a negative number of log lines"),
    C.INVALID_TARGET: ((400,), "a forward target that is not a port, host:port or unix:/path"),
    C.INVALID_TIMEOUT: ((400,), "a duration that cannot be read (30s, 5m, 1h)"),
    C.INVALID_COMMIT_ID: ((400,), "a commit id with characters a commit id never has"),
    C.INVALID_NAME: ((400,), "a secret name that is not a safe file name"),
    C.INVALID_BASE64: ((400,), "a secret's data is not base64"),
    C.INVALID_PERMISSIONS: ((400,), "a secret's permissions are not octal"),
    C.INVALID_IMAGE: ((400,), "an image reference that cannot be parsed or pulled as given"),
    C.IMAGE_TOO_LARGE: ((400,), "an image bigger than its bound (disk or unpacked size)"),
    C.UNSUPPORTED: ((400,), "a feature this daemon does not have (the message says which)"),
    C.TOO_LARGE: ((413,), "a body or field above its limit"),
    C.UNSUPPORTED_MEDIA_TYPE: ((415,), "a body of another type than the route reads"),
    C.UNAUTHORIZED: ((401,), "no bearer token, or the wrong one"),
    C.FORBIDDEN: ((403,), "not allowed"),
    C.HOST_NOT_ALLOWED: ((403,), "a Host header that is not the daemon's (DNS rebinding)"),
    C.PROTECTED: ((403,), "a service of the config, or a VM created protected: not deleted"),
    C.NOT_FOUND: ((404,), "no such route, or the agent found no such file"),
    C.METHOD_NOT_ALLOWED: ((405,), "the route exists with other methods"),
    C.NOT_IMPLEMENTED: ((501,), "an official route this daemon does not build (the message says why)"),
    C.VM_NOT_FOUND: ((404,), "no VM of that name (or not in that host group)"),
    C.HOSTGROUP_NOT_FOUND: ((404,), "no host group of that name"),
    C.COMMIT_NOT_FOUND: ((404,), "no commit of that id"),
    C.SECRET_NOT_FOUND: ((404,), "no secret of that name"),
    C.PROXY_CLIENT_NOT_FOUND: ((404, 400), "no proxy client of that name (400 where a rule names one)"),
    C.PROXY_SECRET_NOT_FOUND: ((404, 400), "no proxy secret of that name (400 where a rule names one)"),
    C.PROXY_RULE_NOT_FOUND: ((404,), "the client has no rule for that host, or none with that tuple"),
    C.LOG_NOT_FOUND: ((404,), "the VM has written no console log yet"),
    C.CONFLICT: ((409,), "the request conflicts with the state of things"),
    C.STARTING: ((409,), "the VM is starting (or being restored and not yet itself)"),
    C.RUNNING: ((409,), "the VM is running (a relaunch or commit needs it stopped)"),
    C.PAUSED: ((409,), "the VM is paused: resume it first"),
    C.STOPPING: ((409,), "the VM is shutting down"),
    C.SUSPENDING: ((409,), "the VM's memory is being saved"),
    C.NOT_RUNNING: ((409,), "the VM is stopped or crashed"),
    C.SUSPENDED: ((409,), "the VM is suspended: restore it first"),
    C.NOT_SUSPENDED: ((409,), "a restore of a VM that is not suspended"),
    C.DELETED: ((409,), "the VM is being deleted, or was while the request waited"),
    C.INVALID_STATE: ((409,), "pause of a paused VM, resume of a running one, or the VMM refused"),
    C.EXISTS: ((409,), "a VM or secret of that name exists (or the agent's path exists)"),
    C.IP_IN_USE: ((409,), "another VM has that address"),
    C.NO_FREE_ADDRESS: ((409,), "the host group's network has no free address"),
    C.NOT_PERSISTENT: ((409,), "only a persistent VM's disk can be committed"),
    C.NO_DISK: ((409,), "the VM never booted: nothing to commit"),
    C.COMMIT_IN_USE: ((409,), "a VM or later commit reads through this commit"),
    C.BOOT_COLD: ((409,), "the host group boots cold: it has no template"),
    C.INSUFFICIENT_MEMORY: ((409,), "the host has not the memory the fork's copies need"),
    C.DISK_TAMPERED: ((409,), "a disk's header no longer matches the daemon's record of its chain"),
    C.AGENT_UNAVAILABLE: ((503,), "the VM's agent does not answer (yet)"),
    C.AGENT_ERROR: ((502,), "the agent failed in a way it may not report as a request error"),
    C.UPSTREAM_UNREACHABLE: ((502,), "a forward's target in the VM does not answer"),
    C.TIMEOUT: ((408,), "the VM was not ready (or userdata not done) within the timeout"),
    C.SETUP_FAILED: ((500,), "the guest's setup after a restore (identity reset) failed"),
    C.COPY_FAILED: ((400, 409), "the agent could not write or read the file"),
    C.FS_ERROR: ((400, 409), "a filesystem call failed in the guest"),
    C.INVALID_CWD: ((400,), "the exec's working directory cannot be used"),
    C.UNSAFE_TAR: ((400,), "a tar member would land outside the destination, or is a device"),
    C.EXEC_FAILED: ((400,), "the command could not be started"),
    C.IS_DIRECTORY: ((400, 409), "a file was expected"),
    C.NOT_A_DIRECTORY: ((400, 409), "a directory was expected"),
    C.NOT_EMPTY: ((409,), "a directory with entries, removed without recursive"),
    C.UNSAFE_PATH: ((400,), "a path through a link the user may not follow"),
    C.UNSAFE_SESSION: ((400,), "a chunked copy's session is not the agent's own"),
    C.GONE: ((410,), "a background exec that was reaped"),
    C.PERMISSION_DENIED: ((409,), "the guest user lacks the right (a state of the guest)"),
    C.BUDGET_EXHAUSTED: ((503,), "the agent's output buffers are full: retry later"),
    C.BULK_BUSY: ((409,), "between daemon and agent only: the bulk port is taken (the copy goes through the channel)"),
    C.BULK_UNAVAILABLE: ((409,), "between daemon and agent only: the VM has no bulk port (the channel is used)"),
    C.INTERNAL_ERROR: ((500,), "a fault of the daemon's: the message and its log say what"),
    C.INSUFFICIENT_STORAGE: ((507,), "the data directory's file system is full"),
    C.UNAVAILABLE: ((503,), "not ready yet"),
    C.BAD_GATEWAY: ((502,), "something outside the daemon failed (a registry)"),
    C.VM_START_FAILED: ((500,), "the VMM could not start"),
    C.NETWORK_FAILED: ((500,), "the VM's network link could not be made"),
    C.NETWORK_UNAVAILABLE: ((500,), "the host's network for the VMs cannot be set up"),
    C.SUSPEND_FAILED: ((500,), "saving the VM's state failed; it runs on"),
    C.STATE_MISSING: ((500,), "a suspended VM's saved state is gone"),
    C.TEMPLATE_FAILED: ((500,), "the host group's template could not be built"),
    C.FORK_FAILED: ((500,), "capturing the source of a fork failed"),
    C.COMMIT_FAILED: ((500,), "making or removing a commit's disk layers failed"),
    C.COMMIT_MISSING: ((500,), "a commit's disk is missing"),
    C.KEYGEN_FAILED: ((500,), "ssh-keygen failed making a clone's host keys"),
    C.IMAGE_ERROR: ((500,), "the boot image could not be used"),
    C.IMAGE_UNAVAILABLE: ((503,), "the host group's image could not be pulled"),
    C.KERNEL_UNAVAILABLE: ((503,), "the configured kernel could not be had: no VM boots"),
    C.CONFINEMENT_UNAVAILABLE: ((500,), "the VMMs cannot be confined as the config asks (at start)"),
    C.DATA_DIR: ((500,), "the data directory cannot be used (at start)"),
    C.DATA_DIR_LOCKED: ((500,), "another daemon holds the data directory (at start)"),
}


def markdown_table() -> str:
    """The table docs/api.md shows under "Error codes"."""
    rows = ["| code | status | meaning |", "|---|---|---|"]
    rows += [f"| `{code}` | {', '.join(map(str, statuses))} | {meaning} |"
             for code, (statuses, meaning) in ERROR_CODES.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
