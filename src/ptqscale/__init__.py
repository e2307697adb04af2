"""ptqscale: scaling-law studies of post-training quantization of language models.

Sub-packages (dependency order; see DESIGN in the README):

- ``formats``  number formats (pure tensor functions; imports nothing of the package)
- ``models``   loading causal LMs and their family-agnostic anatomy
- ``data``     corpora, tokenized streams, calibration sampling
- ``metrics``  perplexity, weight SQNR, loss-landscape features
- ``methods``  PTQ methods (``quantize(model, cfg)``), built on ``formats``
- ``files``    atomic writes, locks and quarantine of corrupt files (stdlib only)
- ``store``    result records (torch-free; the analysis package reads only this)
- ``runner``   the Hydra app that ties everything together
- ``zoo``      the reference model family trained offline

Importing ``ptqscale`` imports nothing heavy: torch is loaded by the sub-packages
that need it, so the store and the analysis package run without it.
"""

__version__ = "0.1.0"
