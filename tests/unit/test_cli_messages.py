"""The CLI's error lines: whole (never wrapped, whatever the width) and literal (no markup)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_an_error_is_one_literal_line_at_any_width():
    env = {**os.environ, "COLUMNS": "40"}
    r = subprocess.run([sys.executable, "-m", "slicer", "vm", "forward", "x", "1:2:3:4:5",
                        "--url", "http://127.0.0.1:9"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: 1:2:3:4:5: expected [addr:]port[:host:port], or a unix socket path "
                                "on either side")


def test_help_paragraphs_are_wrapped_by_the_terminal_not_the_docstring():
    env = {**os.environ, "COLUMNS": "250"}
    r = subprocess.run([sys.executable, "-m", "slicer", "image", "build", "--help"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    # one line at a wide terminal: the docstring's own line break (after "agent,") is gone
    assert "ext4 root with the agent, the agent's runtime disk" in r.stdout
    assert "\n Example: slicer image build -f Dockerfile" in r.stdout  # example lines stay apart


def test_service_install_writes_enables_and_starts_the_unit(tmp_path):
    """``slicer service generate --install``, as Slicer's: the unit written, then enabled and
    started; a different unit of that name is kept unless --force. (systemctl is a recorder here:
    what is tested is what the CLI asks of it.)"""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n[ \"$1\" != enable ] || [ \"$3\" != bad.service ]\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "SLICER_SYSTEMD_DIR": str(units)}

    def install(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slicer", "service", "generate", "--install", *args],
                              env=env, capture_output=True, text=True, timeout=60)

    r = install("--name", "sl")
    assert r.returncode == 0 and "enabled and started" in r.stdout, r.stderr
    assert "ExecStart=" in (units / "sl.service").read_text()
    assert calls.read_text().splitlines() == ["daemon-reload", "enable --now sl.service"]
    (units / "sl.service").write_text("[Unit]\nDescription=someone else's\n")
    r = install("--name", "sl")
    assert r.returncode == 1 and "--force replaces it" in r.stderr
    assert "someone else's" in (units / "sl.service").read_text()
    assert install("--name", "sl", "--force").returncode == 0
    assert "ExecStart=" in (units / "sl.service").read_text()
    r = install("--name", "bad")  # systemctl refuses: said, and the exit status is 1
    assert r.returncode == 1 and "systemctl enable --now bad.service failed" in r.stderr
