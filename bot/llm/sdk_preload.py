"""Imported once by the SDK processes' fork server (never by the bot's own process): the
google-genai SDK with every one of its pydantic models built.

Pydantic builds a model's validator on its first use, and the SDK's first call uses
dozens of them (the request config, the response and all they hold): about 700 ms of CPU
here, paid by the first call each new SDK process made, after every start and every
restart. Built here, in the fork server, each child inherits them ready: a fresh
process's first call took 45 ms instead of 753 ms against the fake server at no latency.
Building all 471 models costs the fork server about 1 s, once.
"""

from __future__ import annotations

import logging

import pydantic
from google.genai import types

log = logging.getLogger(__name__)


def build_models() -> int:
    """Build every pydantic model the SDK's `types` module defines; returns how many."""
    built = 0
    for obj in list(vars(types).values()):
        if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj.__module__ == types.__name__:
            obj.model_rebuild()
            built += 1
    return built


try:
    build_models()
except Exception:  # a newer SDK may refuse some model: its children then build it on first use
    log.exception("could not build the SDK's models ahead of its first call")
