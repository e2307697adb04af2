"""Exceptions shared by every sub-package."""


class PTQScaleError(Exception):
    """Base class of ptqscale's own errors."""


class ConfigError(PTQScaleError, ValueError):
    """A config value is invalid; the message names the key and what is allowed."""
