"""Metric ``tasks``: task accuracy by lm-evaluation-harness on the quantized model in memory.

Ask for it with ``metrics=[nll,weight_sqnr,model_bytes,tasks]`` and name the tasks in
``eval.tasks.names``: lm-eval's own (``lambada_openai``, ``hellaswag``, ... with the hub) or
the offline ones we ship (``ptq_gutenberg_cloze``, ``ptq_gutenberg_continuation``,
``ptq_tinystories_cloze``;
src/ptqscale/assets/tasks, docs/tasks.md). ``lm_eval.simple_evaluate`` runs on
``HFLM(pretrained=<the quantized model>, tokenizer=<the job's tokenizer>)`` with lm-eval's
default seeds, as its CLI does, so the numbers are those of
``python -m lm_eval --model hf --model_args pretrained=<folder> --include_path ...``
on the same weights (tests/metrics/test_tasks.py).

Fields, per task ``<name>``: ``task.<name>.<metric>`` and ``task.<name>.<metric>_stderr`` for
each metric lm-eval reports with the ``none`` filter (``acc``, ``acc_norm`` for multiple
choice), and ``task.<name>.version``; ``tasks_acc`` (the headline) is the mean ``acc`` over
the tasks asked. The task names, versions (for a group or tag such as ``mmlu``, those of every
task it runs too), few-shot count and limit enter the key of jobs that ask for this metric
only (``settings``); ``eval.tasks.batch_size`` changes speed only.
lm-eval is the optional extra ``ptqscale[tasks]``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from ptqscale.assets import ASSETS
from ptqscale.errors import ConfigError
from ptqscale.metrics.registry import MetricContext, register_metric

TASKS_DIR = ASSETS / "tasks"


@dataclass
class TasksConfig:
    """``eval.tasks``: what the ``tasks`` metric runs (read only when a job asks for it)."""

    names: list[str] = field(default_factory=list)  # lm-eval task (or group) names
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # first N documents of each task; None: all
    batch_size: int = 16  # lm-eval batch size (changes speed, not the result)

    def __post_init__(self):
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.tasks.num_fewshot={self.num_fewshot} must be >= 0 or null")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.tasks.limit={self.limit} must be >= 1 or null (all)")
        if self.batch_size < 1:
            raise ConfigError(f"eval.tasks.batch_size={self.batch_size} must be >= 1")


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's TaskManager with our offline tasks included (indexing takes seconds: once)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError("metric 'tasks' needs lm-evaluation-harness, which is not installed "
                          f"({e}); install it with: pip install 'ptqscale[tasks]'") from None
    return TaskManager(include_path=str(TASKS_DIR))


@functools.lru_cache(maxsize=64)
def task_version(name: str):
    """The version in task ``name``'s YAML (``metadata.version``; None for a group without)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's index uses

    tm = task_manager()
    if name not in tm.all_tasks:
        import difflib

        close = difflib.get_close_matches(name, tm.all_tasks, n=3)
        raise ConfigError(f"eval.tasks.names: unknown task {name!r} (close: {close}); ours: "
                          f"{_shipped()}; all: python -m lm_eval ls tasks")
    entry = tm.task_index[name]
    cfg = entry.cfg or (load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {})
    return (cfg.get("metadata") or {}).get("version")


def subtask_versions(name: str) -> dict:
    """Versions of every task a group or tag ``name`` runs, by task name, recursively (``mmlu``:
    its 4 groups and 57 subjects); {} for a task. A group's own version does not move when a
    subtask's definition changes, so these enter the key too."""
    entry = task_manager().task_index[name]
    if entry.kind.name == "TAG":   # a tag's entry lists its member tasks
        return _versions_of(sorted(entry.tags or ()))
    if entry.kind.name == "GROUP":
        return _versions_of((entry.cfg or {}).get("task") or [])
    return {}


def _versions_of(members) -> dict:
    """``subtask_versions`` of a group's ``task:`` entry: names, or tasks and groups defined
    inline (dicts)."""
    tm = task_manager()
    out = {}
    for m in [members] if isinstance(members, str | dict) else members:
        if isinstance(m, dict):   # defined inline in the group's YAML
            label = m.get("task") if isinstance(m.get("task"), str) else m.get("group")
            out[str(label)] = (m.get("metadata") or {}).get("version")
            if not isinstance(m.get("task"), str):   # an inline group: its own members
                out |= _versions_of(m.get("task") or [])
        elif m in tm.task_index:
            if tm.task_index[m].kind.name != "TAG":
                out[m] = task_version(m)
            out |= subtask_versions(m)
    return out


def _shipped() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _settings(eval_cfg) -> dict:
    """What of ``eval.tasks`` changes the numbers; refuses a job without task names."""
    cfg = eval_cfg.tasks
    if not cfg.names:
        raise ConfigError("metric 'tasks' needs eval.tasks.names, e.g. "
                          "eval.tasks.names=[ptq_gutenberg_cloze]; shipped offline: "
                          f"{_shipped()}")
    names = [str(n) for n in cfg.names]
    out = {"names": names, "versions": {n: task_version(n) for n in names},
           "num_fewshot": cfg.num_fewshot, "limit": cfg.limit}
    subtasks = {n: subtask_versions(n) for n in names}
    if any(subtasks.values()):   # only jobs that name a group or tag: other keys stay as they were
        out["subtask_versions"] = {n: v for n, v in subtasks.items() if v}
    return out


def run_tasks(model, tokenizer, cfg: TasksConfig) -> dict:
    """``lm_eval.simple_evaluate`` on an in-memory model; lm-eval's result dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(cfg.names), num_fewshot=cfg.num_fewshot,
                                   limit=cfg.limit, task_manager=task_manager())


def flatten(results: dict, names: list[str]) -> dict:
    """``task.<name>.<metric>`` fields (numbers only) of the asked tasks, and ``tasks_acc``."""
    out = {}
    for name in names:
        for key, value in results["results"][name].items():
            metric, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"task.{name}.{metric}"] = float(value)
        version = results.get("versions", {}).get(name)
        if isinstance(version, (int, float)):
            out[f"task.{name}.version"] = float(version)
    accs = [out[f"task.{n}.acc"] for n in names if f"task.{n}.acc" in out]
    out["tasks_acc"] = sum(accs) / len(accs) if accs else math.nan
    return out


@register_metric("tasks", higher_is_better=True, version=1, headline="tasks_acc",
                 settings=_settings, directions={"task.*.acc": True, "task.*.acc_norm": True})
def measure_tasks(ctx: MetricContext) -> dict:
    """lm-eval's accuracy (and stderr, version) on each task of ``eval.tasks.names``."""
    if ctx.tokenizer is None:
        raise RuntimeError(f"metric 'tasks' on {ctx.label}: the runner gave no tokenizer")
    names = [str(n) for n in ctx.eval.tasks.names]
    return flatten(run_tasks(ctx.model, ctx.tokenizer, ctx.eval.tasks), names)
