"""Records -> a tidy DataFrame with the derived columns every analysis step uses.

Sources: the local store (:func:`load_study`, the source of truth) and a W&B project
through its public API (:func:`load_wandb`, the mirror). Both end in :func:`add_derived`.

Derived columns (names are part of this package's contract, see docs/analysis.md):

- ``dnll``                  ``metrics.nll - metrics.nll_fp`` (nats)
- ``bits_per_weight``       ``format.bits_per_weight`` (effective, scales included)
- ``params.quantized``      weights the methods quantize: the records' ``params.quantizable``
                            (older records: ``params.quantized``)
- ``params.non_quantized``  ``params.total - params.quantized``
- ``params.non_embedding``  ``params.total - params.embedding - params.head``
- ``model_bytes``           ``metrics.model_bytes`` when recorded, else quantized weights at
                            their effective bits plus every other parameter at 16 bits
- ``bits_per_param``        ``8 * model_bytes / params.total``
- ``rtn_sqnr_db``           weight SQNR of the RTN record of the same (model, format); the
                            format's mean over models where that record is missing
- ``is_baseline``           the unquantized reference rows (``format.family == 'baseline'`` or
                            ``method.name == 'none'``)
- ``activations``           ``none`` (weight-only) or the activation scheme, e.g.
                            ``int8 per_token`` or ``int8 crossquant a=0.15``

Every metric a job measured is a column ``metrics.<field>`` as the record holds it (the
store flattens records generically), and its version and direction are the columns
``metric_info.<metric>.*``; :func:`higher_is_better` reads the direction.

Targets (:func:`add_target`): what the laws and the predictor model is the damage that
quantization did to one measured quantity, positive when worse: ``dnll`` (the default), or
for any ``metrics.<field>`` its value minus the full-precision value of the same model and
corpus (the study's ``method=none`` row), sign-flipped where larger is better, e.g.
``target=task.ptq_gutenberg_cloze.acc`` (accuracy lost) or ``target=kl_mean``.

Example::

    >>> frame = load_study("results", "quickstart")              # doctest: +SKIP
    >>> frame.groupby("format.name")["dnll"].mean()              # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ptqscale.store import read_records
from ptqscale_analysis.errors import AnalysisError

# Columns every analysis step needs; a record set without them cannot be analysed.
REQUIRED_COLUMNS = (
    "model.name", "model.family", "model.size", "format.name", "format.bits_per_weight",
    "method.name", "metrics.nll", "metrics.nll_fp", "params.total",
)


def load_study(root: str | os.PathLike, study: str) -> pd.DataFrame:
    """The complete records of ``study`` under ``root`` with derived columns.

    Raises :class:`AnalysisError` for a missing folder or a study without complete records.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnalysisError(f"results folder not found: {root}")
    frame = read_records(root, study)
    if frame.empty:
        present = list_studies(root)
        failed = len(read_records(root, study, status=None))
        why = f" ({failed} failed records)" if failed else ""
        raise AnalysisError(
            f"no complete records for study {study!r} under {root}{why}; "
            f"studies with records: {present or 'none (the store is empty)'}")
    return add_derived(frame)


def list_studies(root: str | os.PathLike) -> list[str]:
    """Names of the studies under ``root`` that hold at least one record file."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if (p / "records").is_dir() and any((p / "records").glob("*.json")))


def add_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with the derived columns listed in the module docstring."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise AnalysisError(f"records lack the columns {missing}; every complete record needs "
                            f"{list(REQUIRED_COLUMNS)} (see docs/records.md)")
    df = frame.copy()
    for col in ("metrics.nll", "metrics.nll_fp", "format.bits_per_weight", "params.total"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["dnll"] = df["metrics.nll"] - df["metrics.nll_fp"]
    df["bits_per_weight"] = df["format.bits_per_weight"]
    df["is_baseline"] = (df["method.name"] == "none") | (df.get("format.family") == "baseline")
    _add_param_splits(df)
    df["model_bytes"] = _model_bytes(df)
    df["bits_per_param"] = 8.0 * df["model_bytes"] / df["params.total"]
    df["rtn_sqnr_db"] = _rtn_sqnr(df)
    df["activations"] = activation_scheme(df)
    return df


def higher_is_better(frame: pd.DataFrame, column: str) -> bool:
    """Whether larger values of ``column`` are better, as the records' ``metric_info`` declares
    it (:func:`declared_direction`; ``metrics.weight_sqnr_db`` -> True).

    Columns no record declares (derived ones such as ``dnll``, records that predate
    ``metric_info``) are losses: smaller is better. Every metric a job measured is a
    ``metrics.<field>`` column of the frame, whatever its name; nothing here lists them.
    """
    declared = declared_direction(frame, column)
    return False if declared is None else declared


def metric_of(frame: pd.DataFrame, column: str) -> str | None:
    """The metric whose ``metric_info`` declares ``metrics.<field>`` (its ``directions`` or its
    headline), e.g. ``tasks`` for ``metrics.task.ptq_gutenberg_cloze.acc``; None if none does."""
    field = column[len("metrics."):] if column.startswith("metrics.") else column
    for col in frame.columns:
        head, _, pattern = col.partition(".directions.")
        if col.startswith("metric_info.") and pattern and fnmatch.fnmatchcase(field, pattern):
            return head[len("metric_info."):]
    for col in frame.columns:
        if col.startswith("metric_info.") and col.endswith(".headline") and (
                frame[col] == field).any():
            return col[len("metric_info."): -len(".headline")]
    return None


def declared_direction(frame: pd.DataFrame, column: str) -> bool | None:
    """Whether larger ``metrics.<field>`` is better, as ``metric_info`` declares it: the
    field's own entry in ``metric_info.<metric>.directions`` (fnmatch patterns, e.g.
    ``task.*.acc``), else the direction of the metric whose headline the field is; None
    where no record says."""
    if not column.startswith("metrics."):
        return None
    field = column[len("metrics."):]
    flags: set[bool] = set()
    for col in frame.columns:
        head, _, pattern = col.partition(".directions.")
        if col.startswith("metric_info.") and pattern and fnmatch.fnmatchcase(field, pattern):
            flags |= {bool(v) for v in frame[col].dropna()}
    if not flags:
        for col in frame.columns:
            if col.startswith("metric_info.") and col.endswith(".headline"):
                rows = frame[col] == field
                flag_col = col[: -len("headline")] + "higher_is_better"
                if rows.any() and flag_col in frame:
                    flags |= {bool(v) for v in frame.loc[rows, flag_col].dropna()}
    if len(flags) > 1:
        raise AnalysisError(f"the records disagree on whether higher {column} is better")
    return flags.pop() if flags else None


@dataclass(frozen=True)
class Target:
    """What a fit or the predictor models: ``column`` (damage, > 0 when worse than full
    precision) of the measured ``source`` column, whose full-precision value is ``fp``."""

    name: str
    column: str
    source: str
    fp: str
    higher_is_better: bool

    @property
    def label(self) -> str:
        what = "lost" if self.higher_is_better else "added"
        return "dNLL" if self.name == "dnll" else f"{self.source[len('metrics.'):]} {what}"


def add_target(frame: pd.DataFrame, target: str = "dnll") -> tuple[pd.DataFrame, Target]:
    """``frame`` with the target's damage and full-precision columns, and the :class:`Target`.

    ``target``: ``dnll`` (also ``nll``), or a measured field with or without ``metrics.``
    (``kl_mean``, ``task.ptq_gutenberg_cloze.acc``). Its full-precision value is that of the
    unquantized (``method=none``, weight-only) rows of the same model and corpus (and the
    same metric settings); rows of a model without one get no damage (NaN).
    """
    if target in ("dnll", "nll", "metrics.nll"):
        return frame, Target("dnll", "dnll", "metrics.nll", "metrics.nll_fp", False)
    source = target if target.startswith("metrics.") else f"metrics.{target}"
    values = pd.to_numeric(frame[source], errors="coerce") if source in frame else None
    if values is None or values.isna().all():
        raise AnalysisError(f"target {target!r}: no record measured {source}; targets: dnll or "
                            f"a measured field with a direction: {target_fields(frame)}")
    higher = declared_direction(frame, source)
    if higher is None:
        raise AnalysisError(f"target {target!r}: the records' metric_info does not say whether "
                            f"higher {source} is better (records written before directions "
                            "were recorded); re-run the jobs or pick a metric's headline")
    name = source[len("metrics."):]
    target = Target(name, f"damage.{name}", source, f"fp.{name}", higher)
    if target.column in frame:   # added before (rows without their baseline may follow)
        return frame, target
    df = frame.copy()
    df[source] = values
    keys = [c for c in ("model.name", "data.name") if c in df]
    keys += sorted(c for c in df.columns if c.startswith("metric_info.") and ".settings." in c)
    keyed = pd.Series(["|".join(map(str, k)) for k in df[keys].itertuples(index=False)],
                      index=df.index)
    base = df["is_baseline"] & (df["activations"] == "none")
    fp = values[base].groupby(keyed[base]).mean()
    df[f"fp.{name}"] = keyed.map(fp).astype(float)
    sign = -1.0 if higher else 1.0
    df[target.column] = sign * (values - df[target.fp])
    return df, target


def target_fields(frame: pd.DataFrame) -> list[str]:
    """The measured fields (``metrics.`` left out) that can be a target or a query's quantity:
    numeric in some record and with a direction the records declare (so not a standard error,
    a token count or a task version)."""
    return sorted(c[len("metrics."):] for c in frame.columns if c.startswith("metrics.")
                  and pd.to_numeric(frame[c], errors="coerce").notna().any()
                  and declared_direction(frame, c) is not None)


def activation_scheme(df: pd.DataFrame) -> pd.Series:
    """Per row ``none`` (activations in full precision) or ``<format> <granularity>``, with
    CrossQuant's alpha (``int8 crossquant a=0.15``): NLLs of different schemes never mix."""
    none = pd.Series("none", index=df.index)
    if "method.activations.granularity" not in df:
        return none
    gran = df["method.activations.granularity"]
    act = gran.notna()
    fmt = df.get("method.activations.format", pd.Series("", index=df.index)).astype(str)
    label = fmt + " " + gran.astype(str)
    if "method.activations.alpha" in df:
        alpha = " a=" + df["method.activations.alpha"].astype(str)
        label = label + alpha.where(gran == "crossquant", "")
    return label.where(act, none)


def weight_only(frame: pd.DataFrame) -> pd.DataFrame:
    """The records whose activations stay in full precision (what the laws describe)."""
    return frame[frame["activations"] == "none"]


def _add_param_splits(df: pd.DataFrame) -> None:
    # The runner records the count of the methods' target weights as params.quantizable;
    # early records (and docs) called it params.quantized. Never fall back to params.total:
    # that would count the embedding as quantized.
    if "params.quantizable" in df:
        legacy = df["params.quantized"] if "params.quantized" in df else np.nan
        df["params.quantized"] = pd.to_numeric(df["params.quantizable"]).fillna(legacy)
    quantized = df.get("params.quantized")
    if quantized is not None:
        df["params.non_quantized"] = df["params.total"] - quantized
    if "params.embedding" in df and "params.head" in df:
        df["params.non_embedding"] = df["params.total"] - df["params.embedding"] - df["params.head"]


def _model_bytes(df: pd.DataFrame) -> pd.Series:
    # Quantized weights at their effective bits, everything else at 16 bits: the rule the
    # runner uses for metrics.model_bytes, applied where an older record lacks the field.
    if "params.quantized" in df:
        quantized = df["params.quantized"].fillna(0)
    else:
        quantized = pd.Series(0.0, index=df.index)
    computed = quantized * df["bits_per_weight"] / 8.0 + (df["params.total"] - quantized) * 2.0
    recorded = df["metrics.model_bytes"] if "metrics.model_bytes" in df else np.nan
    return pd.Series(recorded, index=df.index, dtype=float).fillna(computed)


def _rtn_sqnr(df: pd.DataFrame) -> pd.Series:
    """RTN weight SQNR per (model, format): the format descriptor GPTQ rows share with RTN."""
    if "metrics.weight_sqnr_db" not in df:
        return pd.Series(np.nan, index=df.index)
    rtn = df[df["method.name"] == "rtn"]
    by_pair = rtn.groupby(["model.name", "format.name"])["metrics.weight_sqnr_db"].mean()
    by_format = rtn.groupby("format.name")["metrics.weight_sqnr_db"].mean()
    pair = pd.MultiIndex.from_frame(df[["model.name", "format.name"]])
    out = pd.Series(by_pair.reindex(pair).to_numpy(), index=df.index)
    return out.fillna(df["format.name"].map(by_format))


def load_wandb(project: str, study: str | None = None, api=None) -> pd.DataFrame:
    """Records mirrored to the W&B ``project`` ("entity/project"), with derived columns.

    Each run's ``config`` and ``summary`` are flattened to dotted columns ("/" and nested
    dicts both become "."), the summary winning on a clash; ``study`` keeps one study.
    ``api`` defaults to ``wandb.Api()`` (needs network and, for private projects, a key).
    """
    if api is None:
        try:
            import wandb

            api = wandb.Api()
        except Exception as e:  # no network, no key, or wandb missing: say so plainly
            raise AnalysisError(f"W&B is not reachable ({type(e).__name__}: {e}); "
                                "read the local store with load_study instead") from e
    # filtered on the server: only this study's runs travel (and never the report run)
    filters = {"config.study": study} if study is not None else {}
    filters["jobType"] = {"$ne": "report"}
    rows = [_wandb_row(run) for run in api.runs(project, filters=filters)]
    frame = pd.DataFrame(rows)
    if not frame.empty and study is not None:
        frame = frame[frame.get("study") == study]
    if not frame.empty and "status" in frame:
        frame = frame[frame["status"] == "complete"]
    if frame.empty:
        what = f"study {study!r} in " if study else ""
        raise AnalysisError(f"no complete records for {what}W&B project {project!r}")
    return add_derived(frame.reset_index(drop=True))


def _wandb_row(run) -> dict:
    row: dict = {}
    for source in (dict(run.config), dict(run.summary)):
        _flatten_into(row, "", source)
    row.setdefault("wandb.run_id", getattr(run, "id", None))
    return row


def _flatten_into(out: dict, prefix: str, node: dict) -> None:
    for key, value in node.items():
        if str(key).startswith("_"):  # W&B internals (_step, _runtime, _wandb)
            continue
        name = f"{prefix}{str(key).replace('/', '.')}"
        if isinstance(value, dict):
            _flatten_into(out, f"{name}.", value)
        else:
            out[name] = value
