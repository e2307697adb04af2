"""The method registry: discovered from the package, one config file per method, loud on misuse."""

from __future__ import annotations

from pathlib import Path

import pytest

import ptqscale.methods as methods
from ptqscale.errors import ConfigError
from ptqscale.methods import METHODS, RTNConfig, get_method, register_method

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"


def test_every_method_module_registers_and_has_its_config_file():
    # registry name = config file name (STYLE 6); discovery imported every module
    assert set(METHODS) == {p.stem for p in CONF.glob("*.yaml")}
    for name, (cls, fn) in METHODS.items():
        assert cls.__name__.endswith("Config") and getattr(methods, cls.__name__) is cls
        assert fn.__module__.startswith("ptqscale.methods."), name


def test_a_duplicate_or_unknown_name_is_loud():
    with pytest.raises(ValueError, match="registered twice"):
        register_method("rtn", RTNConfig)(lambda model, cfg, ctx: None)
    with pytest.raises(ConfigError, match="gptq"):
        get_method("gtpq")
