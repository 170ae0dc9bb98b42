"""``python -m slicer`` is the ``slicer`` command."""

from slicer.cli import app

app()
