"""Which command lines the agent runs without bash (slicer.agent.direct), and with what."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slicer.agent.direct import plan

BASH = "/bin/bash"


@pytest.fixture
def path(tmp_path: Path) -> str:
    """A PATH of two directories: ``tool`` executable in the second, a non-executable one first."""
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
    (first / "tool").write_text("not executable\n")
    (second / "tool").write_text("#!/bin/sh\n")
    os.chmod(second / "tool", 0o755)
    return f"{first}:{second}"


def test_a_plain_line_is_execed_as_bash_would_with_bashs_variables(path):
    env = {"PATH": path, "LANG": "C.UTF-8"}
    p = plan("tool -l --x=1 a/b:c,d@e%f+g", ["it's", "$HOME", ""], BASH, env, "/tmp")
    tool = path.split(":")[1] + "/tool"
    assert p is not None and p.path == tool
    assert p.argv == ["tool", "-l", "--x=1", "a/b:c,d@e%f+g", "it's", "$HOME", ""]  # args were quoted: as they are
    assert p.env == {**env, "PWD": "/tmp", "SHLVL": "0", "_": tool}
    assert env == {"PATH": path, "LANG": "C.UTF-8"}  # not changed in place
    assert plan("  tool   x ", [], BASH, {**env, "SHLVL": "4"}, "/").env["SHLVL"] == "4"  # type: ignore[union-attr]


def test_a_path_with_a_slash_is_execed_as_written(path):
    p = plan("./run.sh x", [], BASH, {"PATH": path}, "/srv")
    assert p is not None and (p.path, p.argv, p.env["_"]) == ("./run.sh", ["./run.sh", "x"], "./run.sh")


@pytest.mark.parametrize("line", [
    "", "   ", "tool 'x'", 'tool "x"', "tool $HOME", "tool ${X}", "tool *", "tool a?", "tool [ab]", "tool ~",
    "tool ~/x", "tool; tool", "tool && tool", "tool | tool", "tool > out", "tool < in", "tool &", "(tool)",
    "tool `id`", "tool $(id)", "tool \\x", "tool # note", "tool\tx", "tool\nx", "tool {a,b}", "tool !x",
    "X=1 tool", "echo hi", "cd /tmp", "export X=1", "source f", ". f", "true", "false", "test -f x", "[ x ]",
    "exec tool", "time tool", "if", "kill 1", "pwd", "printf x", "ünïcode",
])
def test_a_line_bash_has_anything_to_do_with_goes_to_bash(path, line):
    assert plan(line, [], BASH, {"PATH": path}, "/tmp") is None


@pytest.mark.parametrize("extra", [
    {"BASH_ENV": "/etc/profile"}, {"ENV": "/etc/profile"}, {"BASH_FUNC_tool%%": "() { echo hijacked; }"},
    {"SHELLOPTS": "xtrace"}, {"BASHOPTS": "extglob"}, {"POSIXLY_CORRECT": "1"}, {"PWD": "/elsewhere"},
    {"SHLVL": "x"}, {"SHLVL": "-1"}, {"SHLVL": "999"}, {"SHLVL": "٣"},
])
def test_an_environment_that_changes_what_bash_does_goes_to_bash(path, extra):
    assert plan("tool", [], BASH, {"PATH": path, **extra}, "/tmp") is None


def test_other_shells_unknown_programs_relative_path_entries_and_unknown_directories_go_to_bash(path):
    assert plan("tool", [], "/bin/sh", {"PATH": path}, "/tmp") is None  # only bash's ways are copied
    (Path(path.split(":")[0]).parent / "bash").symlink_to("/bin/sh")  # an image's "bash" that is another shell
    assert plan("tool", [], str(Path(path.split(":")[0]).parent / "bash"), {"PATH": path}, "/tmp") is None
    assert plan("nothing-called-this", [], BASH, {"PATH": path}, "/tmp") is None  # bash says: not found, 127
    assert plan("tool", [], BASH, {"PATH": f"bin:{path}"}, "/tmp") is None  # depends on the directory
    assert plan("tool", [], BASH, {"PATH": f":{path}"}, "/tmp") is None
    assert plan("tool", [], BASH, {}, "/tmp") is None
    assert plan("tool", [], BASH, {"PATH": path}, "") is None  # PWD not known
