"""The ``slicer`` command: the daemon (``up``, ``image build``) and a client for its API
(``vm …``, ``secret …``, ``info``), with Slicer's command tree."""

import inspect
import re

import typer

from slicer.cli import background, ca, forks, images, proxy, snapshots, vm  # noqa: F401  (register their commands)
from slicer.cli.daemon import app

__all__ = ["app"]


def reflow(text: str) -> str:
    """A docstring as help: the lines of a paragraph joined (the terminal wraps them to its width;
    kept, they broke mid-sentence), paragraphs and ``Example`` lines kept apart."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(re.sub(r"\n(?!Examples?:)", " ", p) for p in paragraphs)


def _reflow_all(group: typer.Typer) -> None:
    for command in group.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = reflow(command.callback.__doc__)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _reflow_all(sub.typer_instance)


_reflow_all(app)
