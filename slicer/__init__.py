"""Slicer in Python: micro-VMs on your own Linux host, behind an HTTP API.

This package is also copied into the guest image (only ``slicer.channel.yamux`` and
``slicer.agent``), so this file must import nothing.
"""

__version__ = "0.1.0"
