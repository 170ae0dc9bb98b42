"""Slicer Proxy: egress rules and credentials that never enter a VM.

* ``rules`` — what a rule is and how a request matches it (pure; both sides use it);
* ``state`` — the one file both sides share: clients, secrets, rules (written by the daemon);
* ``store`` — the daemon's side: validates ``/proxy/v1`` changes and writes them crash-safe;
* ``policy`` — the proxy's side: reads the file as it changes, decides each connection and request;
* ``audit`` — one line per decision (stdout and a file the daemon reads for ``/proxy/v1/audit``);
* ``addon`` and ``server`` — the proxy process itself: mitmproxy, which runs in a virtualenv of its
  own (its pinned dependencies clash with the daemon's), started by ``slicer proxy up`` (``launch``).

Only ``addon`` and ``server`` import mitmproxy; everything else is standard library, so the proxy's
virtualenv needs no more than mitmproxy and this package on its path.
"""
