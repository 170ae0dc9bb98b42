"""Property-based requests over the served OpenAPI schema (schemathesis) against a real daemon
with a real VM: no input may get a 5xx.

Passes: (1) every operation with generated names, creates excluded; (2) every operation on the
real VM (``vm-1`` of group ``vm``) but those changing its state, so generated queries and bodies
reach its agent (``cp`` with a small directory as its path: a tar of ``/`` is the whole disk);
(3) those (pause, suspend, shutdown, ...); (4) creates and live forks with invalid input.
Excluded, because each would boot VMs per example and make the run unbounded: *valid* creates
and forks (``tests/test_vms.py``, ``tests/test_forks.py`` cover them), template builds of real
groups, and ``POST /daemon/shutdown`` (it ends the daemon; ``tests/test_lifecycle.py`` covers it).
``SLICER_FUZZ_EXAMPLES`` sets examples per operation (default 12).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import Daemon, wait_agent

pytestmark = [pytest.mark.vm, pytest.mark.long]

CONFIG = """
config:
  host_groups:
  - name: vm
    count: 1
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
  api:
    bind_address: 127.0.0.1
    port: PORT
"""
CREATE = "(create_node|fork_vm)_.*"  # each valid example would boot VMs (up to 32 for a fork)
TEMPLATE = "build_template_.*"
LIFECYCLE = "(shutdown|pause|resume|suspend|restore|relaunch)_vm_.*"
COPY = "copy_(to|from)_vm_.*"  # run with a small directory as their path: "/" would tar the whole disk
DAEMON = "shutdown_daemon_.*"  # it would end the run (tests/test_lifecycle.py covers it)
ON_VM = {"hostname": "vm-1", "name": "vm"}


def schemathesis(d: Daemon, *args: str, parameters: dict | None = None) -> tuple[int, str]:
    """Run schemathesis against ``d``; returns (test cases run, output). Fails on any 5xx."""
    config = d.data_dir / "schemathesis.toml"
    lines = [f'headers = {{ Authorization = "Bearer {d.token}" }}', "request-timeout = 60.0",
             # Not values seen in answers (schemathesis reads them since the answers are typed): a
             # hostname listed by GET /nodes would take vm-1 through /suspend in the passes meant to
             # leave it running; the lifecycle has a pass of its own.
             "[phases.fuzzing.extra-data-sources]", "responses = false"]
    if parameters:
        lines.append("[parameters]")
        lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in parameters.items()]
    config.write_text("\n".join(lines) + "\n")
    examples = os.environ.get("SLICER_FUZZ_EXAMPLES", "12")
    exe = shutil.which("schemathesis")
    assert exe, "schemathesis is not installed (pip install -e '.[test]')"
    cmd = [exe, "--config-file", str(config),
           "run", f"{d.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", examples,
           "--workers", "1", "--seed", "1", "--generation-database", "none", "--no-color", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=d.data_dir)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-8000:]
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", text))
    assert cases > 0, text[-3000:]
    return cases, text


def test_no_input_gets_a_server_error(guest_image):
    d = Daemon(CONFIG).start()
    try:
        api = d.client()
        wait_agent(api, "vm-1")
        api.post("/vm/vm-1/exec", params={"cmd": "mkdir -p /tmp/fuzz/sub && echo x > /tmp/fuzz/sub/f",
                                          "buffered": "true"})
        generated, _ = schemathesis(d, "--exclude-operation-id-regex", f"{CREATE}|{TEMPLATE}|{DAEMON}")
        # The VM's own operations first, while it runs; then those that pause, suspend or stop it.
        on_vm, _ = schemathesis(d, "--exclude-operation-id-regex",
                                f"{CREATE}|{TEMPLATE}|{LIFECYCLE}|{DAEMON}|{COPY}", parameters=ON_VM)
        copies, _ = schemathesis(d, "--include-operation-id-regex", COPY,
                                 parameters={**ON_VM, "path": "/tmp/fuzz"})
        on_vm += copies
        states = api.get("/vm/vm-1").json()["status"]
        lifecycle, _ = schemathesis(d, "--include-operation-id-regex", LIFECYCLE, parameters=ON_VM)
        invalid, _ = schemathesis(d, "--include-operation-id-regex", CREATE, "--mode", "negative")
        print(f"schemathesis: {generated} cases with generated names, {on_vm} on running vm-1, "
              f"{lifecycle} of its lifecycle, {invalid} invalid creates and forks; no 5xx")
        assert states == "Running", "the VM's own operations ran against a running VM"
        assert d.proc is not None and d.proc.poll() is None, "the daemon kept running"
        assert api.get("/healthz").status_code == 200
    finally:
        d.cleanup()
