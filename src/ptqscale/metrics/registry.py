"""The metric registry: a job asks for metrics by name (root config ``metrics``).

The contract of a metric
------------------------
A metric is one module of ``ptqscale.metrics`` (file name = metric name) holding a function
registered with :func:`register_metric`. It declares

- ``name``: what a job lists in ``metrics: [...]`` and the key of its ``metric_info``;
- ``needs``: what the runner must provide (see :data:`NEEDS`): the evaluation stream, the
  full-precision model before quantization (``fp_model``: the metric's ``prepare`` runs on
  it, e.g. to keep fp logits), calibration data, the method's report, a GPU;
- ``higher_is_better`` for its ``headline`` field (default: the field named like the
  metric): the analysis reads this direction from the record where it picks a best or
  builds a Pareto frontier; ``directions`` gives other fields' directions
  (``{fnmatch pattern: higher_is_better}``, e.g. ``{"top1_agreement": True}``) so that any
  field can be the target of a fit (recorded as ``metric_info.<name>.directions``);
- ``version``: its protocol version. A change to what it measures bumps the version; the
  version is recorded (``record["metric_info"]``) and, for metrics beyond the default
  set, enters the job key, so old numbers are never silently mixed with new ones.

A metric with options (e.g. ``tasks``: ``eval.tasks``) declares ``settings(eval_cfg) ->
dict``: what of the config changes its numbers. It runs when the job key is made (before
the model loads: the place to refuse bad options), enters the key beside the version, and
is recorded in ``metric_info``; jobs that do not ask for the metric never see it.

``compute(ctx: MetricContext) -> dict`` runs after quantization and returns flat
``field -> number`` pairs that land in ``record["metrics"]`` (and in the analysis frame as
``metrics.<field>``): no other file lists them. ``prepare(ctx)``, where given, runs on the
full-precision model before quantization; what it returns is ``ctx.prepared[name]``.

``tap(ctx)``, where given, runs after quantization and before any metric computes; it may
return a consumer ``(start, first, logits) -> None`` that the quantized model's NLL pass (the
metric ``nll``) feeds window by window (``perplexity.measure_perplexity(on_logits=...)``), or
None where it cannot use that pass's logits. It lies in ``ctx.taps[name]``; metrics with a
tap compute after the others, so after that pass (e.g. ``fidelity``: no pass of its own).

Keys: the default set :data:`DEFAULT_METRICS` is in no key (records predating the
registry keep theirs); a job whose set differs from it has ``{name: version}`` of its
metrics in its key. Adding a metric to the code therefore re-keys nothing; the versions of
the default metrics are the global ``PROTOCOL_VERSION`` (bump that to change them).

Adding a metric ``foo``: write ``src/ptqscale/metrics/foo.py`` with::

    @register_metric("foo", higher_is_better=False, version=1, needs=("stream",))
    def measure_foo(ctx: MetricContext) -> dict:
        return {"foo": ...}

and run a job with ``metrics=[nll,weight_sqnr,model_bytes,foo]``. Discovery imports
every module of the package, so there is no list to edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ptqscale.errors import ConfigError, unknown_name

# What a metric may need, and what the runner does about it.
NEEDS = {
    "stream": "the tokenized evaluation stream (ctx.stream)",
    "fp": "the full-precision NLL result of the model, cached per model (ctx.fp)",
    "fp_model": "prepare(ctx) runs on the full-precision model before quantization "
                "(fp logits, activations); its value is ctx.prepared[name]",
    "calibration": "calibration data (ctx.calibration): sampled, and calib keyed, even for "
                   "a method without calibration",
    "report": "the method's QuantReport (ctx.report)",
    "gpu": "a CUDA device: refused before the model loads on a run without one",
}
# Measured by a job that does not say otherwise; never in a key (see the module docstring).
DEFAULT_METRICS = ("nll", "weight_sqnr", "model_bytes")
# Every record needs the NLL: the job's quality, the sanity checks and the analysis use it.
REQUIRED_METRICS = ("nll",)


@dataclass
class MetricContext:
    """What a metric's ``prepare``/``compute`` may read (filled per its ``needs``)."""

    model: Any
    stream: Any                      # 1-D token ids of the evaluation corpus
    eval: Any                        # EvalConfig
    fp: dict                         # full-precision NLL result (measure_perplexity's dict)
    params: dict                     # parameter counts (models.count_parameters)
    fmt: Any                         # the job's parsed Format
    method: Any                      # the job's method config
    tokenizer: Any = None            # the job's tokenizer (e.g. for lm-evaluation-harness)
    label: str = ""                  # "<model> after <method> <format> on <data>", for errors
    results: str = ""                # the store's root: a metric's per-model cache lies under it
    fp_key: str = ""                 # the model's fp_eval key (runner/keys.py), to key that cache
    progress: bool = False
    calibration: Any = None
    report: Any = None               # QuantReport, set after quantization
    timings: dict = field(default_factory=dict)
    prepared: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)   # name -> consumer of the NLL pass's logits


@dataclass(frozen=True)
class Metric:
    """A registered metric (see the module docstring for the contract)."""

    name: str
    compute: Callable[[MetricContext], dict]
    higher_is_better: bool
    version: int
    needs: frozenset[str]
    headline: str
    prepare: Callable[[MetricContext], Any] | None = None
    settings: Callable[[Any], dict] | None = None
    directions: dict[str, bool] = field(default_factory=dict, hash=False)  # pattern -> higher?
    tap: Callable[[MetricContext], Any] | None = None   # reads the NLL pass's logits

    def info(self, eval_cfg: Any = None) -> dict:
        """What the record stores about the metric (``record["metric_info"][name]``)."""
        out = {"version": self.version, "higher_is_better": self.higher_is_better,
               "headline": self.headline, "needs": sorted(self.needs)}
        if self.directions:
            out["directions"] = dict(self.directions)
        if self.settings is not None and eval_cfg is not None:
            out["settings"] = self.settings(eval_cfg)
        return out

    def identity(self, eval_cfg: Any = None) -> Any:
        """The metric's part of a job key: its version, with its settings where it has any."""
        if self.settings is None or eval_cfg is None:
            return self.version
        return {"version": self.version, "settings": self.settings(eval_cfg)}


METRICS: dict[str, Metric] = {}


def register_metric(name: str, *, higher_is_better: bool, version: int,
                    needs: Iterable[str] = (), headline: str | None = None,
                    prepare: Callable[[MetricContext], Any] | None = None,
                    settings: Callable[[Any], dict] | None = None,
                    directions: dict[str, bool] | None = None,
                  tap: Callable[[MetricContext], Any] | None = None):
    """Decorator registering ``compute(ctx) -> dict`` as the metric ``name``.

    >>> @register_metric("doc_demo", higher_is_better=True, version=1, needs=("report",))
    ... def measure_doc_demo(ctx):
    ...     return {"doc_demo": 1.0}
    >>> METRICS.pop("doc_demo").info()["higher_is_better"]
    True
    """
    needs = frozenset(needs)
    unknown = sorted(needs - set(NEEDS))
    if unknown:
        raise ValueError(f"metric {name!r}: unknown needs {unknown}; allowed: {sorted(NEEDS)}")
    if ("fp_model" in needs) != (prepare is not None):
        raise ValueError(f"metric {name!r}: 'fp_model' in needs and a prepare function go "
                         "together")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"metric {name!r}: version must be an int >= 1, got {version!r}")

    def decorate(compute: Callable[[MetricContext], dict]) -> Callable[[MetricContext], dict]:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = Metric(name, compute, bool(higher_is_better), version, needs,
                               headline or name, prepare, settings,
                               {str(k): bool(v) for k, v in (directions or {}).items()},
                               tap)
        return compute
    return decorate


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; ConfigError listing the close matches and all names."""
    if name not in METRICS:
        raise ConfigError(f"metrics: {unknown_name('metric', name, METRICS)}")
    return METRICS[name]


def resolve_metrics(names: Iterable[str]) -> tuple[Metric, ...]:
    """The metrics a job asks for, checked (names, duplicates, required ones), in order.

    >>> [m.name for m in resolve_metrics(["nll", "model_bytes"])]
    ['nll', 'model_bytes']
    """
    names = [str(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"metrics: {dup} listed twice; list each metric once")
    metrics = tuple(get_metric(n) for n in names)
    missing = [n for n in REQUIRED_METRICS if n not in names]
    if missing:
        raise ConfigError(f"metrics={names} lacks {missing}: every record needs it "
                          f"(the default is {list(DEFAULT_METRICS)})")
    return metrics


def metrics_identity(metrics: Iterable[Metric], eval_cfg: Any = None) -> dict | None:
    """The metrics' part of a job key: None for the default set, else ``{name: version}``
    (``{name: {"version", "settings"}}`` for a metric with settings; ``Metric.identity``)."""
    metrics = list(metrics)
    if {m.name for m in metrics} == set(DEFAULT_METRICS):
        return None
    return {m.name: m.identity(eval_cfg) for m in sorted(metrics, key=lambda m: m.name)}


def needs_any(metrics: Iterable[Metric], need: str) -> bool:
    """Whether one of ``metrics`` declares ``need``."""
    return any(need in m.needs for m in metrics)


def check_device(metrics: Iterable[Metric], device: str, cuda_devices: int) -> None:
    """Refuse metrics that need a GPU on a run that has none (``device``: model.device)."""
    gpu = [m.name for m in metrics if "gpu" in m.needs]
    on_cpu = device == "cpu" or (device == "auto" and cuda_devices == 0)
    if gpu and on_cpu:
        why = "model.device=cpu" if device == "cpu" else "no CUDA device is visible"
        raise ConfigError(f"metrics {gpu} need a GPU, but this run has none ({why}); "
                          f"drop them from metrics or run on a GPU machine")
