"""Routes answer through response models (slicer/api/schema.py): /openapi.json shows one for
every route that answers JSON, and what goes on the wire is byte for byte what the route built."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from slicer.api import schema
from slicer.api.app import create_app
from slicer.api.routes import commits, nodes, secrets, stats, storage, system, vm
from slicer.client import _models as sdk_models
from tests.unit.conftest import Lab, create_args

JSON = "application/json"
# Routes whose answer is not JSON: text, streams, WebSockets, an empty body, Prometheus.
NOT_JSON = {("POST", "/vm/{hostname}/shutdown"), ("POST", "/vm/{hostname}/pause"), ("POST", "/vm/{hostname}/resume"),
            ("POST", "/vm/{hostname}/suspend"), ("POST", "/vm/{hostname}/restore"), ("GET", "/vm/{hostname}/cp"),
            ("GET", "/vm/{hostname}/exec/{exec_id}/logs"), ("GET", "/vm/{hostname}/fs/watch"),
            ("DELETE", "/secrets/{name}"), ("GET", "/metrics"), ("HEAD", "/healthz"), ("HEAD", "/vm/{hostname}/health")}


@pytest.fixture
def openapi(lab: Lab) -> dict:
    return create_app(lab.manager(), token=None).openapi()


def success_schemas(operation: dict) -> list[dict]:
    return [content[JSON]["schema"] for status, answer in operation["responses"].items() if status.startswith("2")
            if JSON in (content := answer.get("content", {}))]


def is_model(schema_: dict) -> bool:
    """A named model (or a list of one), not a bare object."""
    if schema_.get("type") == "array":
        return is_model(schema_.get("items", {}))
    return schema_.get("$ref", "").startswith("#/components/schemas/")


def test_every_route_that_answers_json_names_its_model(openapi: dict) -> None:
    missing = []
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            if (method.upper(), path) in NOT_JSON or "204" in operation["responses"]:  # no body at all
                continue
            schemas = success_schemas(operation)
            if not schemas or not all(is_model(s) for s in schemas):
                missing.append(f"{method.upper()} {path}")
    assert missing == []


def test_the_schema_covers_the_routes_it_should(openapi: dict) -> None:
    operations = {(m.upper(), p) for p, ops in openapi["paths"].items() for m in ops}
    assert len(operations) >= 45
    assert len(operations - NOT_JSON) >= 34


@pytest.mark.parametrize(("method", "path", "model"), [
    ("get", "/vm/{hostname}", "NodeDetail"), ("get", "/nodes", "Node"), ("get", "/storage", "Storage"),
    ("post", "/hostgroup/{name}/nodes", "CreatedNode"), ("get", "/vm/commits", "CommitInfo"),
    ("get", "/vm/{hostname}/health", "Health"), ("get", "/vm/{hostname}/fs/readdir", "FsEntry"),
    ("post", "/vm/{hostname}/exec", "ExecResult"), ("post", "/daemon/shutdown", "Liveness"),
])
def test_routes_name_the_right_model(openapi: dict, method: str, path: str, model: str) -> None:
    [found] = success_schemas(openapi["paths"][path][method])[:1]
    ref = found.get("$ref") or found["items"]["$ref"]
    assert ref == f"#/components/schemas/{model}"


def test_a_background_exec_is_documented_as_201(openapi: dict) -> None:
    answers = openapi["paths"]["/vm/{hostname}/exec"]["post"]["responses"]
    assert answers["201"]["content"][JSON]["schema"]["$ref"] == "#/components/schemas/BackgroundExec"
    assert "application/x-ndjson" in answers["200"]["content"]


ROUTERS = [nodes.router, stats.router, storage.router, secrets.router, commits.router, vm.router, system.public,
           system.router]


def route_of(app: Any, endpoint: Any) -> APIRoute:
    return next(r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint)


def wire(route: APIRoute, payload: Any) -> bytes:
    """What FastAPI sends for ``payload`` through ``route``'s response model (as serialize_response does)."""
    adapter = TypeAdapter(route.response_model)
    return adapter.dump_json(adapter.validate_python(payload), exclude_unset=route.response_model_exclude_unset)


def before(payload: Any) -> bytes:
    """What the route sent before it had a model (its ``-> dict``/``-> list[dict]`` annotation)."""
    return TypeAdapter(Any).dump_json(payload)


async def payloads(lab: Lab) -> tuple[Any, dict[Any, Any]]:
    """A daemon with services, a sandbox, a secret and changed tags; each route's own answer."""
    m = await lab.daemon()
    sbx = await m.create("sbx", **create_args(spec={"tags": ["ci", "x"]}))
    m.secrets.create({"name": "token", "data": "aHVudGVyMg==", "permissions": "0640", "uid": 5})
    app = create_app(m, token=None)
    request = SimpleNamespace(app=app)
    got = {
        nodes.list_host_groups: await nodes.list_host_groups(m),
        nodes.list_nodes: await nodes.list_nodes(m),
        nodes.list_group_nodes: await nodes.list_group_nodes(m, "sbx"),
        nodes.get_node: await nodes.get_node(m, sbx.hostname),
        stats.all_stats: await stats.all_stats(m),
        stats.node_stats: await stats.node_stats(m, sbx.hostname),
        storage.storage: await storage.storage(m),
        secrets.list_secrets: await secrets.list_secrets(m),
        commits.get_tags: await commits.get_tags(m, sbx.hostname),
        vm.logs: await vm.logs(m, sbx.hostname, 5),
        system.healthz: await system.healthz(),
        system.info: await system.info(request),  # type: ignore[arg-type]
    }
    return app, got


async def test_answers_on_the_wire_are_byte_for_byte_what_routes_built(lab: Lab) -> None:
    app, got = await payloads(lab)
    differ = [endpoint.__name__ for endpoint, payload in got.items()
              if wire(route_of(app, endpoint), payload) != before(payload)]
    assert differ == []
    assert b"null" not in wire(route_of(app, nodes.list_host_groups), got[nodes.list_host_groups])


def test_optional_keys_stay_absent_and_unknown_keys_stay() -> None:
    view = {"hostname": "vm-1", "hostgroup": "vm", "ip": "1.2.3.4", "ram_bytes": 1, "cpus": 1, "created_at": "t",
            "tags": [], "arch": "x86_64", "status": "Stopped", "persistent": True, "kind": "service",
            "a_newer_key": {"nested": [1, 2]}}
    route = SimpleNamespace(response_model=schema.NodeDetail, response_model_exclude_unset=True)
    assert wire(route, view) == before(view)  # type: ignore[arg-type]
    assert json.loads(wire(route, view))["a_newer_key"] == {"nested": [1, 2]}


def test_key_order_follows_the_routes_dict_when_optional_keys_come_and_go() -> None:
    base = {"hostname": "vm-1", "hostgroup": "vm", "ip": "", "ram_bytes": 1, "cpus": 1, "created_at": "t",
            "tags": [], "arch": "x86_64", "status": "Running", "persistent": False, "kind": "sandbox"}
    described = {**base, "boot": "template", "vmm": {"pid": 4}, "open_agent_connections": 0,
                 "network": {"mode": "", "policy_source": "host_group", "host_group": {"allow": [], "drop": []},
                             "effective": {"allow": [], "drop": []}}}
    route = SimpleNamespace(response_model=schema.NodeDetail, response_model_exclude_unset=True)
    assert wire(route, described) == before(described)  # type: ignore[arg-type]


async def test_the_app_answers_through_the_models(lab: Lab) -> None:
    m = await lab.daemon()
    app = create_app(m, token=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        groups = (await client.get("/hostgroup")).json()
        created = await client.post("/hostgroup/sbx/nodes", json={"tags": ["t"]})
        assert created.status_code == 201
        assert set(created.json()) == set(schema.CreatedNode.model_fields)
        assert (await client.get("/healthz")).content == b'{"status":"ok"}'
    assert [schema.HostGroup.model_validate(g).name for g in groups] == ["svc", "sbx", "cold"]


def test_the_sdk_reads_answers_into_the_apis_models() -> None:
    shared = ["Info", "HostGroup", "Node", "CreatedNode", "Health", "ExecFrame", "ExecResult", "BackgroundExec",
              "Secret", "NodeStats", "TemplateUsage", "NodeUsage", "KeptDisk", "Tags"]
    assert [n for n in shared if getattr(sdk_models, n) is not getattr(schema, n)] == []
    assert issubclass(sdk_models.Storage, schema.Storage)


def test_the_shared_models_need_no_fastapi() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['starlette'] = None; "
            "import slicer.client, slicer.api.schema; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
