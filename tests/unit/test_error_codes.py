"""One enum of error codes: every code the daemon can answer with is in it, and docs/api.md lists them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from slicer.agent import protocol
from slicer.core import actions, error_codes
from slicer.core.error_codes import ERROR_CODES, ErrorCode
from slicer.core.errors import SlicerError

ROOT = Path(__file__).resolve().parents[2]
ERROR_CLASSES = {cls.__name__ for cls in [SlicerError, *SlicerError.__subclasses__()]}


def codes_in_source() -> dict[str, list[str]]:
    """Codes given to the daemon's errors anywhere in slicer/ (the guest's agent aside), as strings
    or ``ErrorCode`` members:
    the second argument or ``code=`` of a call to an error class, and ``error_response``'s third."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "slicer").rglob("*.py")):
        if "agent" in path.relative_to(ROOT / "slicer").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            position = 1 if name in ERROR_CLASSES else 2 if name == "error_response" else None
            if position is None:
                continue
            args = [*node.args[position:position + 1], *(k.value for k in node.keywords if k.arg == "code")]
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    code = arg.value
                elif isinstance(arg, ast.Attribute) and getattr(arg.value, "id", "") == "ErrorCode":
                    code = ErrorCode[arg.attr].value
                else:
                    continue
                found.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_scan_finds_codes():
    found = codes_in_source()
    assert "vm_not_found" in found and "invalid_request" in found and len(found) > 40


def test_the_core_names_its_codes_by_the_enum():
    literal = []
    for path in sorted((ROOT / "slicer" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(getattr(node, "func", None), "id", "")
            if isinstance(node, ast.Call) and name in ERROR_CLASSES and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant):
                literal.append(f"{path.name}:{node.lineno}")
    assert literal == []


def test_every_code_in_the_source_is_in_the_enum():
    unknown = {code: where for code, where in codes_in_source().items() if code not in set(ErrorCode)}
    assert unknown == {}


def test_every_error_class_and_state_refusal_uses_a_listed_code():
    for cls in [SlicerError, *SlicerError.__subclasses__()]:
        assert cls.code in set(ErrorCode), cls
    refusals = {code for _, code in actions._REFUSED_IN.values()} | {code for _, code in actions._REFUSED.values()}
    assert refusals <= set(ErrorCode)


def test_the_codes_the_agent_may_pass_through_are_listed():
    assert protocol.ERROR_CODES <= set(ErrorCode)


def test_every_code_has_statuses_and_a_meaning():
    assert set(ERROR_CODES) == set(ErrorCode)
    for code, (statuses, meaning) in ERROR_CODES.items():
        assert statuses and all(400 <= s < 600 for s in statuses), code
        assert meaning.strip(), code


@pytest.mark.parametrize("cls", [SlicerError, *SlicerError.__subclasses__()])
def test_an_error_class_status_is_one_its_default_code_comes_with(cls: type[SlicerError]):
    assert cls.status in ERROR_CODES[ErrorCode(cls.code)][0]


def test_docs_list_the_codes_as_the_enum_does():
    assert error_codes.markdown_table() in (ROOT / "docs" / "api.md").read_text()
