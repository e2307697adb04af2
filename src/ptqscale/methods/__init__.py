"""PTQ methods: ``quantize(model, cfg)`` where the config's type picks the method.

A method is a config dataclass (ending in ``Config``, with a ``name`` field equal to the
registry name and to its file in ``conf/method/``) plus a function that quantizes the
target linear layers of a model in place and returns a :class:`QuantReport`. (A method with
variants may name a validated config by the variant, as ``blockft`` does: ``blockft_joint2``;
``register_method(..., aliases=...)`` lets ``get_method`` find it by those names.)

Adding a method ``foo``:

1. write ``src/ptqscale/methods/foo.py`` with ``@dataclass class FooConfig(MethodConfig)``
   (``name: str = "foo"``) and ``@register_method("foo", FooConfig) def quantize_foo(model,
   cfg, ctx) -> QuantReport``; every module of this package is imported when the package
   is (discovery), so the decorator registers it: no list to edit;
2. add ``conf/method/foo.yaml`` with ``defaults: [/foo_schema, /method_common, _self_]``
   (the schema that ``register_configs`` stores for every registered method, then the
   options all methods share: ``conf/method_common.yaml``) and ``foo``'s own options with
   their defaults spelled out, so that a reader sees what lands in every record.

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
