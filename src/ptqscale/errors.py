"""Exceptions shared by every sub-package, and the one wording of an unknown-name error."""

import difflib


class PTQScaleError(Exception):
    """Base class of ptqscale's own errors."""


class ConfigError(PTQScaleError, ValueError):
    """A config value is invalid; the message names the key and what is allowed."""


class ImplausibleResultError(PTQScaleError):
    """A loaded model or a measured value that cannot be right (missing or non-finite
    weights, a non-finite NLL, an NLL worse than uniform): the job fails with the reason
    instead of storing a number that would be trusted."""


def unknown_name(kind: str, name: str, allowed) -> str:
    """Message for an unknown registry name: the close matches, then everything allowed.

    >>> unknown_name("corpus", "wikitext", ["wikitext2", "ptb", "c4"])
    "unknown corpus 'wikitext' (did you mean 'wikitext2'?); allowed: ['c4', 'ptb', 'wikitext2']"
    """
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; allowed: {allowed}"


def require(checks, prefix: str = "") -> None:
    """Raise ConfigError with the message of the first ``(ok, message)`` pair that is not ok.

    >>> try:
    ...     require([(1 > 0, "fine"), (2 < 1, "x=2 must be < 1")])
    ... except ConfigError as e:
    ...     print(e)
    x=2 must be < 1
    """
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{prefix}{message}")
