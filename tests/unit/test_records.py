"""The node record's typed parts, and rows written by older daemons."""

from __future__ import annotations

import json
import sqlite3

import pytest

from slicer.core.records import BootKind, NodeKind, NodeSpec, Suspended
from slicer.core.state import CommitRecord, NodeRecord, StateStore


def record(**spec: object) -> NodeRecord:
    return NodeRecord("vm-1", "vm", NodeKind.SANDBOX, "10.0.0.2", 1, 256 << 20, False, "2026-01-01T00:00:00+00:00",
                      "/d/vm-1.qcow2", NodeSpec.from_dict(spec))


def test_a_row_of_an_older_daemon_reads_into_the_typed_spec(tmp_path):
    store = StateStore(tmp_path / "state.db")
    store.put(record())
    old = {"userdata": None, "import_user": None, "ssh_keys": None, "tags": None, "secrets": None,
           "protected": False, "image": {"ref": "a:1", "digest": "sha256:x"}}
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE nodes SET spec = ?", (json.dumps(old),))
    (rec,) = store.all()
    assert rec.spec.tags == [] and rec.spec.ssh_keys == [] and rec.spec.secrets is None
    assert rec.spec.image == {"ref": "a:1", "digest": "sha256:x"} and rec.kind is NodeKind.SANDBOX
    store.close()


def test_unknown_keys_of_a_newer_daemon_are_kept(tmp_path):
    store = StateStore(tmp_path / "state.db")
    rec = record(tags=["a"], gpu_profile="big")
    assert rec.spec.extra == {"gpu_profile": "big"}
    store.put(rec)
    (back,) = store.all()
    assert back.spec.extra == {"gpu_profile": "big"} and back.spec.tags == ["a"]
    store.close()


@pytest.mark.parametrize("spec", [
    {},
    {"tags": ["x", "y"], "userdata": "echo", "ssh_keys": ["ssh-ed25519 AAA"], "import_user": "alex"},
    {"secrets": []},  # none: not the same as absent (all)
    {"secrets": ["a"], "protected": True, "boot": "cold"},
    {"network": {"allow": ["10.0.0.0/8"], "drop": []}},
    {"parent_commit": "cmt-1", "commit_id": "cmt-2", "fixups": []},
    {"forked_from": "vm-1", "image": {"ref": "r", "digest": "d"}},
])
def test_a_spec_survives_the_store(tmp_path, spec: dict):
    store = StateStore(tmp_path / "state.db")
    store.put(record(**spec))
    (back,) = store.all()
    assert back.spec == NodeSpec.from_dict(spec) and back.spec.to_dict() == spec
    store.close()


def test_empty_secrets_and_fixups_are_not_dropped():
    assert NodeSpec(secrets=[]).to_dict() == {"secrets": []}
    assert NodeSpec(fixups=[]).to_dict() == {"fixups": []}
    assert NodeSpec(tags=[], protected=False).to_dict() == {}


def test_a_copy_shares_no_lists():
    spec = NodeSpec(tags=["a"], network={"allow": ["1.2.3.0/24"], "drop": []})
    copy = spec.copy(forked_from="vm-1")
    copy.tags.append("b")
    copy.network["allow"].append("5.6.7.0/24")  # type: ignore[index]
    assert spec.tags == ["a"] and spec.network == {"allow": ["1.2.3.0/24"], "drop": []}
    assert copy.forked_from == "vm-1" and spec.forked_from is None


def test_a_commit_keeps_its_spec(tmp_path):
    store = StateStore(tmp_path / "state.db")
    store.put_commit(CommitRecord("cmt-1", "vm-1", "vm", "2026-01-01T00:00:00+00:00", ["t"], {"k": "v"}, "",
                                  1, 256 << 20, NodeSpec(secrets=["s"], userdata="u")))
    (back,) = store.commits()
    assert back.spec == NodeSpec(secrets=["s"], userdata="u") and back.tags == ["t"]
    store.close()


def test_suspended_and_kind_are_stored_as_their_values(tmp_path):
    store = StateStore(tmp_path / "state.db")
    rec = record()
    rec.suspended = Suspended.SHUTDOWN
    store.put(rec)
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT kind, suspended FROM nodes").fetchone() == ("sandbox", "shutdown")
    (back,) = store.all()
    assert back.suspended is Suspended.SHUTDOWN
    store.close()


def test_which_boots_need_an_identity_reset():
    assert {b for b in BootKind if b.needs_identity} == {BootKind.TEMPLATE, BootKind.SUSPEND, BootKind.FORK}


def test_a_suspend_reason_of_a_newer_daemon_still_reads_as_suspended(tmp_path):
    store = StateStore(tmp_path / "state.db")
    store.put(record())
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE nodes SET suspended = 'hibernated'")
    (back,) = store.all()
    assert back.suspended and back.suspended is Suspended.API
    store.close()
