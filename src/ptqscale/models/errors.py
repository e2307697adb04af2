"""Errors of the models package; all are :class:`ptqscale.errors.ConfigError` (a ValueError).

They are raised by :func:`ptqscale.models.validate_model_config` before any weight is read, so a
bad model entry in a sweep fails in milliseconds with a message naming the value and what is
allowed.
"""

from __future__ import annotations

from ptqscale.errors import ConfigError, unknown_name  # noqa: F401 (re-exported)


class ModelNotFoundError(ConfigError):
    """The model path does not exist (or a folder has no weights or no tokenizer)."""


class UnsafeCheckpointError(ConfigError):
    """The checkpoint only has pickle files and ``allow_pickle`` is off."""


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not one that :func:`get_anatomy` knows."""
