"""The root config of a job and its registration with Hydra's ConfigStore.

Every group in ``conf/`` is typed by a dataclass of the module it configures
(``model`` -> ``ptqscale.models.ModelConfig``, ``data`` -> ``ptqscale.data.DataConfig``,
``eval`` -> ``ptqscale.metrics.EvalConfig``, ``method`` -> one ``MethodConfig`` subclass
per method), so an unknown or misspelt key is a composition error. YAML files only pick
and override; the defaults live here and in those dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ptqscale.assets import DATA as ASSETS_DATA
from ptqscale.assets import ZOO_CHECKPOINTS
from ptqscale.data import CalibConfig, DataConfig
from ptqscale.errors import ConfigError
from ptqscale.metrics import DEFAULT_METRICS, EvalConfig, LandscapeConfig
from ptqscale.models import ModelConfig


@dataclass
class PathsConfig:
    """Where results, caches and offline data live (none of these enter the job key)."""

    results: str = "results"
    cache: str = "${paths.results}/_cache"
    # Folder laid out like ../shared/data; named corpora with a local ``path`` are
    # looked up under it. Defaults to the data the package embeds.
    data: str = str(ASSETS_DATA)
    # Folder of the reference family's checkpoints (gutenberg-llama-<size>/). The smallest
    # members are embedded; point this at a folder holding the whole family for the rest
    # (``python -m ptqscale.zoo.train_family`` reproduces it).
    zoo: str = str(ZOO_CHECKPOINTS)
    # Folder where a streamed model's changed weights go (safetensors files, memory-mapped
    # back and unlinked at once: docs/placement.md), so host memory need not hold them;
    # null keeps them in host memory.
    spill: str | None = None


@dataclass
class WandbConfig:
    """The W&B mirror. ``auto``: online when an API key is configured, else offline."""

    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "ptqscale"
    entity: str | None = None
    dir: str = "${paths.results}/_wandb"

    def __post_init__(self) -> None:
        allowed = ("auto", "online", "offline", "disabled")
        if self.mode not in allowed:
            raise ConfigError(f"wandb.mode={self.mode!r} is not one of {', '.join(allowed)}")


@dataclass
class RunConfig:
    """One job: a model, quantized by a method into a format, measured on a corpus."""

    study: str = "adhoc"
    # The format axis of a sweep. Methods take it through ``method.format: ${format}``;
    # ``none`` ignores it (it measures the model as loaded).
    format: str = "bf16"
    seed: int = 0
    progress: bool = True
    # Hold a GPU exclusively for the job (one job per GPU with parallel local workers).
    # false lets several small jobs share one device.
    exclusive_gpu: bool = True
    # A record path such as ``metrics.dnll``: the job returns that number to the sweeper,
    # for one that optimizes it (Optuna, see sweeps/gptq_damp_optuna.yaml). Not in the key.
    objective: str | None = None
    # Metrics to measure, by registry name (ptqscale/metrics/registry.py); a set other
    # than the default enters the job key with each metric's version.
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Typed per method: each conf/method/<name>.yaml starts from ``/<name>_schema``.
    method: Any = MISSING
    # Calibration data for methods that need it (GPTQ, AWQ, ...); unused by none/rtn.
    calib: CalibConfig = MISSING
    landscape: LandscapeConfig = field(default_factory=LandscapeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    """Register the root schema and each method's schema with Hydra (idempotent).

    The method schemas are root-level configs (``/rtn_schema``), not options of the
    ``method`` group: Hydra's tab completion of ``method=`` then offers the methods alone,
    and it lists no root-level config as a group.
    """
    from ptqscale.methods import METHODS
    from ptqscale.runner.gpus import gpu_count

    OmegaConf.register_new_resolver("ptqscale_gpu_workers", lambda: max(1, gpu_count()),
                                    replace=True)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, (config_cls, _) in METHODS.items():
        cs.store(name=f"{name}_schema", node=config_cls)


def to_object(node: Any) -> Any:
    """A composed (typed) config node as its dataclass instance; runs ``__post_init__``.

    Keys force-added with ``+key=value`` bypass the schema during composition and would be
    dropped silently here, so they are refused instead (typos are fatal).
    """
    _refuse_unknown_keys(node, OmegaConf.get_type(node))
    return OmegaConf.to_object(node)


def refuse_unknown_root_keys(cfg: DictConfig) -> None:
    """Refuse a root key that ``RunConfig`` does not know (``+foo=1``); ``hydra`` is Hydra's."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key in cfg.keys():
        if key not in known and key != "hydra":
            raise ConfigError(f"{key} is not a known key; allowed root keys: {', '.join(sorted(known))}")


def _refuse_unknown_keys(node: Any, schema: Any, where: str = "") -> None:
    if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(schema)):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    path = where or str(node._key() or "config")
    for key in node.keys():
        if key not in fields:
            raise ConfigError(f"{path}.{key} is not a known key; allowed: {', '.join(fields)}")
        child = node._get_node(key)
        _refuse_unknown_keys(child, OmegaConf.get_type(child), f"{path}.{key}")
