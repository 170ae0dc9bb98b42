"""How ``slicer proxy up`` starts the proxy: the group's CA made if need be, then the proxy's own
virtualenv's Python (mitmproxy pins versions of h11, cryptography and others that the daemon's
dependencies outgrew, so it gets an interpreter of its own: scripts/install.sh makes it) running
slicer.proxy.server with this package on its path."""

from __future__ import annotations

import os
from pathlib import Path

import slicer
from slicer.core.ca import ensure_group_ca

DEFAULT_VENV = Path("/opt/slicer/proxy-venv")
MITMPROXY = "mitmproxy==11.0.2"  # the newest release for Python 3.11


def proxy_python() -> Path:
    return Path(os.environ.get("SLICER_PROXY_PYTHON") or DEFAULT_VENV / "bin" / "python")


def command(hostgroup: str, bind: str, data_dir: Path, mode: str = "strict", deny_cidrs: list[str] | None = None,
            http_port: int = 3128, tls_port: int = 3129) -> tuple[list[str], dict[str, str]]:
    """The proxy's command line and environment (its CA made now, if the group has none)."""
    cert, key = ensure_group_ca(data_dir, hostgroup)
    argv = [str(proxy_python()), "-m", "slicer.proxy.server", "--hostgroup", hostgroup, "--bind", bind,
            "--data-dir", str(data_dir), "--mode", mode, "--ca-cert", str(cert), "--ca-key", str(key),
            "--http-port", str(http_port), "--tls-port", str(tls_port)]
    for cidr in deny_cidrs or []:
        argv += ["--deny-cidr", cidr]
    env = dict(os.environ)
    root = str(Path(slicer.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return argv, env


def missing() -> str | None:
    """Why the proxy cannot start here, or None."""
    if not proxy_python().exists():
        return (f"the proxy's Python ({proxy_python()}) is missing: run scripts/install.sh, or make it with "
                f"python3 -m venv {DEFAULT_VENV} && {DEFAULT_VENV}/bin/pip install '{MITMPROXY}' "
                "(or point SLICER_PROXY_PYTHON at one)")
    return None
