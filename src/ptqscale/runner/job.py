"""One job: validate -> key -> skip if done -> load -> measure -> quantize -> measure -> record.

See DESIGN "Data flow of one job". A job that fails after validation writes a failure
record (and re-raises, so that the launcher reports it); a config error writes nothing.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ptqscale import console
from ptqscale.errors import ConfigError, PTQScaleError
from ptqscale.runner import identity, keys
from ptqscale.runner.config import to_object
from ptqscale.runner.environment import environment
from ptqscale.runner.gpus import claim_gpu
from ptqscale.runner.measure import model_level, quantize_and_measure
from ptqscale.store import claim_job, read_record, write_record
from ptqscale.store.schema import stored_config, stored_method

if TYPE_CHECKING:   # the methods and formats load torch; the annotations are never evaluated
    from ptqscale.data import CalibConfig, DataConfig
    from ptqscale.formats import Format
    from ptqscale.methods import MethodConfig
    from ptqscale.metrics import EvalConfig, LandscapeConfig
    from ptqscale.models import ModelConfig

log = logging.getLogger("ptqscale")


class JobFailed(PTQScaleError):
    """Raised after a failure record was written, so that launchers count the failure."""


@dataclass
class JobSpec:
    """A validated job: typed configs, the parsed format and the keys.

    ``fmt`` is ``method.format`` parsed, once: the job and its record use it (the record
    stores the name once, in ``format.name``).
    """

    study: str
    model: ModelConfig
    data: DataConfig
    eval: EvalConfig
    method: MethodConfig
    calib: CalibConfig | None     # None: the method reads no calibration data
    landscape: LandscapeConfig | None   # None: landscape.enabled is false
    fmt: Format
    seed: int
    key: str
    results: str
    cache: str
    progress: bool
    spill: str | None = None   # paths.spill: where a streamed model's changed weights go
    exclusive_gpu: bool = True
    metrics: tuple = ()   # the registered Metric objects the job measures, in order
    # fingerprints of what the job loads (role -> fingerprint), and those that differ from
    # the store's bindings of their names (they are in the key; runner/identity.py)
    identity: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    # a plan made without the hub: the model's config is not cached, so the checks that need
    # its shapes (context, block divisibility) wait for the run
    needs_download: bool = False

    @property
    def name(self) -> str:
        """Readable job name (the key identifies the job); activation schemes are spelled out."""
        model = self.model.name + ("~stand-in" if self.model.stand_in else "")
        name = f"{self.study}/{model}/{self.data.name}/{self.fmt.name}/{self.method.name}"
        act = getattr(self.method, "activations", None)
        if act is None:
            return name
        alpha = f"_a{act.alpha:g}" if act.granularity == "crossquant" else ""
        return f"{name}+a{act.format}_{act.granularity}{alpha}"


def validate_job(cfg: DictConfig, bind: bool = False) -> JobSpec:
    """Check the whole config without loading a model; raise ConfigError naming the key.

    ``bind``: bind names seen for the first time to their files in the store (a job about
    to run does; checking and planning do not write).
    """
    from ptqscale.runner.config import refuse_unknown_root_keys
    from ptqscale.store import check_study

    refuse_unknown_root_keys(cfg)
    check_study(cfg.study)
    return build_spec(lambda name: typed_node(cfg, name), bind=bind)


def typed_node(cfg: DictConfig, name: str) -> Any:
    """Root node ``name`` of a job config as its typed object (plain values as they are)."""
    value = cfg[name]
    if name == "method":
        _check_method_class(value)
    return to_object(value) if isinstance(value, DictConfig) else value


def _check_method_class(node: DictConfig) -> None:
    from ptqscale.methods import get_method

    name = str(OmegaConf.select(node, "name"))
    config_cls, _ = get_method(name)
    if not issubclass(OmegaConf.get_type(node) or object, config_cls):
        raise ConfigError(f"method={name!r}: the config is not a {config_cls.__name__}; "
                          f"start conf/method/{name}.yaml from '/{name}_schema'")


def _now(key: tuple, make: Callable[[], Any]) -> Any:
    return make()


def build_spec(node: Callable[[str], Any], memo: Callable[[tuple, Callable[[], Any]], Any] = _now,
               bind: bool = False) -> JobSpec:
    """The job made of the root nodes ``node(name)`` returns, checked in a fixed order.

    ``memo(key, make)`` may return an earlier ``make()`` for the same key: the planner
    (runner/planner.py) shares parsed formats, model skeletons, validated corpora and key
    parts between the jobs of a sweep that hold the same node objects (keys use ``id``).
    """
    from ptqscale.data import validate_data_config
    from ptqscale.methods.base import parse_format
    from ptqscale.metrics.registry import check_device, needs_any, resolve_metrics
    from ptqscale.models.skeleton import describe_model
    from ptqscale.runner.gpus import gpu_count

    method = node("method")
    fmt = memo(("format", method.format), lambda: parse_format(method.format, "format"))
    model, data, eval_cfg = node("model"), node("data"), node("eval")
    names = tuple(node("metrics"))
    metrics = memo(("metrics", names), lambda: resolve_metrics(names))
    if bind:  # a job about to run, on this machine (a plan made elsewhere does not check)
        check_device(metrics, model.device, gpu_count())
        if model.placement == "spread":
            from ptqscale.models.spread import spread_devices

            spread_devices(model)  # the GPUs it spreads over exist here
    uses_calib = method.uses_calibration or needs_any(metrics, "calibration")
    calib = node("calib") if uses_calib else None
    node("wandb")  # validates wandb.mode
    landscape = node("landscape")
    landscape = landscape if landscape.enabled else None
    skeleton = memo(("skeleton", id(model), bind),
                    lambda: describe_model(model, hub_cache_only=not bind))
    # without the checkpoint's config (planning offline) the configured context stands in
    context = skeleton.context if skeleton is not None else model.max_seqlen
    if context is not None and eval_cfg.seqlen > context:
        raise ConfigError(f"eval.seqlen={eval_cfg.seqlen} exceeds the context of model "
                          f"{model.name!r} ({context}; model.max_seqlen or the "
                          f"checkpoint's max positions)")
    if context is not None and calib is not None and calib.seqlen > context:
        raise ConfigError(f"calib.seqlen={calib.seqlen} exceeds the context of model "
                          f"{model.name!r} ({context}); allowed: at most that")
    memo(("data", id(data)), lambda: validate_data_config(data, min_tokens=eval_cfg.seqlen))
    if calib is not None:
        memo(("data", id(calib)), lambda: validate_data_config(calib.data))
    if not method.allow_padding and skeleton is not None:
        memo(("divisible", id(fmt), id(model)),
             lambda: _check_divisible(fmt, skeleton.target_shapes))
    study, seed, paths = node("study"), node("seed"), node("paths")
    roles = identity.labels(model, data, calib)
    prints = {role: memo(("files", role, id(cfg)), lambda r=role, c=cfg: _fingerprint(r, c, bind))
              for role, (_, _, cfg) in roles.items()}
    files = memo(("bound", paths.results, *(id(c) for _, _, c in roles.values())),
                 lambda: identity.resolve(paths.results, roles, prints, write=bind))
    key = keys.job_key(study, model, data, eval_cfg, method, calib, landscape, seed,
                       identity=lambda kind, obj: memo(("identity", kind, id(obj)),
                                                       lambda: keys.IDENTITY[kind](obj)),
                       files=files, metrics=metrics)
    return JobSpec(study=study, model=model, data=data, eval=eval_cfg, method=method,
                   calib=calib, landscape=landscape, fmt=fmt, seed=seed, key=key,
                   identity={r: p for r, p in prints.items() if p is not None}, files=files,
                   results=paths.results, cache=paths.cache, spill=paths.spill,
                   progress=node("progress"),
                   exclusive_gpu=node("exclusive_gpu"), metrics=metrics,
                   needs_download=skeleton is None)


def _fingerprint(role: str, cfg: Any, resolve_hub: bool) -> str | None:
    """The files' fingerprint of a job's model or corpus (hub commits resolved only for a job
    about to run: a plan made offline says "needs download" instead)."""
    if role == "model":
        return identity.model_fingerprint(cfg, resolve_hub=resolve_hub)
    return identity.data_fingerprint(cfg)


def _check_divisible(fmt: Format, shapes: dict[str, tuple[int, int]]) -> None:
    for name, (_, n_in) in shapes.items():
        if fmt.padding_needed(n_in):
            raise ConfigError(
                f"format={fmt.name!r}: its block of {fmt.block_size} does not divide the "
                f"{n_in} input features of {name}; pick a block that divides it or set "
                f"method.allow_padding=true")


def run_job(cfg: DictConfig) -> dict:
    """Run (or skip) the job ``cfg`` describes and return its record.

    The job is claimed for its whole run (store/claims.py): a job that another live
    process runs is left to it and answered ``{"status": "busy", ...}``, with no record.
    """
    spec = validate_job(cfg, bind=True)
    with claim_job(spec.results, spec.study, spec.key) as holder:
        if holder is not None:
            log.info("[busy] %s (%s) is being run by %s", spec.name, spec.key, holder)
            return {"job_key": spec.key, "study": spec.study, "name": spec.name,
                    "status": "busy", "holder": holder}
        return _run_claimed(spec, cfg)


def _run_claimed(spec: JobSpec, cfg: DictConfig) -> dict:
    done = read_record(spec.results, spec.study, spec.key)
    if done is not None and done["status"] == "complete":
        log.info("[skip] %s (%s) already complete", spec.name, spec.key)
        return _remirrored(done, cfg, spec.results)
    record = _base_record(spec, cfg)
    start = time.perf_counter()
    failure: BaseException | None = None
    try:
        record.update(_execute(spec))
        record["status"] = "complete"
    except Exception as e:  # noqa: BLE001 - any failure becomes a failure record
        failure = e
        record["status"] = "failed"
        record["error"] = {"type": type(e).__name__, "message": str(e),
                           "traceback": traceback.format_exc()[-4000:]}
    record.setdefault("timings", {})["total"] = time.perf_counter() - start
    record["wandb"] = {"status": "pending"}
    write_record(spec.results, record)      # the store first: it is the truth
    record["wandb"] = _mirror(record, cfg)
    write_record(spec.results, record)
    log.info(_summary_line(record))
    if failure is not None:
        raise JobFailed(f"{spec.name} failed: {type(failure).__name__}: {failure}") from failure
    return record


def _execute(spec: JobSpec) -> dict:
    if not spec.exclusive_gpu:
        return _execute_on_device(spec)
    with claim_gpu() as gpu:
        if gpu is not None and spec.model.device == "auto":
            spec.model = replace(spec.model, device=f"cuda:{gpu}")
        return _execute_on_device(spec)


def _execute_on_device(spec: JobSpec) -> dict:
    from ptqscale.models.mapped import set_spill
    from ptqscale.models.reuse import give_back, shared_model

    timings: dict[str, float] = {}
    console.library_bars(spec.progress)
    with console.stage(f"load {spec.model.name}", timings, "load"):
        # a model this process loaded for an earlier job of the same files, put back as loaded
        model, tokenizer, reused = shared_model(spec.model, spec.identity.get("model"))
        set_spill(model, spec.spill)
    ok = False
    try:
        level = model_level(spec, model, tokenizer, timings)
        result = quantize_and_measure(spec, model, tokenizer, level, timings)
        # the attention kernel of the job's last perplexity pass (metrics/chunked_head.py),
        # read before give_back puts the model's attributes back as loaded
        attention = getattr(model, "ptqscale_attention", None)
        ok = True
    finally:   # a failed job's model is dropped, never kept half-quantized
        with console.stage("restore the model", timings, "restore"):
            give_back(model, ok)
    result["timings"] = timings
    result["env"] = {**environment(model), "attention": attention,
                     "model_load": "reused" if reused else "loaded"}
    if spec.model.stand_in:
        from ptqscale.models.standins import summary

        result["env"]["stand_in"] = summary(spec.model)
    return result


def _base_record(spec: JobSpec, cfg: DictConfig) -> dict:
    from ptqscale.metrics import PROTOCOL_VERSION

    return {
        "job_key": spec.key, "study": spec.study, "name": spec.name,
        "protocol_version": PROTOCOL_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": spec.model.name, "family": spec.model.family, "size": spec.model.size,
                  # a stand-in (models/standins.py) says so where the checkpoint is named
                  "path": ("stand-in:" if spec.model.stand_in else "") + spec.model.path,
                  "dtype": spec.model.dtype,
                  # which checkpoint of the name (a zoo member's training length, a hub ref)
                  "revision": spec.model.revision},
        "data": {"name": spec.data.name, "split": spec.data.split},
        # fingerprints of what was loaded (runner/identity.py); "keyed_by_files" lists the
        # roles whose files differ from the store's bindings of their names
        "identity": {**spec.identity, "keyed_by_files": sorted(spec.files)},
        "eval": asdict(spec.eval),
        # the format name is stored once, in "format" (store/schema.py job_config puts it
        # back into the config)
        "method": stored_method(asdict(spec.method)),
        "format": spec.fmt.describe(),
        "config": stored_config(OmegaConf.to_container(cfg, resolve=True)),
    }


def _remirrored(record: dict, cfg: DictConfig, results: str) -> dict:
    """A finished record whose W&B mirror is pending or failed (killed between record and
    mirror, server down) is mirrored now; the store is updated with the outcome."""
    from ptqscale.runner.tracking import needs_mirror

    if needs_mirror(record, cfg.wandb.mode):
        record["wandb"] = _mirror(record, cfg)
        write_record(results, record)
    return record


def _mirror(record: dict, cfg: DictConfig) -> dict:
    from ptqscale.runner.tracking import mirror_record

    return mirror_record(record, to_object(cfg.wandb))


def _summary_line(record: dict) -> str:
    m = record.get("metrics", {})

    def f(key: str, fmt: str = ".4f") -> str:
        v = m.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return (f"[{record['status']}] {record['name']} nll={f('nll')} dnll={f('dnll', '+.4f')} "
            f"sqnr={f('weight_sqnr_db', '.2f')}dB bits={record['format'].get('bits_per_weight')} "
            f"{record['timings']['total']:.1f}s wandb={record['wandb'].get('status')}")
