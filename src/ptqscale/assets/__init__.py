"""Embedded data and models (see README.md here); ``ASSETS`` is this folder."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DATA = ASSETS / "data"
# The embedded members of the reference family (src/ptqscale/zoo/checkpoints).
ZOO_CHECKPOINTS = ASSETS.parent / "zoo" / "checkpoints"
