"""What the host hands a guest after every boot: identity (after a restore), the group's CA
certificates, secrets, SSH keys and, once per disk, userdata; and secrets again whenever they change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx

from slicer.core import telemetry
from slicer.core.ca import CAError, group_bundle
from slicer.core.config import Config
from slicer.core.errors import AgentUnreachable, BadRequest, SlicerError
from slicer.core.identity import identity_body
from slicer.core.node import Node
from slicer.core.registry import Registry, Tasks
from slicer.core.secrets import SecretStore
from slicer.vmm.base import VM, Laps, VMState

log = logging.getLogger("slicer.core.manager")
READY_TIMEOUT = 600.0
# A guest whose agent goes away in the middle of its setup (it was saved while rebooting, and
# goes on rebooting once restored) is waited for again, this many times, this far apart.
SETUP_RETRIES = 20
SETUP_RETRY_DELAY = 0.5


def ca_bundles(config: Config, data_dir: Path) -> dict[str, str]:
    """The PEM each host group with ``ca:`` hands its guests, made once at daemon start (its CA
    generated if need be), so that a missing or broken file stops the start, not a boot."""
    bundles: dict[str, str] = {}
    for g in config.host_groups:
        if g.ca is None:
            continue
        try:
            pem = group_bundle(data_dir, g.name, g.ca.generate, [Path(f) for f in g.ca.files])
        except CAError as e:
            raise BadRequest(f"config: {g.name}.ca: {e}") from e
        except OSError as e:
            raise SlicerError(f"host group {g.name}: cannot make its CA in {data_dir / 'ca'}: {e}") from e
        if pem:
            bundles[g.name] = pem
    return bundles


class Provisioner:
    def __init__(self, config: Config, registry: Registry, secrets: SecretStore, tasks: Tasks,
                 ca: dict[str, str] | None = None) -> None:
        """``ca``: host group -> the PEM its guests trust (:func:`ca_bundles`)."""
        self.config = config
        self.registry = registry
        self.secrets = secrets
        self.tasks = tasks
        self.ca = ca or {}

    async def run(self, node: Node, vm: VM, group_name: str) -> None:
        """After every boot of ``vm``: wait for its agent, set the guest up; then wait for the
        next reboot. Ends when the VM stops or another VM replaces it."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = True
        retries = SETUP_RETRIES
        while node.vm is vm and vm.state != VMState.STOPPED:
            try:
                # A restored guest's agent was ready when it was saved: its handshake is enough,
                # and the identity reset that follows is the first request it answers.
                await node.wait_ready(timeout=READY_TIMEOUT, health=not node.identity_pending)
            except SlicerError:
                continue  # the loop ends when the VM stops
            node.phases["ready"] = loop.time() - t0
            if first:
                telemetry.BOOT_SECONDS.labels(group_name).observe(loop.time() - t0)
                first = False
            try:
                await self.configure(node)
            except AgentUnreachable as e:
                if retries > 0:
                    retries -= 1
                    log.info("%s: the agent went away during setup (%s); waiting for it again", node.hostname,
                             e.message)
                    with contextlib.suppress(TimeoutError):  # a reset, if that is what it was
                        await asyncio.wait_for(node.rebooted.wait(), SETUP_RETRY_DELAY)
                    node.rebooted.clear()
                    continue
                self._setup_failed(node, e)
            except SlicerError as e:
                self._setup_failed(node, e)
            retries = SETUP_RETRIES
            node.provisioned.set()
            await node.rebooted.wait()
            node.rebooted.clear()
            t0 = loop.time()

    @staticmethod
    def _setup_failed(node: Node, e: SlicerError) -> None:
        log.warning("%s: setting up the guest failed: %s", node.hostname, e.message)
        node.warnings.append(f"guest setup: {e.message}")
        if node.identity_pending:  # a clone that is not yet itself must not be used
            node.setup_error = f"identity reset after restore failed: {e.message}"

    async def configure(self, node: Node) -> None:
        lap = Laps()
        agent = node.running_agent(setup=True)
        if node.identity_pending:
            assert node.vm is not None
            await agent.identity(await identity_body(node, node.vm.spec), timeout=30)
            node.identity_pending = False
            if node.record.identity_pending:
                node.record.identity_pending = False
                self.registry.store.put(node.record)
            lap("identity")
        spec = node.record.spec

        async def keys() -> None:
            found = list(self.config.ssh_keys) + list(spec.ssh_keys)
            for user in {u for u in (self.config.github_user, spec.import_user) if u}:
                found += await self._github_keys(node, user)
            await agent.put_ssh_keys(found)

        async def ca() -> None:
            # Every boot: a disk restored from a template or an older bundle may lack it; the
            # agent does nothing when /runner/ca.crt already holds exactly this.
            if (pem := self.ca.get(node.record.hostgroup)) is not None:
                await agent.put_ca(pem)

        # Secrets, keys and CAs are independent (streams on the channel); userdata comes after all,
        # so that a script fetching over TLS already trusts the group's CA.
        for outcome in await asyncio.gather(self.push_secrets(node), keys(), ca(), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        if spec.userdata:
            await agent.userdata(spec.userdata)
        lap("setup")
        node.phases.update(lap.laps)

    async def _github_keys(self, node: Node, user: str) -> list[str]:
        url = f"{self.config.github_keys_url.rstrip('/')}/{user}.keys"
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(url)
                r.raise_for_status()
        except httpx.HTTPError as e:
            msg = f"could not fetch SSH keys of {user} from {url}: {e}"
            log.warning("%s: %s", node.hostname, msg)
            node.warnings.append(msg)
            return []
        return [line for line in r.text.splitlines() if line.strip()]

    async def push_secrets(self, node: Node) -> None:
        allowed = node.record.spec.secrets  # None: all; []: none
        await node.running_agent().put_secrets(self.secrets.for_guest(allowed))

    async def sync_secrets(self) -> None:
        """Push the current secrets to every VM whose boot was set up (after each change)."""
        nodes = [n for n in self.registry.nodes.values() if n.provisioned.is_set()]
        results = await asyncio.gather(*(self.push_secrets(n) for n in nodes), return_exceptions=True)
        for node, r in zip(nodes, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("%s: secrets not updated: %s", node.hostname, r)

    def secrets_changed(self) -> None:
        self.tasks.spawn(self.sync_secrets())
