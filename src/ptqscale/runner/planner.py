"""Fast composition of a sweep's grid points: :class:`Planner` builds each job's
:class:`~ptqscale.runner.job.JobSpec` from cached parts instead of composing it.

A study can have 10^5 grid points and Hydra's compose takes ~0.1-0.5 s. The planner
composes once per distinct choice of config groups (``model=...``, ``method=...``), then
derives each job from plain value overrides (``format=int8``): each config node (model,
method, ...) is built and validated once per distinct value it takes in the sweep. A job
with any other kind of override (``+key=``, ``~key``, an interpolation) is composed the
slow, exact way. ``ptqscale-plan`` (runner/plan.py) adds the store's states.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from dataclasses import dataclass
from typing import Any

from hydra import compose as _hydra_compose
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ptqscale.errors import ConfigError
from ptqscale.runner.app import conf_dir

# The root nodes a job is made of (validate_job reads these and nothing else).
NODES = ("method", "model", "data", "eval", "calib", "wandb", "landscape", "study", "seed",
         "paths", "progress", "exclusive_gpu", "metrics")
_MISSING = object()
# What makes a grid point invalid (rather than a bug): reported, not raised.
INVALID = (ConfigError, ValueError, FileNotFoundError)


# The root config's name (ptqscale-plan -cn); "config" as in ptqscale-run.
_CONFIG_NAME = ["config"]


def compose(overrides: list[str], **kwargs: Any) -> Any:
    """Hydra's compose of the root config (the one -cn picked) with ``overrides``."""
    return _hydra_compose(_CONFIG_NAME[0], overrides=overrides, **kwargs)


@contextlib.contextmanager
def hydra_context(config_dir: str | None = None, config_name: str = "config"):
    """Hydra initialized as ``ptqscale-run`` initializes it: ptqscale's conf as the primary
    folder and ``config_dir`` (``-cd``) searched before it, exactly as Hydra's own
    ``--config-dir`` does."""
    search_path = create_config_search_path(conf_dir())
    if config_dir is not None:
        path = os.path.abspath(config_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--config-dir {path}: not a folder")
        search_path.prepend(provider="command-line", path=f"file://{path}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="ptqscale-plan", config_search_path=search_path)
    _CONFIG_NAME[0] = config_name
    try:
        yield
    finally:
        _CONFIG_NAME[0] = "config"
        GlobalHydra.instance().clear()


class Planner:
    """Plans grid points with one composition per distinct group choice.

    Must be used inside Hydra's ``initialize_config_dir`` (as ``ptqscale.runner.plan.plan`` does).
    ``planner.spec(overrides)`` is the :class:`~ptqscale.runner.job.JobSpec` that
    ``validate_job(compose(overrides))`` returns, built from cached parts.

    The first job's group choices are the reference composition. A job that differs in
    one group (``model=other``) takes the nodes that choice writes (its footprint, found
    by comparing the two compositions) from a composition that changes just that group; a
    node written by several of the job's changed groups, from one that changes just
    those. So there is one composition per distinct choice (or per combination of the
    choices that write the same node), not one per job.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, tuple] = {}
        self._composed: dict[tuple[str, ...], _Composed] = {}
        self._ref: _Composed | None = None
        self._nodes: dict[tuple, Any] = {}
        self._sources: dict[tuple, _Composed] = {}
        self._layouts: dict[tuple, _Job | None] = {}
        self._checked: set[tuple] = set()
        self._memo: dict[tuple, Any] = {}
        self._repo = GlobalHydra.instance().config_loader().repository

    def spec(self, job_overrides: list[str]) -> Any:
        """The validated job (raises what ``validate_job`` raises), composing only if needed."""
        split = self._split(job_overrides)
        if split is None:
            from ptqscale.runner.job import validate_job

            return validate_job(compose(overrides=job_overrides))
        return self._verified(job_overrides, self._spec(*split))

    # -- a job = group choices + plain value overrides ---------------------------------
    def _split(self, job: list[str]) -> tuple[_Job, tuple] | None:
        groups, names, values = [], [], []
        for text in job:
            kind = self._parsed.get(text) or self._classify(text)
            if kind[0] == "group":
                groups.append(text)
            elif kind[0] == "value":
                names.append(kind[1])
                values.append((kind[1], kind[2]))
            else:
                return None
        layout = self._layout(tuple(groups), tuple(names))
        return None if layout is None else (layout, tuple(values))

    def _layout(self, groups: tuple[str, ...], names: tuple[str, ...]) -> _Job | None:
        """Where each node of jobs of this shape comes from, and which overrides reach it."""
        if (groups, names) not in self._layouts:
            if self._ref is None:
                self._ref = self._composition(groups)
            job = None
            if all(k.split(".")[0] in self._ref.raw for k in names):  # else compose reports
                job = _Job(groups, self._changed(groups), {})
                for node in NODES:
                    source = self._source(job, node)
                    job.nodes[node] = (source, tuple(
                        i for i, k in enumerate(names) if source.affects(node, k)))
            self._layouts[groups, names] = job
        return self._layouts[groups, names]

    def _classify(self, text: str) -> tuple:
        """("group", key) | ("value", key, value) | ("other",), once per distinct string."""
        if text not in self._parsed:
            o = OverridesParser.create().parse_override(text)
            key = o.key_or_group
            if self._is_group(key):   # a group choice, into its package or elsewhere
                self._parsed[text] = ("group", f"{key}@{o.package}" if o.package else key)
            elif (o.is_add() or o.is_delete() or o.is_force_add() or o.package is not None
                  or o.is_sweep_override() or "${" in repr(o.value())):
                self._parsed[text] = ("other",)
            elif key == "hydra" or key.startswith("hydra."):
                self._parsed[text] = ("group", key)   # the launcher's business, not the job's
            else:
                self._parsed[text] = ("value", key, o.value())
        return self._parsed[text]

    def _is_group(self, key: str) -> bool:
        return self.memo(("group", key), lambda: self._repo.group_exists(key))

    def _changed(self, groups: list[str]) -> tuple[str, ...] | None:
        """The job's group overrides that differ from the reference (None: other groups)."""
        ref = {self._parsed[t][1]: t for t in self._ref.groups}
        mine = {self._parsed[t][1]: t for t in groups}
        if mine.keys() != ref.keys():
            return None
        return tuple(t for k, t in mine.items() if t != ref[k])

    def _composition(self, groups: tuple[str, ...]) -> _Composed:
        if groups not in self._composed:
            self._composed[groups] = _Composed(len(self._composed), groups)
        return self._composed[groups]

    def _variant(self, *texts: str) -> _Composed:
        """The reference with the group choices ``texts`` changed."""
        by_key = {self._parsed[t][1]: t for t in texts}
        return self._composition(tuple(by_key.get(self._parsed[t][1], t)
                                       for t in self._ref.groups))

    def _source(self, job: _Job, node: str) -> _Composed:
        """The composition to take ``node`` from (see the class docstring)."""
        if job.changed is None:
            return self._composition(job.groups)
        key = (job.changed, node)
        if key not in self._sources:
            touching = [t for t in job.changed if self._touches(t, node)]
            self._sources[key] = self._variant(*touching) if touching else self._ref
        return self._sources[key]

    def _touches(self, text: str, node: str) -> bool:
        def make() -> bool:
            variant = self._variant(text)
            footprint = variant.footprint(self._ref)
            deps = [self._ref.dependencies(node), variant.dependencies(node)]
            if None in deps:        # interpolations we do not follow: assume it does
                return True
            inputs = {node}.union(*deps)
            return any(_overlap(a, b) for a in inputs for b in footprint)
        return self.memo(("touches", text, node), make)

    # -- nodes, each built once per distinct value --------------------------------------
    def _node(self, job: _Job, values: tuple, name: str) -> Any:
        """Config node ``name`` with the overrides that reach it, as its typed object."""
        source, reach = job.nodes[name]
        relevant = tuple([values[i] for i in reach])
        cache_key = (source.index, name, relevant)
        try:
            value = self._nodes.get(cache_key, _MISSING)
        except TypeError:          # list values are not hashable
            cache_key = (source.index, name, repr(relevant))
            value = self._nodes.get(cache_key, _MISSING)
        if value is _MISSING:
            try:
                value = source.build(name, relevant)
            except INVALID as e:
                value = e
            self._nodes[cache_key] = value
        if isinstance(value, BaseException):
            raise value
        return value

    def _spec(self, job: _Job, values: tuple) -> Any:
        from ptqscale.runner.job import build_spec

        return build_spec(lambda name: self._node(job, values, name), self.memo)

    def _verified(self, job_overrides: list[str], spec: Any) -> Any:
        """``spec``, checked against composing the job once per method config class.

        The planner builds each node from a partial composition (see the class docstring);
        this check makes a config that this reasoning gets wrong an immediate error, not a
        wrong plan.
        """
        if type(spec.method) not in self._checked:
            from ptqscale.runner.job import validate_job

            expected = validate_job(compose(overrides=job_overrides))
            if expected != spec:
                diff = [f for f in spec.__dataclass_fields__
                        if getattr(spec, f) != getattr(expected, f)]
                raise RuntimeError(f"ptqscale-plan disagrees with validate_job on {diff} for "
                                   f"{job_overrides}: update runner/planner.py")
            self._checked.add(type(spec.method))
        return spec

    def memo(self, key: tuple, make) -> Any:
        """``make()`` once per key (the planner's jobs share it); an invalid result is remembered and raised again."""
        if key not in self._memo:
            try:
                self._memo[key] = make()
            except INVALID as e:
                self._memo[key] = e
        value = self._memo[key]
        if isinstance(value, BaseException):
            raise value
        return value


@dataclass
class _Job:
    """The shape shared by many jobs: group choices and the names of their value overrides."""

    groups: tuple[str, ...]
    changed: tuple[str, ...] | None     # group overrides unlike the reference's
    nodes: dict[str, tuple[_Composed, tuple[int, ...]]]   # node -> source, overrides reaching it


_REF = re.compile(r"\$\{([^}]*)\}")


class _Composed:
    """The config composed with one set of group choices, and what each node depends on."""

    def __init__(self, index: int, groups: tuple[str, ...]) -> None:
        self.index, self.groups = index, groups
        self.cfg = compose(overrides=list(groups))
        self.raw = OmegaConf.to_container(self.cfg, resolve=False)
        self._deps: dict[str, set[str] | None] = {}
        self._affects: dict[tuple[str, str], bool] = {}

    def footprint(self, other: _Composed) -> set[str]:
        """Root keys whose (unresolved) content differs from ``other``'s."""
        return {k for k in self.raw.keys() | other.raw.keys()
                if self.raw.get(k) != other.raw.get(k)}

    def affects(self, node: str, key: str) -> bool:
        """Whether overriding ``key`` can change node ``node`` (directly or by interpolation)."""
        if (node, key) not in self._affects:
            deps = self.dependencies(node)
            self._affects[node, key] = deps is None or any(
                _overlap(key, path) for path in (node, *deps))
        return self._affects[node, key]

    def build(self, node: str, overrides: tuple) -> Any:
        from ptqscale.runner.job import typed_node

        cfg = copy.deepcopy(self.cfg)
        for key, value in overrides:
            OmegaConf.update(cfg, key, value, merge=True)   # as Hydra applies a value override
        return typed_node(cfg, node)

    def dependencies(self, node: str) -> set[str] | None:
        """Paths the node's interpolations read, transitively; None if one is relative."""
        if node not in self._deps:
            self._deps[node] = self._follow(node)
        return self._deps[node]

    def _follow(self, node: str) -> set[str] | None:
        found: set[str] = set()
        todo = [self.raw.get(node)]
        while todo:
            refs = _refs(todo.pop())
            if refs is None:
                return None
            for ref in refs - found:
                found.add(ref)
                todo.append(_lookup(self.raw, ref))
        return found


def _refs(tree: Any) -> set[str] | None:
    """Absolute paths interpolated anywhere in ``tree``; resolvers (``${x:...}``) are constant
    within one plan and ignored. None when a relative interpolation (``${.x}``) appears."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list):
        out: set[str] = set()
        for item in tree:
            refs = _refs(item)
            if refs is None:
                return None
            out |= refs
        return out
    if not isinstance(tree, str):
        return set()
    refs = {r.strip() for r in _REF.findall(tree) if ":" not in r}
    return None if any(r.startswith(".") for r in refs) else refs


def _lookup(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _overlap(key: str, path: str) -> bool:
    return key == path or key.startswith(path + ".") or path.startswith(key + ".")
