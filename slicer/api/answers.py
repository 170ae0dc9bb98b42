"""How a route declares its answer's model (slicer/api/schema.py) so /openapi.json shows it."""

from __future__ import annotations

from typing import Any


def answers(model: Any) -> dict[str, Any]:
    """Route options for an answer the daemon builds: validated against ``model`` and sent with
    only the keys the route set (no default or null is added, unknown keys are kept)."""
    return {"response_model": model, "response_model_exclude_unset": True}


def passes_on(model: Any, status: int = 200) -> dict[str, Any]:
    """Route options for a guest agent's answer passed on: documented as ``model`` but not
    validated, so what a guest says can never turn into a 500 of ours (it is checked where used)."""
    return {"responses": {status: {"model": model}}}
