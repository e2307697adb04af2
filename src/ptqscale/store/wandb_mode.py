"""Which W&B mode a mirror uses, and whether its server answers (no torch, no W&B import
unless asked): shared by the job mirror (runner/tracking.py) and the study report run
(ptqscale_analysis/wandb_study.py), which may read only the store package.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

_DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT = 3.0  # seconds an online mirror waits for the server before going offline


def base_url() -> str:
    """The W&B server this process talks to (``WANDB_BASE_URL`` or W&B's default)."""
    return os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL


def api_key_configured(url: str | None = None) -> bool:
    """Whether W&B would find an API key for server ``url``: W&B's own lookup (environment,
    then ``$NETRC`` / ``~/.netrc`` for that host), so self-hosted servers count too."""
    url = url or base_url()
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return bool(read_netrc_auth(host=url))
    except ImportError:  # older wandb: its netrc reader by host
        import netrc

        try:
            return netrc.netrc(os.environ.get("NETRC")).authenticators(
                urlsplit(url).hostname or "") is not None
        except (OSError, netrc.NetrcParseError):
            return False
    except Exception:  # noqa: BLE001 - a malformed key file: W&B would refuse it too
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` when an API key is configured for the server, else ``offline``."""
    if mode != "auto":
        return mode
    return "online" if api_key_configured() else "offline"


def server_answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
