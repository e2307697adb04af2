"""The reference model family: Llama-architecture causal LMs trained here, from scratch.

Pythia-style control: every member sees the same Gutenberg tokens in the same order under
the same recipe; only the size changes (``ZooConfig.size``, a key of ``SIZES``). Members
are ordinary Hugging Face folders (config.json, model.safetensors, tokenizer files) plus a
``zoo.json`` holding the recipe, data hashes, losses, evaluations, device and timings.
The smallest members are embedded under ``checkpoints/`` (see ``embedded_members``);
the rest are reproduced by one command (docs/zoo.md)::

    python -m ptqscale.zoo.train_family --data ../shared/data/gutenberg-en --out DIR

Example::

    >>> from ptqscale.zoo import embedded_members
    >>> [p.name for p in embedded_members()][:2]
    ['gutenberg-llama-200k', 'gutenberg-llama-500k']

How to add a size: add a ``SizeSpec`` to ``SIZES`` in config.py (name = approximate
non-embedding parameters) and train it with ``python -m ptqscale.zoo.train --size NAME``.
Families built from recipes (issue 22): ``conf/zoo/<family>.yaml`` is a ``FamilyConfig``
(architecture preset llama | gpt2 | opt | neox, width/depth rule, tokenizer, data, training
length, optimiser) with its sizes; ``python -m ptqscale.zoo.factory train <family>`` trains
every size with checkpoints at 1/4..4 x its base tokens (the D axis; docs/zoo.md). How to add
a family: write its YAML (every key required) and run ``python -m ptqscale.zoo.factory conf``
for its conf/model entries; a new architecture is a preset in presets.py.

How to study a training choice: train a new family with ``--set family=NAME --set KEY=VALUE``
(any ``ZooConfig`` field); the family name keeps its checkpoints apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from ptqscale.zoo.config import SIZES, SizeSpec, ZooConfig, lr_at

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

__all__ = ["CHECKPOINTS", "SIZES", "SizeSpec", "ZooConfig", "embedded_members", "lr_at"]


def embedded_members() -> list[Path]:
    """Folders of the committed members, smallest first (by non-embedding parameters)."""
    found = [p for p in CHECKPOINTS.iterdir() if (p / "zoo.json").is_file()]
    size = {p: json.loads((p / "zoo.json").read_text())["params"]["non_embedding"]
            for p in found}
    return sorted(found, key=size.__getitem__)
