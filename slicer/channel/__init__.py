"""Host <-> guest channel: yamux streams over one virtio-serial port per VM.

Kept import-free: the guest imports ``slicer.channel.yamux`` with only the standard library.
"""
