"""What a node can be asked to do, and in which states: one table for the whole lifecycle.

Firecracker's ``VmmAction`` idea one level above the driver (whose own table is in
:mod:`slicer.vmm.base`): every request that changes a node, or needs its agent, names a
:class:`NodeAction`; :func:`check` refuses it with one clear error unless the node's
:class:`NodeState` allows it. Actions that change a node run one at a time under the node's
lock (:meth:`slicer.core.node.Node.act`), which checks the state *after* taking the lock: a
delete that waited for a create sees the VM the create started, and a create that waited for
a delete finds the node gone and starts nothing.

============  ==============================================  =====================================
action        allowed in                                      what it does
============  ==============================================  =====================================
``launch``    stopped (a new record)                          first boot of a created VM
``delete``    any but deleted                                 VM ended, record (and sandbox disk) gone
``shutdown``  starting, running, paused                       ACPI power-off, killed after a timeout
``reboot``    running, paused                                 the agent reboots (else a reset)
``pause``     running                                         vCPUs stop
``resume``    paused                                          vCPUs run
``suspend``   running, paused                                 memory and devices saved, QEMU ends
``restore``   suspended                                       QEMU started from the saved state
``relaunch``  stopped, crashed, suspended, stopping (waits)   boots again from its disk
``agent``     running                                         exec, files, shell, forwards, health
``commit``    stopped, crashed (persistent VMs)               its disk frozen into a commit
``fork``      running, paused                                 live copies (paused a moment)
============  ==============================================  =====================================
"""

from __future__ import annotations

import enum

from slicer.core.error_codes import ErrorCode
from slicer.core.errors import Conflict, NotFound


class NodeState(enum.StrEnum):
    """A node's state; the value is what the API shows as ``status``."""

    STARTING = "Starting"  # QEMU being started (boot, restore, relaunch), or not yet running vCPUs
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPING = "Stopping"  # a power-off we asked for is under way
    SUSPENDING = "Suspending"  # its memory is being saved
    STOPPED = "Stopped"  # no QEMU: powered off, shut down, or not yet booted
    CRASHED = "Crashed"  # its QEMU ended without the guest powering off
    SUSPENDED = "Suspended"  # its memory is saved on disk; restore resumes it
    DELETING = "Deleting"
    DELETED = "Deleted"  # gone; a request that waited for the delete finds nothing


class NodeAction(enum.StrEnum):
    LAUNCH = "launch"
    DELETE = "delete"
    SHUTDOWN = "shutdown"
    REBOOT = "reboot"
    PAUSE = "pause"
    RESUME = "resume"
    SUSPEND = "suspend"
    RESTORE = "restore"
    RELAUNCH = "relaunch"
    AGENT = "agent"
    COMMIT = "commit"
    FORK = "fork"


S = NodeState
ALLOWED: dict[NodeAction, frozenset[NodeState]] = {
    NodeAction.LAUNCH: frozenset({S.STOPPED}),
    NodeAction.DELETE: frozenset(set(S) - {S.DELETED}),
    NodeAction.SHUTDOWN: frozenset({S.STARTING, S.RUNNING, S.PAUSED}),
    NodeAction.REBOOT: frozenset({S.RUNNING, S.PAUSED}),
    NodeAction.PAUSE: frozenset({S.RUNNING}),
    NodeAction.RESUME: frozenset({S.PAUSED}),
    NodeAction.SUSPEND: frozenset({S.RUNNING, S.PAUSED}),
    NodeAction.RESTORE: frozenset({S.SUSPENDED}),
    NodeAction.RELAUNCH: frozenset({S.STOPPED, S.CRASHED, S.SUSPENDED, S.STOPPING}),
    NodeAction.AGENT: frozenset({S.RUNNING}),
    NodeAction.COMMIT: frozenset({S.STOPPED, S.CRASHED}),
    NodeAction.FORK: frozenset({S.RUNNING, S.PAUSED}),
}

# Why an action is refused: by the node's state (the text follows the hostname), with the
# error code clients match on...
_REFUSED_IN: dict[NodeState, tuple[str, str]] = {
    S.STARTING: ("is starting", "starting"),
    S.RUNNING: ("is running", "running"),
    S.PAUSED: ("is paused; resume it first", "paused"),
    S.STOPPING: ("is shutting down", "stopping"),
    S.SUSPENDING: ("is being suspended", "suspending"),
    S.STOPPED: ("is not running", "not_running"),
    S.CRASHED: ("is not running (its VMM crashed; relaunch it)", "not_running"),
    S.SUSPENDED: ("is suspended; restore it first", "suspended"),
    S.DELETING: ("is being deleted", "deleted"),
    S.DELETED: ("was deleted", "deleted"),
}
# ...and where an action needs its own words.
_REFUSED: dict[tuple[NodeAction, NodeState], tuple[str, str]] = {
    (NodeAction.PAUSE, S.PAUSED): ("is already paused", "invalid_state"),
    (NodeAction.RESUME, S.RUNNING): ("is not paused", "invalid_state"),
    (NodeAction.SUSPEND, S.SUSPENDED): ("is already suspended", "suspended"),
    (NodeAction.RELAUNCH, S.RUNNING): ("is already running", "running"),
    (NodeAction.RELAUNCH, S.PAUSED): ("is already running (paused)", "running"),
}
for _state in set(S) - {S.SUSPENDED, S.DELETING, S.DELETED}:
    _REFUSED.setdefault((NodeAction.RESTORE, _state), ("is not suspended", "not_suspended"))
_REFUSED[(NodeAction.LAUNCH, S.DELETED)] = ("was deleted while it was being created", "deleted")
for _state in (S.RUNNING, S.PAUSED, S.STARTING):
    _REFUSED[(NodeAction.COMMIT, _state)] = ("is running: shut it down first, then commit its disk", "running")


def check(action: NodeAction, state: NodeState, hostname: str) -> None:
    """Raise the error for ``action`` on a node in ``state``, unless the table allows it."""
    if state in ALLOWED[action]:
        return
    if state == S.DELETED and action != NodeAction.LAUNCH:
        raise NotFound(f"VM {hostname!r} not found (it was deleted)", ErrorCode.VM_NOT_FOUND)
    text, code = _REFUSED.get((action, state)) or _REFUSED_IN[state]
    raise Conflict(f"{hostname} {text}", code)
