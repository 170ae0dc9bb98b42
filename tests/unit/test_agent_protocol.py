"""The agent protocol's table (slicer.agent.protocol): complete, consistent, shared by both ends."""

from __future__ import annotations

import ast
import re
import sys
import typing
from pathlib import Path

import pytest

from slicer.agent import protocol
from slicer.agent.protocol import ENDPOINTS, Endpoint
from slicer.core import agent_answers as host_agent
from slicer.image.build import GUEST_FILES

ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "slicer" / "agent"
PARAM = re.compile(r"^\{[a-z_]+\}$")
SEGMENT = re.compile(r"^[a-z][a-z-]*$")


def test_names_are_the_keys_and_identifiers():
    assert len(ENDPOINTS) >= 23
    for name, endpoint in ENDPOINTS.items():
        assert endpoint.name == name
        assert name.isidentifier(), name


def test_each_method_and_path_is_one_endpoint():
    routes = [(e.method, e.path) for e in ENDPOINTS.values()]
    assert len(routes) == len(set(routes))


def test_paths_are_well_formed():
    for e in ENDPOINTS.values():
        assert e.path.startswith("/") and not e.path.endswith("/") and "?" not in e.path, e
        for part in e.path.split("/")[1:]:
            assert SEGMENT.match(part) or PARAM.match(part), (e.name, part)


def test_answer_and_body_kinds_fit_their_types():
    for e in ENDPOINTS.values():
        assert e.answer in typing.get_args(protocol.Answer) and e.body in typing.get_args(protocol.Body), e
        # a JSON answer has a declared shape; a stream or WebSocket has none
        assert (e.response is not None) == (e.answer == "json"), e.name
        # a JSON body has a declared shape, and only requests with a body have one
        assert (e.request is not None) == (e.body == "json"), e.name
        if e.method in ("GET", "DELETE"):
            assert e.body == "none", e.name
        if e.answer == "websocket":
            assert e.method == "GET", e.name


def test_declared_shapes_resolve():
    """Every TypedDict named in the table has annotations that resolve (no dangling names)."""
    def typed_dicts(tp):
        if typing.is_typeddict(tp):
            yield tp
        for arg in typing.get_args(tp):
            yield from typed_dicts(arg)

    seen = 0
    for e in ENDPOINTS.values():
        for tp in (e.response, e.request, e.query):
            for td in typed_dicts(tp):
                hints = typing.get_type_hints(td)
                assert hints, td
                seen += 1
    assert seen >= 25


def test_url_fills_path_params_quoted_whole():
    assert ENDPOINTS["exec_status"].url(exec_id="ex_1") == "/exec/ex_1"
    assert ENDPOINTS["kill_exec"].url(exec_id="a/../b") == "/exec/a%2F..%2Fb/kill"
    assert ENDPOINTS["health"].url() == "/health"
    assert ENDPOINTS["wait_exit"].params == ("exec_id",)


@pytest.mark.parametrize("params", [{}, {"exec_id": "x", "extra": "y"}, {"id": "x"}])
def test_url_refuses_wrong_path_params(params):
    with pytest.raises(TypeError):
        ENDPOINTS["reap_exec"].url(**params)


def test_endpoint_is_immutable():
    with pytest.raises(AttributeError):
        ENDPOINTS["health"].path = "/other"  # type: ignore[misc]
    assert isinstance(ENDPOINTS["health"], Endpoint)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_protocol_needs_the_standard_library_only():
    """It runs in the guest on Debian's Python with nothing installed but python3-aiohttp."""
    for module in _imports(AGENT_DIR / "protocol.py"):
        assert module.split(".")[0] in sys.stdlib_module_names, module


def test_guest_code_imports_no_host_module():
    for path in AGENT_DIR.glob("*.py"):
        for module in _imports(path):
            top = module.split(".")[0]
            ok = (top in sys.stdlib_module_names or top == "aiohttp" or module == "slicer"
                  or module.startswith("slicer.agent")
                  or module in ("slicer.channel", "slicer.channel.yamux", "slicer.channel.bulk"))
            assert ok, f"{path.name} imports {module}"


def test_guest_image_carries_the_protocol_and_every_handler_module():
    handler_modules = sorted(p.name for p in AGENT_DIR.glob("http_*.py"))
    assert len(handler_modules) >= 6
    for name in ["protocol.py", "server.py", *handler_modules]:
        assert f"slicer/agent/{name}" in GUEST_FILES


def test_agent_says_invalid_request_never_bad_request():
    assert "invalid_request" in protocol.ERROR_CODES and "bad_request" not in protocol.ERROR_CODES
    for path in AGENT_DIR.glob("*.py"):
        assert '"bad_request"' not in path.read_text(), path.name


def test_host_passes_on_exactly_the_protocols_codes():
    mapped = {code for _, code in host_agent.MAPPED}
    assert host_agent.AGENT_CODES | mapped == protocol.ERROR_CODES
    assert "bad_request" not in host_agent.AGENT_CODES


SPELLED = re.compile(r"""\.(call|send)\(\s*"(GET|POST|PUT|DELETE)"|(?<!router)\.websocket\(\s*f?["']/""")


def test_no_host_code_outside_the_client_spells_an_agent_path():
    offenders = []
    for path in [*(ROOT / "slicer" / "api").rglob("*.py"), *(ROOT / "slicer" / "core").rglob("*.py"),
                 *(ROOT / "slicer" / "cli").rglob("*.py")]:
        rel = str(path.relative_to(ROOT))
        if rel == "slicer/core/agent.py":
            continue
        offenders += [f"{rel}: {m.group(0)}" for m in SPELLED.finditer(path.read_text())]
    assert offenders == []
