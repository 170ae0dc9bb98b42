"""Guest networking on the host: one backend per host group.

- ``bridge`` (default with CAP_NET_ADMIN): a Linux bridge per group holding the gateway
  address, one TAP per VM on it, NAT egress; VMs reach each other and the host reaches them.
- ``isolated``: each VM's TAP in a network namespace of its own, routed to the host through a
  veth pair, one /30 per VM; no path to other VMs or to the host; ``allow``/``drop`` egress.
- ``passt`` (without CAP_NET_ADMIN): a passt process per VM (``--no-map-gw``), QEMU's stream
  netdev; never QEMU's slirp, which maps the gateway to the host's loopback.

Every VM sends only with its own MAC and IP (nftables). The daemon's rules live in tables of
its own (``slicer_<tag>``, the tag derived from the data directory), replaced atomically at start
and removed at stop; nobody else's rules are touched.
"""

from slicer.net.addressing import Addressing, mac_for
from slicer.net.backends import GroupNetwork
from slicer.net.config import NetGroup, NetworkConfig
from slicer.net.dryrun import DryRunNetwork
from slicer.net.host import HostNetwork, NetworkError

__all__ = ["Addressing", "DryRunNetwork", "GroupNetwork", "HostNetwork", "NetGroup", "NetworkConfig", "NetworkError",
           "mac_for"]
