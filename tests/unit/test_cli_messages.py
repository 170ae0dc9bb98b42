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
