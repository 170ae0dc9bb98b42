"""The sync client is generated from the async one: the file is current, and the two offer
the same methods with the same signatures."""

from __future__ import annotations

import inspect
from pathlib import Path

from slicer.client import AsyncSlicerClient, SlicerClient, _unasync
from slicer.client._async import AsyncSlicerClient as WrittenAsync
from slicer.client._sync import SlicerClient as GeneratedSync

WEBSOCKETS = {"shell", "forward"}  # not coroutines: websockets' connect is awaited by the caller
RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}


def public_methods(cls: type) -> dict[str, object]:
    return {name: fn for name, fn in vars(cls).items()
            if callable(fn) and (not name.startswith("_") or name in RENAMED or name in RENAMED.values())}


def as_sync(annotation: str) -> str:
    for old, new in (("AsyncIterable", "Iterable"), ("AsyncIterator", "Iterator"), ("AsyncWebSocket", "WebSocket"),
                     ("AsyncSlicerClient", "SlicerClient")):
        annotation = annotation.replace(old, new)
    return annotation


def test_the_generated_sync_client_is_current() -> None:
    source = Path(_unasync.SOURCE).read_text()
    assert Path(_unasync.TARGET).read_text() == _unasync.render(source), \
        "slicer/client/_sync.py is stale: run python -m slicer.client._unasync"


def test_a_change_to_the_async_client_changes_the_generated_one() -> None:
    source = Path(_unasync.SOURCE).read_text()
    changed = source.replace("async def info(self)", "async def information(self)")
    assert changed != source
    assert "def information(self)" in _unasync.render(changed)
    assert "async " not in _unasync.render(changed).replace("AsyncSlicerClient", "")


def test_the_package_exports_the_written_and_the_generated_classes() -> None:
    assert AsyncSlicerClient is WrittenAsync and SlicerClient is GeneratedSync


def test_both_clients_have_the_same_methods() -> None:
    sync_names = set(public_methods(SlicerClient))
    async_names = {RENAMED.get(n, n) for n in public_methods(AsyncSlicerClient)}
    assert sync_names == async_names
    assert len(sync_names) >= 48


def signature_of(fn: object, convert=lambda a: a) -> tuple:
    sig = inspect.signature(fn)
    params = [(p.name, p.kind, p.default, convert(str(p.annotation))) for p in sig.parameters.values()]
    return params, convert(str(sig.return_annotation))


def test_signatures_match() -> None:
    names = sorted(set(public_methods(SlicerClient)) - set(RENAMED.values()))
    differ = [n for n in names
              if signature_of(getattr(SlicerClient, n)) != signature_of(getattr(AsyncSlicerClient, n), as_sync)]
    assert differ == []


def test_async_methods_are_awaitable_and_sync_ones_are_not() -> None:
    for name, fn in public_methods(AsyncSlicerClient).items():
        if name in WEBSOCKETS:
            continue
        assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn), name
    for name, fn in public_methods(SlicerClient).items():
        assert not inspect.iscoroutinefunction(fn) and not inspect.isasyncgenfunction(fn), name
