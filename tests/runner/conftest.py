"""Fixtures for runner tests: compose configs in-process (CLI helpers: runner_utils.py)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs


@pytest.fixture
def composed():
    """compose(overrides) -> DictConfig, with conf/ and the schemas registered."""
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        yield lambda overrides=(): compose("config", overrides=list(overrides))
