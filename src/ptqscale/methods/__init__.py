"""PTQ methods: ``quantize(model, cfg)`` where the config's type picks the method.

A method is a config dataclass (ending in ``Config``, with a ``name`` field equal to the
registry name and to its file in ``conf/method/``) plus a function that quantizes the
target linear layers of a model in place and returns a :class:`QuantReport`.

Adding a method ``foo``:

1. write ``src/ptqscale/methods/foo.py`` with ``@dataclass class FooConfig(MethodConfig)``
   (``name: str = "foo"``) and ``@register_method("foo", FooConfig) def quantize_foo(model,
   cfg, ctx) -> QuantReport``;
2. import the module at the bottom of this file;
3. add ``conf/method/foo.yaml`` (``defaults: [foo_schema, _self_]``) with every default
   spelled out, so that it lands in every record.

Example::

    >>> from ptqscale.methods import quantize, RTNConfig
    >>> report = quantize(model, RTNConfig(format="int4_g128"))      # doctest: +SKIP
    >>> report.weight_sqnr_db                                          # doctest: +SKIP
    21.3
"""

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
from ptqscale.methods.rtn import NoneConfig, RTNConfig

__all__ = [
    "METHODS",
    "MethodConfig",
    "NoneConfig",
    "QuantContext",
    "QuantReport",
    "RTNConfig",
    "TargetsConfig",
    "get_method",
    "quantize",
    "register_method",
    "select_targets",
]
from ptqscale.methods import gptq  # noqa: F401, E402  (registers "gptq")
from ptqscale.methods.gptq import GPTQConfig  # noqa: E402

__all__ += ["GPTQConfig"]
from ptqscale.methods import smoothquant  # noqa: F401, E402  (registers "smoothquant")
from ptqscale.methods.activations import ActQuantConfig  # noqa: E402
from ptqscale.methods.smoothquant import SmoothQuantConfig  # noqa: E402

__all__ += ["ActQuantConfig", "SmoothQuantConfig"]
from ptqscale.methods import blockft  # noqa: F401, E402  (registers "blockft_*")
from ptqscale.methods.blockft import BlockFTConfig  # noqa: E402

__all__ += ["BlockFTConfig"]
from ptqscale.methods import awq  # noqa: F401, E402  (registers "awq")
from ptqscale.methods.awq import AWQConfig  # noqa: E402

__all__ += ["AWQConfig"]
from ptqscale.methods import athena  # noqa: F401, E402  (registers "athena")
from ptqscale.methods.athena import AthenaConfig  # noqa: E402

__all__ += ["AthenaConfig"]
