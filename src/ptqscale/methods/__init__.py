"""PTQ methods: ``quantize(model, cfg)`` where the config's type picks the method.

A method is a config dataclass (ending in ``Config``, with a ``name`` field equal to the
registry name and to its file in ``conf/method/``) plus a function that quantizes the
target linear layers of a model in place and returns a :class:`QuantReport`.

Adding a method ``foo``:

1. write ``src/ptqscale/methods/foo.py`` with ``@dataclass class FooConfig(MethodConfig)``
   (``name: str = "foo"``) and ``@register_method("foo", FooConfig) def quantize_foo(model,
   cfg, ctx) -> QuantReport``; every module of this package is imported when the package
   is (discovery), so the decorator registers it: no list to edit;
2. add ``conf/method/foo.yaml`` (``defaults: [foo_schema, _self_]``) with every default
   spelled out, so that it lands in every record.

Example::

    >>> from ptqscale.methods import quantize, RTNConfig
    >>> report = quantize(model, RTNConfig(format="int4_g128"))      # doctest: +SKIP
    >>> report.weight_sqnr_db                                          # doctest: +SKIP
    21.3
"""

import importlib
import pkgutil

from ptqscale.methods.activations import ActQuantConfig
from ptqscale.methods.base import (
    METHODS,
    MethodConfig,
    QuantContext,
    QuantReport,
    TargetsConfig,
    get_method,
    quantize,
    register_method,
    select_targets,
)


def _discover() -> None:
    """Import every module of this package; each registers its methods by decorator."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_discover()

# The config classes of the registered methods, importable from here (``GPTQConfig``, ...).
_CONFIGS = {cls.__name__: cls for cls, _ in METHODS.values()}
globals().update(_CONFIGS)

__all__ = [
    "METHODS",
    "ActQuantConfig",
    "MethodConfig",
    "QuantContext",
    "QuantReport",
    "TargetsConfig",
    "get_method",
    "quantize",
    "register_method",
    "select_targets",
    *sorted(_CONFIGS),
]
