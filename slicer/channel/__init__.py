"""Host <-> guest channel: yamux streams over one virtio-serial port per VM.

Kept import-free: the guest imports ``slicer.channel.yamux`` with only the standard library.
"""

PORT_NAME = "slicer.0"  # the channel's virtserialport; the guest sees /dev/virtio-ports/slicer.0
