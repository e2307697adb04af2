"""Errors of the models package; all are :class:`ptqscale.errors.ConfigError` (a ValueError).

They are raised by :func:`ptqscale.models.validate_model_config` before any weight is read, so a
bad model entry in a sweep fails in milliseconds with a message naming the value and what is
allowed.
"""

from __future__ import annotations

import difflib

from ptqscale.errors import ConfigError


class ModelNotFoundError(ConfigError):
    """The model path does not exist (or a folder has no weights or no tokenizer)."""


class UnsafeCheckpointError(ConfigError):
    """The checkpoint only has pickle files and ``allow_pickle`` is off."""


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not one that :func:`get_anatomy` knows."""


def unknown_name(kind: str, name: str, allowed) -> str:
    """Message for an unknown registry name: the close matches, then everything allowed.

    >>> unknown_name("corpus", "wikitext", ["wikitext2", "ptb", "c4"])
    "unknown corpus 'wikitext' (did you mean 'wikitext2'?); allowed: ['c4', 'ptb', 'wikitext2']"
    """
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; allowed: {allowed}"
