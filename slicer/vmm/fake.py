"""A driver with no hypervisor: the lifecycle, reconcile and races run in-process, in milliseconds.

:class:`FakeDriver` keeps :mod:`slicer.vmm.base`'s contract and its state table (an action not
allowed raises :class:`VMStateError`, ``save`` writes a state file and ends the "process",
``start(restore_from=...)`` returns paused), but a VM is an object, not a QEMU. Its processes
live on a :class:`FakeHost`, which outlives a daemon as real processes do: a second daemon made
on the same host adopts them, and a test can crash one, power its guest off, or make the next
start fail.

Each VM has a :class:`FakeGuest` behind its channel socket, speaking the real channel protocol
(HELLO/READY, yamux from :mod:`slicer.channel.yamux`, ``CONNECT 0``) to a small aiohttp app
with a route for every JSON endpoint of the agent's protocol table (:mod:`slicer.agent.protocol`):
it records every call and answers what the lifecycle needs (health, identity, power, userdata…).
It never runs a command: what needs a real guest is tested on a real VM (``tests/``), not here
(``tests/unit/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from slicer.agent import protocol
from slicer.agent.demux import pump
from slicer.channel.yamux import AGENT_PORT, HELLO, READY, Session, Stream
from slicer.vmm.base import VM, Driver, VMMError, VMSpec, VMState, VMStateError

ALLOWED = {  # base.py's table: which action is allowed in which state
    "pause": {VMState.RUNNING},
    "resume": {VMState.PAUSED},
    "powerdown": {VMState.RUNNING, VMState.PAUSED},
    "reset": {VMState.RUNNING, VMState.PAUSED},
    "save": {VMState.RUNNING, VMState.PAUSED},
    "capture": {VMState.RUNNING, VMState.PAUSED},
}


class FakeGuest:
    """The guest's side of one VM's channel, with a recording agent behind it."""

    def __init__(self, vm: FakeVM) -> None:
        self.vm = vm
        self.calls: list[tuple[str, str, object]] = []  # (method, endpoint name, JSON body or query)
        self.userdata_ran = False
        self.fail: dict[str, int] = {}  # endpoint name → HTTP status the agent answers instead
        self.hostname = vm.spec.name
        self._server: asyncio.base_events.Server | None = None
        self._runner: web.AppRunner | None = None
        self._sessions: list[Session] = []
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def agent_socket(self) -> Path:
        return self.vm.spec.run_dir / "fake-agent.sock"

    def called(self, endpoint: str) -> list[object]:
        """The bodies (or queries) of the calls made to ``endpoint`` (its name in the protocol's
        table), oldest first."""
        assert endpoint in protocol.ENDPOINTS, endpoint
        return [body for _, name, body in self.calls if name == endpoint]

    async def start(self) -> None:
        app = web.Application()
        for endpoint in protocol.ENDPOINTS.values():  # the protocol's table, as the real agent
            if endpoint.answer == "json":
                app.router.add_route(endpoint.method, endpoint.path, self._handler(endpoint))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.agent_socket.unlink(missing_ok=True)
        await web.UnixSite(self._runner, str(self.agent_socket)).start()
        self.vm.spec.channel_socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._host_connected, str(self.vm.spec.channel_socket))

    async def stop(self) -> None:
        """The VMM process ended: its socket and every connection to it close."""
        for session in self._sessions:
            session.connection_lost("guest stopped")
        for writer in list(self._connections):
            writer.close()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def reboot(self) -> None:
        """The guest starts over: the host's sessions end, userdata has run (once per disk)."""
        for session in self._sessions:
            session.connection_lost("guest rebooted")
        self._sessions.clear()

    async def _host_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = None
        self._connections.add(writer)
        try:
            line = await reader.readline()
            if not line.startswith(HELLO):
                return
            writer.write(READY + line[len(HELLO):])
            session = Session(writer.write, writer.drain, client=False, on_stream=self._bridge)
            self._sessions.append(session)
            while data := await reader.read(65536):
                session.feed(data)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled: the test's event loop ends
        finally:
            self._connections.discard(writer)
            if session is not None:
                session.connection_lost("host disconnected")
                with contextlib.suppress(ValueError):
                    self._sessions.remove(session)
            writer.close()

    async def _bridge(self, stream: Stream) -> None:
        line = (await stream.readline()).decode(errors="replace").strip()
        if line != f"CONNECT {AGENT_PORT}":
            await stream.write(b"ERR the fake guest serves its agent only\n")
            await stream.close()
            return
        reader, writer = await asyncio.open_unix_connection(str(self.agent_socket))
        try:
            await stream.write(f"OK {AGENT_PORT}\n".encode())
            await pump(stream, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _handler(self, endpoint: protocol.Endpoint):
        async def handle(request: web.Request) -> web.StreamResponse:
            if endpoint.body == "json":
                body = await request.json()
            elif endpoint.name == "put_ca":
                body = await request.text()  # the PEM bundle itself
            else:
                body = dict(request.query)
            self.calls.append((endpoint.method, endpoint.name, body))
            if status := self.fail.get(endpoint.name):
                return web.json_response({"error": f"fake failure of {endpoint.name}", "code": "fake"}, status=status)
            return web.json_response(self._answer(endpoint.name, body))
        return handle

    def _answer(self, name: str, body: object) -> object:
        if name == "health":
            return {"hostname": self.hostname, "agent_uptime": 1, "agent_version": "fake", "system_uptime": 1,
                    "userdata_ran": self.userdata_ran, "userdata_exit_code": 0 if self.userdata_ran else None}
        if name == "identity" and isinstance(body, dict) and body.get("hostname"):
            self.hostname = body["hostname"]
        elif name == "userdata":
            self.userdata_ran = True
        elif name == "power":
            asyncio.get_running_loop().call_later(0.05, self.vm.guest_reboot)  # after the answer is out
        return {"list_execs": [], "stats": {"hostname": self.hostname, "loadAvg1": 0.0},
                "settle": {"settled": True}}.get(name, {"ok": True})


class FakeVM(VM):
    def __init__(self, host: FakeHost, spec: VMSpec, pid: int) -> None:
        self.host = host
        self.spec = spec
        self._pid = pid
        self._state = VMState.STARTING
        self._exit: int | None = None
        self._ended = asyncio.Event()
        self.guest = FakeGuest(self)
        self.actions: list[str] = []  # what was asked of it, in order

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exit_code(self) -> int | None:
        return self._exit

    def _check(self, action: str) -> None:
        self.actions.append(action)
        if self._state not in ALLOWED[action]:
            raise VMStateError(f"{action} is not allowed while the VM is {self._state.value}")

    async def pause(self) -> None:
        self._check("pause")
        self._state = VMState.PAUSED

    async def resume(self) -> None:
        self._check("resume")
        self._state = VMState.RUNNING

    async def powerdown(self) -> None:
        self._check("powerdown")
        if not self.host.ignore_powerdown:
            asyncio.get_running_loop().call_soon(self.end, 0)

    async def reset(self) -> None:
        self._check("reset")
        self.guest_reboot()

    async def kill(self) -> None:
        self.actions.append("kill")
        if self._state != VMState.STOPPED:
            self.end(-9)

    async def save(self, path: Path) -> None:
        self._check("save")
        path.write_text(json.dumps({"vm": self.spec.name, "fingerprint": self.host.fingerprint_of(self.spec)}))
        self.end(0)

    async def capture(self, path: Path, while_stopped: Callable[[], Awaitable[None]]) -> None:
        self._check("capture")
        was, self._state = self._state, VMState.PAUSED
        path.write_text(json.dumps({"vm": self.spec.name, "fingerprint": self.host.fingerprint_of(self.spec)}))
        try:
            await while_stopped()
        finally:
            self._state = was

    async def wait(self) -> int:
        await self._ended.wait()
        assert self._exit is not None
        return self._exit

    # -- what happens to a VM without anyone asking ---------------------------------------------
    def end(self, code: int) -> None:
        """The process ends with ``code`` (0: the guest powered off; else a crash)."""
        if self._state == VMState.STOPPED:
            return
        self._state, self._exit = VMState.STOPPED, code
        self.host.processes.pop(self.spec.run_dir, None)
        self.host.tasks.add(asyncio.ensure_future(self.guest.stop()))
        self._ended.set()

    def guest_reboot(self) -> None:
        """The guest rebooted (or the machine was reset): the host's channel starts over, or
        with ``spec.reboot`` off the VM ends (QEMU's ``-no-reboot``)."""
        if not self.spec.reboot:
            self.end(0)
            return
        self.guest.reboot()
        if self.on_reset is not None:
            self.on_reset()


class FakeHost:
    """The fake machine: its VMM processes by run directory (they outlive a daemon), and what
    the next start should do. Share one between two drivers to restart a daemon."""

    def __init__(self) -> None:
        self.processes: dict[Path, FakeVM] = {}
        self.started: list[FakeVM] = []
        # Each start pops one: the error it raises, a VMMError for a string (None: that start succeeds).
        self.fail_next_start: list[str | Exception | None] = []
        self.ignore_powerdown = False  # guests that ignore the ACPI button (killed after a timeout)
        self.tasks: set[asyncio.Future] = set()
        self._pids = itertools.count(40000)

    def fingerprint_of(self, spec: VMSpec) -> str:
        machine = (spec.cpus, spec.ram_bytes, str(spec.kernel.resolve()), str(spec.initrd.resolve()), spec.disk_size)
        return hashlib.sha256(repr(machine).encode()).hexdigest()[:16]

    def vm(self, name: str) -> FakeVM:
        """The running VM called ``name`` (a node's hostname, or a template's)."""
        return next(vm for vm in self.processes.values() if vm.spec.name == name)


class FakeDriver(Driver):
    name = "fake"
    accelerator = "none"

    def __init__(self, host: FakeHost | None = None) -> None:
        self.host = host or FakeHost()

    async def start(self, spec: VMSpec, restore_from: Path | None = None) -> VM:
        if self.host.fail_next_start and (why := self.host.fail_next_start.pop(0)) is not None:
            raise VMMError(why) if isinstance(why, str) else why
        if restore_from is not None:
            saved = json.loads(restore_from.read_text())
            if saved["fingerprint"] != self.host.fingerprint_of(spec):
                raise VMMError(f"{restore_from} was saved by another machine than this one")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        if not spec.disk.exists():  # as QEMU's driver does: an overlay on the base
            spec.disk.parent.mkdir(parents=True, exist_ok=True)
            spec.disk.write_text(f"overlay on {spec.base_disk}\n")
        spec.serial_log.touch()
        vm = FakeVM(self.host, spec, next(self.host._pids))
        await vm.guest.start()
        vm._state = VMState.PAUSED if restore_from is not None else VMState.RUNNING
        self.host.processes[spec.run_dir] = vm
        self.host.started.append(vm)
        return vm

    def fingerprint(self, spec: VMSpec) -> str:
        return self.host.fingerprint_of(spec)

    def running(self, run_dir: Path) -> int | None:
        vm = self.host.processes.get(run_dir)
        return vm.pid if vm is not None else None

    async def adopt(self, spec: VMSpec, pid: int) -> VM:
        vm = self.host.processes.get(spec.run_dir)
        if vm is None or vm.pid != pid:
            raise VMMError(f"no VMM with pid {pid} in {spec.run_dir}")
        vm.on_reset = None  # the old daemon's node is gone
        return vm

    def kill_stale(self, run_dir: Path) -> bool:
        vm = self.host.processes.get(run_dir)
        if vm is None:
            return False
        vm.end(-9)
        return True
