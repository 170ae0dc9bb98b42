#!/usr/bin/env bash
# Install what Slicer needs on a Debian/Ubuntu host (as root): QEMU, the image tools, and this
# package with its Python dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils mmdebstrap busybox-static e2fsprogs cpio procps ca-certificates openssh-client \
    patchelf skopeo umoci buildah runc \
    iproute2 nftables passt dnsmasq-base iperf3 \
    python3-pip python3-venv
# Debian and Ubuntu mark their system Python as externally managed (PEP 668); this host is ours.
pip_flags=()
if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")))'; then
    pip_flags+=(--break-system-packages)
fi
python3 -m pip install -q "${pip_flags[@]}" -e '.[test,dev]'
# The web console's xterm.js and /docs' Swagger UI, from npm, checked against pinned digests
python3 -m slicer.console.assets
# Slicer Proxy (`slicer proxy up`) runs mitmproxy, whose pinned dependencies (h11, cryptography, ...)
# clash with the daemon's: it gets a virtualenv of its own (slicer/proxy/launch.py finds it there).
proxy_venv=/opt/slicer/proxy-venv
mitmproxy=$(python3 -c 'from slicer.proxy.launch import MITMPROXY; print(MITMPROXY)')
if ! "$proxy_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mitmproxy') != '${mitmproxy#*==}')" 2>/dev/null; then
    python3 -m venv "$proxy_venv"
    "$proxy_venv/bin/pip" install -q "$mitmproxy"
fi
