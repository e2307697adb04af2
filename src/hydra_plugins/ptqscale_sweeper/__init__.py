"""ptqscale's predictor-guided Hydra sweeper (``hydra/sweeper=ptqscale``; docs/sweeper.md).

``hydra_plugins`` is a namespace package (no ``__init__.py``): Hydra finds every plugin
installed under it, ours next to hydra's own launchers and sweepers.
"""
