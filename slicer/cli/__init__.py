"""The ``slicer`` command: the daemon (``up``, ``image build``) and a client for its API
(``vm …``, ``secret …``, ``info``), with Slicer's command tree."""

from slicer.cli import background, forks, images, snapshots, vm  # noqa: F401  (register their commands)
from slicer.cli.daemon import app

__all__ = ["app"]
