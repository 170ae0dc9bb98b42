"""Commits: a stopped persistent VM's disk frozen into an immutable parent, and cold forks of it.

A commit is ``<data>/commits/<id>/disk.qcow2`` (read-only) plus a row in the state database.
Committing *moves* the VM's disk there (a hard link, then the VM's path gets a new empty overlay
on top): no block is copied, and the VM and every child forked from the commit read through the
same file. A commit is deleted only when nothing reads through it: no VM (its source included)
and no later commit; disks kept from deleted persistent VMs are rebased first (the blocks they
need are copied into them), so nothing is lost.

Every step leaves something :meth:`Commits.finish` can finish or undo at the next start: a
commit directory is complete before its row is written, and the source gets its overlay after.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from slicer.core.actions import NodeAction
from slicer.core.error_codes import ErrorCode
from slicer.core.errors import BadRequest, Conflict, NotFound, SlicerError
from slicer.core.node import Node
from slicer.core.registry import Registry
from slicer.core.state import CommitRecord, now_rfc3339
from slicer.vmm.base import VMMError
from slicer.vmm.disks import chain_paths, copy_record, create_overlay, move_disk, rebase, recorded_chain

log = logging.getLogger(__name__)
COMMIT_ID = re.compile(r"cmt-[0-9a-f]{16}")
# What clients may send as an id: anything else is refused before a path is built from it.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FIXUPS = ("hostname", "machine-id", "ssh-host-keys")


def check_commit_id(commit_id: str) -> str:
    if not SAFE_ID.fullmatch(commit_id) or ".." in commit_id:
        raise BadRequest(f"invalid commit id {commit_id!r}", ErrorCode.INVALID_COMMIT_ID)
    return commit_id


CreateVM = Callable[..., Awaitable[Node]]  # Manager.create: a new VM of a group, booted


class Commits:
    def __init__(self, registry: Registry, create: CreateVM, layer_roots: tuple[Path, ...] = ()) -> None:
        self.registry = registry
        self.create = create
        # where disks made before backing records may have their backing files (the driver's)
        self.layer_roots = layer_roots

    @property
    def commits_dir(self) -> Path:
        return self.registry.data_dir / "commits"

    def commit_disk(self, commit_id: str) -> Path:
        return self.registry.commit_disk(commit_id)

    def _commit(self, commit_id: str) -> CommitRecord:
        check_commit_id(commit_id)
        rec = self.registry.store.commit(commit_id)
        if rec is None:
            raise NotFound(f"commit {commit_id!r} not found", ErrorCode.COMMIT_NOT_FOUND)
        return rec

    # -- commit ------------------------------------------------------------------------------------
    async def commit(self, hostname: str, tags: list[str], labels: dict[str, str], cache_key: str) -> dict:
        node = self.registry.get(hostname)
        async with node.act(NodeAction.COMMIT):
            rec = node.record
            if not rec.persistent:
                raise Conflict(f"{hostname} is not persistent: only a persistent VM's disk can be committed",
                               ErrorCode.NOT_PERSISTENT)
            disk = Path(rec.disk)
            if not disk.exists():
                raise Conflict(f"{hostname} has no disk yet (it never booted)", ErrorCode.NO_DISK)
            commit = CommitRecord(
                commit_id=f"cmt-{secrets.token_hex(8)}", source_hostname=hostname, source_host_group=rec.hostgroup,
                created_at=now_rfc3339(), tags=list(tags), labels=dict(labels), cache_key=cache_key,
                cpus=rec.cpus, ram_bytes=rec.ram_bytes, spec=rec.spec.copy(tags=[]),
            )
            final = self.commits_dir / commit.commit_id
            part = self.commits_dir / f".{commit.commit_id}.part"
            part.mkdir(parents=True)
            try:
                os.link(disk, part / "disk.qcow2")  # the same blocks under a second name: no copy
                copy_record(disk, part / "disk.qcow2")
                part.rename(final)
                self.registry.store.put_commit(commit)
            except BaseException:
                shutil.rmtree(part, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
                raise
            try:
                await self._give_overlay(disk, commit.commit_id)
            except BaseException:  # the VM keeps its disk as it was; the commit never was
                self.registry.store.delete_commit(commit.commit_id)
                shutil.rmtree(final, ignore_errors=True)
                raise
            rec.spec.parent_commit = rec.spec.commit_id = commit.commit_id
            self.registry.store.put(rec)
        log.info("%s: committed as %s", hostname, commit.commit_id)
        return {"hostname": hostname, "commit_id": commit.commit_id, "status": "committed",
                "parent_status": node.status.lower(), "mode": commit.mode, "tags": commit.tags,
                "labels": commit.labels, "cache_key": commit.cache_key}

    async def _give_overlay(self, disk: Path, commit_id: str) -> None:
        """Put an empty overlay on the commit at the source's disk path, then freeze the commit."""
        new = disk.with_name(disk.name + ".new")
        try:
            await create_overlay(new, self.commit_disk(commit_id), legacy_roots=self.layer_roots)
        except VMMError as e:
            new.unlink(missing_ok=True)
            raise SlicerError(f"commit {commit_id}: {e}", ErrorCode.COMMIT_FAILED) from e
        move_disk(new, disk)
        frozen = self.commit_disk(commit_id)
        if os.geteuid() == 0:
            os.chown(frozen, 0, 0)  # it belonged to the VMM that wrote it; now nobody may write it
        frozen.chmod(0o400)

    # -- list and delete ---------------------------------------------------------------------------
    def list(self, tags: list[str] | None = None, cache_key: str | None = None, source: str | None = None,
                mode: str | None = None) -> list[dict]:
        found = []
        for c in self.registry.store.commits():
            if tags and not set(tags) <= set(c.tags):
                continue
            if (cache_key and c.cache_key != cache_key) or (source and c.source_hostname != source) \
                    or (mode and c.mode != mode):
                continue
            found.append(c.view())
        return found

    async def delete(self, commit_id: str) -> dict:
        commit = self._commit(commit_id)
        disk = self.commit_disk(commit_id).resolve()
        users, kept = [], []
        for node in self.registry.nodes.values():
            node_disk = Path(node.record.disk)
            if node_disk.exists() and disk in await chain_paths(node_disk, self.layer_roots):
                users.append(node.hostname)
        for other in self.registry.store.commits():
            if other.commit_id != commit_id and disk in await chain_paths(
                    self.commit_disk(other.commit_id), self.layer_roots):
                users.append(f"commit {other.commit_id}")
        if users:
            raise Conflict(f"commit {commit_id} is the parent of {', '.join(users)}: delete those first",
                           ErrorCode.COMMIT_IN_USE)
        used = {Path(n.record.disk) for n in self.registry.nodes.values()}
        for kept_disk in sorted((self.registry.data_dir / "disks").glob("*.qcow2")):
            if kept_disk not in used and disk in await chain_paths(kept_disk, self.layer_roots):
                kept.append(kept_disk)
        await chain_paths(disk, self.layer_roots)  # a commit made before records gets one
        below = recorded_chain(disk)[1]  # what the commit itself sits on
        for kept_disk in kept:  # a deleted VM's disk we keep: its blocks from the commit are copied in
            log.info("commit %s: rebasing the kept disk %s before removing it", commit_id, kept_disk.name)
            try:
                await rebase(kept_disk, below.path, below.format, self.layer_roots)
            except VMMError as e:
                raise SlicerError(f"commit {commit_id}: rebasing {kept_disk} failed: {e}",
                                  ErrorCode.COMMIT_FAILED) from e
        self.registry.store.delete_commit(commit.commit_id)
        shutil.rmtree(self.commits_dir / commit_id, ignore_errors=True)
        log.info("commit %s deleted", commit_id)
        return {"commit_id": commit_id, "status": "deleted"}

    # -- cold fork ---------------------------------------------------------------------------------
    async def fork(self, commit_id: str, *, tags: list[str] | None, tag_mode: str,
                          secrets_: list[str] | None, persistent: bool, cpus: int | None, ram_bytes: int | None,
                          fixups: list[str] | None, wait: str | None, timeout: float,
                          network: dict[str, list[str]] | None = None, hostname: str | None = None) -> dict:
        commit = self._commit(commit_id)
        if not self.commit_disk(commit_id).exists():
            raise SlicerError(f"commit {commit_id}: its disk is missing", ErrorCode.COMMIT_MISSING)
        spec = commit.spec.copy(
            tags=list(tags or []) if tag_mode == "replace" else commit.tags + list(tags or []),
            parent_commit=commit_id, commit_id=None, protected=False,
            fixups=list(FIXUPS if fixups is None else fixups))
        if secrets_ is not None:
            spec.secrets = list(secrets_)
        if network:  # the lists given replace the source's own (or its group's); the others stay
            spec.network = {**(spec.network or {}), **network}
        node = await self.create(
            commit.source_host_group, cpus=cpus or commit.cpus, ram_bytes=ram_bytes or commit.ram_bytes,
            persistent=persistent, hostname=hostname, ip=None, spec=spec, wait=wait, timeout=timeout,
        )
        parent = self.registry.nodes.get(commit.source_hostname)
        return {"hostname": node.hostname, "child_hostname": node.hostname,  # the TypeScript SDK's name for it
                "source_hostname": commit.source_hostname, "commit_id": commit_id,
                "status": "forked", "parent_status": parent.status.lower() if parent else "deleted",
                "child_status": node.status.lower(), "mode": commit.mode, "persistent": node.record.persistent}

    # -- start ---------------------------------------------------------------------------------------
    async def finish(self) -> None:
        """Finish or undo what a crash cut short: half-made commit directories go, a commit
        whose source still writes to its disk gets the source its overlay."""
        if not self.commits_dir.is_dir():
            self.commits_dir.mkdir(mode=0o700, parents=True)
            return
        records = {c.commit_id: c for c in self.registry.store.commits()}
        nodes = {r.hostname: r for r in self.registry.store.all()}
        for path in self.commits_dir.iterdir():
            if path.name.startswith(".") or path.name not in records:
                # Written before its row: nothing reads through a commit without a row.
                log.warning("removing %s, left by a commit that did not finish", path.name)
                shutil.rmtree(path, ignore_errors=True)
        for commit in records.values():
            source = nodes.get(commit.source_hostname)
            if source is None:
                continue
            disk = Path(source.disk)
            new = disk.with_name(disk.name + ".new")
            new.unlink(missing_ok=True)
            if disk.exists() and os.path.samefile(disk, self.commit_disk(commit.commit_id)):
                log.warning("%s: finishing its commit %s", source.hostname, commit.commit_id)
                try:
                    await self._give_overlay(disk, commit.commit_id)
                except SlicerError as e:  # a disk its VMM tampered with: that VM is refused, the rest start
                    log.error("%s: %s", source.hostname, e.message)
                    continue
                source.spec.parent_commit = source.spec.commit_id = commit.commit_id
                self.registry.store.put(source)
