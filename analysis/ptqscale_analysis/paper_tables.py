"""The seed papers' tables: each paper study (sweeps/<study>.yaml) laid out as its paper lays
out its results, besides the standard report.

A :class:`PaperTable` says which records enter (``where``), what makes a row and a column
(frame columns) and what a cell holds; :data:`PAPER_TABLES` maps a study name to its tables.
This registry is the one place a table's shape lives; the sweep's header points here.

To add a paper's tables: a tuple of :class:`PaperTable` under the study's name in
:data:`PAPER_TABLES` (row labels the paper uses go in ``labels``), and a test on stand-in
records in tests/analysis/test_paper_tables.py.

Example::

    >>> frame = load_study("results", "crossquant2024")               # doctest: +SKIP
    >>> for title, table, notes in paper_tables(frame, "crossquant2024"):  # doctest: +SKIP
    ...     print(title); print(table)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ptqscale_analysis.errors import AnalysisError

# Derived columns the tables use (added by :func:`_derive`).
WA = "W/A"          # CrossQuant's weight/activation setting: W8A8, W4A8-g128, W4A4
SCHEME = "scheme"   # activation scheme as the paper names it: per-token, SmoothQuant, CrossQuant
BITS = "effective bits"  # per quantized weight: the method's own count (codebooks) or the format's


@dataclass(frozen=True)
class PaperTable:
    """One table: records ``where`` holds, one row per distinct ``rows`` value, one column
    per distinct ``columns`` value (joined with " / " when several), cells the mean of
    ``value``. With ``columns=()`` the cells are the ``values`` columns (one per feature;
    fnmatch patterns such as ``metrics.task.*.acc`` stand for every column they match).

    ``fp_column``: a first column "full precision" holding ``<value>_fp`` (the NLL or perplexity
    of the unquantized model), as papers put the fp16 baseline beside the formats; ``fp_row``:
    the same as a first row, for tables whose columns are the models.
    ``labels`` renames row values to the paper's names and orders the rows as listed.
    ``split``: one table per value of these columns (e.g. the format: a paper's table per bit
    width), the value in the title; the evaluation corpus always splits (NLLs of different
    corpora are never averaged).
    """

    title: str
    rows: tuple[str, ...]
    value: str = "metrics.perplexity"
    columns: tuple[str, ...] = ("model.name",)
    values: tuple[str, ...] = ()
    where: dict[str, tuple] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    fp_column: bool = False
    fp_row: bool = False
    split: tuple[str, ...] = ()
    digits: int = 2
    note: str = ""


BLOCKFT_LABELS = {"rtn": "RTN", "gptq": "GPTQ", "blockft_single": "single block",
                  "blockft_joint2": "2 blocks jointly", "blockft_joint3": "3 blocks jointly",
                  "blockft_down1": "1 block, error 1 block down",
                  "blockft_down2": "1 block, error 2 blocks down"}
# Headers as a reader of the paper expects them (frame column -> header).
HEADERS = {"model.name": "model", "method.name": "method", "format.name": "format",
           "params.total": "parameters", "metrics.nll_fp": "NLL (fp)", "landscape.kappa": "kappa",
           "landscape.s_star_db": "s* (dB)", "landscape.hessian_trace": "Hessian trace",
           "landscape.top_eigenvalue": "top eigenvalue"}
# CrossQuant's order of settings and schemes (labels as they are: the order is the point).
CROSSQUANT_ORDER = {v: v for v in ("W8A8", "W4A8-g128", "W4A4", "per-token", "SmoothQuant",
                                   "CrossQuant (alpha=0.15)")}
XU_FEATURES = ("params.total", "metrics.nll_fp", "landscape.kappa", "landscape.s_star_db",
               "landscape.hessian_trace", "landscape.top_eigenvalue")

PAPER_TABLES: dict[str, tuple[PaperTable, ...]] = {
    "xu2024": (
        PaperTable("NLL (nats) after RTN: model x format", rows=("model.name",),
                   columns=("format.name",), value="metrics.nll", where={"method.name": ("rtn",)},
                   fp_column=True, digits=4),
        PaperTable("NLL (nats) after GPTQ: model x format", rows=("model.name",),
                   columns=("format.name",), value="metrics.nll",
                   where={"method.name": ("gptq",)}, fp_column=True, digits=4),
        PaperTable("dNLL (nats) over full precision: model and method x format",
                   rows=("model.name", "method.name"), columns=("format.name",), value="dnll",
                   labels={"rtn": "RTN", "gptq": "GPTQ"}, digits=4,
                   note="GPTQ's gain over RTN is the difference of a model's two rows."),
        PaperTable("Weight SQNR (dB) after RTN: model x format (the format's noise, a predictor "
                   "feature)", rows=("model.name",), columns=("format.name",),
                   value="metrics.weight_sqnr_db", where={"method.name": ("rtn",)}, digits=1),
        PaperTable("Scaling factors per model: size, pre-trained NLL, local loss landscape",
                   rows=("model.name",), columns=(), values=XU_FEATURES, digits=4,
                   note="kappa: small-noise curvature (dNLL ~ kappa 10^(-SQNR/10)); s*: SQNR "
                        "(dB) of the basin edge; Hessian trace and top eigenvalue of the loss "
                        "w.r.t. the quantized weights (docs/landscape.md)."),
    ),
    "shabanovi2024": (
        PaperTable("Perplexity: block fine-tuning variant x model", rows=("method.name",),
                   split=("format.name",), labels=BLOCKFT_LABELS),
        PaperTable("Quantization time (s): block fine-tuning variant x model",
                   rows=("method.name",), split=("format.name",),
                   value="quantization.cost.seconds", labels=BLOCKFT_LABELS, digits=1,
                   note="Wall-clock seconds of the method (records: quantization.cost, with "
                        "the peak memory)."),
    ),
    "crossquant2024": (
        PaperTable("Perplexity: W/A setting and activation scheme x model",
                   rows=(WA, SCHEME), labels=CROSSQUANT_ORDER, fp_row=True),
        PaperTable("Zero-shot accuracy (mean over the tasks asked): W/A setting and scheme x "
                   "model", rows=(WA, SCHEME), value="metrics.tasks_acc", labels=CROSSQUANT_ORDER,
                   digits=4),
        PaperTable("Zero-shot accuracy per task: model, W/A setting and scheme x task",
                   rows=("model.name", WA, SCHEME), columns=(), values=("metrics.task.*.acc",),
                   labels=CROSSQUANT_ORDER, digits=4,
                   note="The tasks metric runs on quantized models only: no full-precision row."),
        PaperTable("Quantization-kernel proportion (activations rounded to zero)",
                   rows=(WA, SCHEME), value="quantization.activations.kernel_proportion",
                   labels=CROSSQUANT_ORDER, digits=4),
    ),
    "athena2024": (
        PaperTable("Perplexity: method x model", rows=("method.name",), split=("format.name",),
                   labels={"rtn": "RTN", "gptq": "GPTQ", "athena": "Athena"}),
        PaperTable("Effective bits per weight (scales, codebooks, low-rank factors counted)",
                   rows=("method.name",), split=("format.name",), value=BITS,
                   labels={"rtn": "RTN", "gptq": "GPTQ", "athena": "Athena"}, digits=3),
    ),
}


def paper_tables(frame: pd.DataFrame, name: str) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """``(title, table, notes)`` for each table of ``name``, each evaluation corpus and each
    value of the table's ``split`` columns.

    NLLs of different corpora are never averaged: a study on several (``data.name``) gets
    each table once per corpus, the corpus in its title. A table whose value no record holds
    (task accuracy of a study run without ``tasks``) is None with a note saying so; cells are
    formatted strings ("-": no record). Raises :class:`AnalysisError` for a name without tables.
    """
    if name not in PAPER_TABLES:
        raise AnalysisError(f"no paper tables named {name!r}; have {sorted(PAPER_TABLES)} "
                            "(analysis/ptqscale_analysis/paper_tables.py)")
    df = _derive(frame[~frame["is_baseline"]])   # the fp values come with each record
    several = "data.name" in df and df["data.name"].nunique() > 1
    out = []
    for spec in PAPER_TABLES[name]:
        by = [c for c in (("data.name",) if several else ()) + spec.split if c in df]
        parts = _split(df, by) if by else [((), df)]
        for values, part in parts:
            table, notes = render(part, spec)
            suffix = f" ({', '.join(map(str, values))})" if values else ""
            out.append((spec.title + suffix, table, notes))
    return out


def _split(df: pd.DataFrame, by: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """The parts of ``df`` per value of ``by``, in the tables' order (formats by bits)."""
    parts = [(k if isinstance(k, tuple) else (k,), part) for k, part in df.groupby(by)]
    keys = [_sort_key(df, c) for c in by]
    return sorted(parts, key=lambda kp: tuple(f(v) for v, f in zip(kp[0], keys)))


def render(df: pd.DataFrame, spec: PaperTable) -> tuple[pd.DataFrame | None, list[str]]:
    """``spec`` laid out on the derived frame ``df`` (None when no record holds its value), and
    the notes to print under it."""
    rows = df[~df["is_baseline"]]
    for col, allowed in spec.where.items():
        rows = rows[rows[col].isin(allowed)] if col in rows else rows.iloc[0:0]
    cells = [c for v in (spec.values or (spec.value,)) for c in rows.columns
             if fnmatch.fnmatchcase(c, v)]
    if rows.empty or not cells or rows[cells].isna().all().all():
        return None, [f"no record holds {spec.values or spec.value}"]
    notes = [spec.note] if spec.note else []
    per_cell = rows.groupby(list(spec.rows + spec.columns)).size().max()
    if per_cell > 1:   # e.g. a study run at two sequence lengths: say so, never hide it
        notes.append(f"some cells are the mean of {per_cell} records (they differ in "
                     "something that is neither a row nor a column of this table)")
    if spec.columns:
        table = rows.pivot_table(index=list(spec.rows), columns=list(spec.columns),
                                 values=spec.value, aggfunc="mean")
        table = table.reindex(columns=_order_columns(rows, spec.columns, table.columns))
        table.columns = [_flat(c) for c in table.columns]
    else:
        table = rows.groupby(list(spec.rows))[cells].agg(lambda v: pd.to_numeric(v).mean())
        table.columns = [_task_name(c) or c for c in cells]
    if spec.fp_column:
        fp = rows.groupby(list(spec.rows))[f"{spec.value}_fp"].mean()
        table.insert(0, "full precision", fp.reindex(table.index))
    table = table.reindex(_order_rows(rows, spec, table.index))
    if spec.fp_row:
        fp = rows.groupby(list(spec.columns))[f"{spec.value}_fp"].mean()
        fp.index = [_flat(c) for c in fp.index]
        label = ("full precision",) + ("",) * (len(spec.rows) - 1)
        first = pd.DataFrame([fp.reindex(table.columns).to_numpy()], columns=table.columns,
                             index=pd.MultiIndex.from_tuples([label], names=table.index.names)
                             if len(spec.rows) > 1 else pd.Index(label, name=spec.rows[0]))
        table = pd.concat([first, table])
    table = table.map(lambda v: _cell(v, spec.digits))
    table = table.reset_index()
    for col in spec.rows:
        table[col] = table[col].map(lambda v: spec.labels.get(v, v))
    return table.rename(columns=HEADERS), notes


def _flat(column) -> str:
    """A column header of several values: ``("opt-125m", "int3_g128")`` -> "opt-125m / int3_g128"."""
    return " / ".join(map(str, column)) if isinstance(column, tuple) else str(column)


def _task_name(column: str) -> str | None:
    """``metrics.task.piqa.acc`` -> ``piqa`` (a task's column header is its name)."""
    m = re.fullmatch(r"metrics\.task\.(.+)\.acc", column)
    return m[1] if m else None


def _cell(v, digits: int) -> str:
    """A number as the paper prints it: fixed digits; counts (>= 1e5) in 4 significant ones."""
    if pd.isna(v):
        return "-"
    return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.{digits}f}"


def _derive(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the tables name that a record does not hold as such."""
    df = frame.copy()
    if "metrics.perplexity" not in df:
        df["metrics.perplexity"] = np.exp(df["metrics.nll"])
        df["metrics.perplexity_fp"] = np.exp(df["metrics.nll_fp"])
    method_bits = df.get("quantization.bits_per_weight", pd.Series(np.nan, index=df.index))
    df[BITS] = pd.to_numeric(method_bits, errors="coerce").fillna(df["bits_per_weight"])
    act = df.get("method.activations.format")
    if act is not None:
        df[WA] = [_wa_label(w, a) for w, a in zip(df["format.name"], act)]
        df[SCHEME] = [_scheme_label(r) for r in df.to_dict("records")]
    return df


def _wa_label(weights: str, acts) -> str:
    """int4_g128 + int8 -> 'W4A8-g128' (the CrossQuant paper's names); other formats as named."""
    w = re.fullmatch(r"int(\d)(?:_g(\d+))?", str(weights))
    a = re.fullmatch(r"int(\d)", str(acts))
    if not (w and a):
        return f"{weights} / {acts}"
    return f"W{w[1]}A{a[1]}" + (f"-g{w[2]}" if w[2] else "")


def _scheme_label(r: dict) -> str:
    gran = r.get("method.activations.granularity")
    if r.get("method.name") == "smoothquant":
        return "SmoothQuant"
    if gran == "crossquant":
        return f"CrossQuant (alpha={r.get('method.activations.alpha'):g})"
    return {"per_token": "per-token"}.get(gran, f"{r.get('method.name')} {gran}")


def _order_rows(rows: pd.DataFrame, spec: PaperTable, index: pd.Index) -> list:
    """Rows in the paper's order: labelled values as listed, models by family and size."""
    keys = [_sort_key(rows, col) for col in spec.rows]
    labelled = list(spec.labels)

    def key(item):
        item = item if isinstance(item, tuple) else (item,)
        return tuple((labelled.index(v) if v in labelled else len(labelled), k(v))
                     for v, k in zip(item, keys))
    return sorted(index, key=key)


def _order_columns(rows: pd.DataFrame, cols: tuple[str, ...], index: pd.Index) -> list:
    keys = [_sort_key(rows, col) for col in cols]
    return sorted(index, key=lambda c: tuple(k(v) for v, k in zip(
        c if isinstance(c, tuple) else (c,), keys)))


def _sort_key(rows: pd.DataFrame, col: str):
    """Models by (family, parameters); formats by decreasing effective bits; else by name."""
    if col == "model.name":
        first = rows.drop_duplicates(col).set_index(col)
        return lambda v: (str(first.at[v, "model.family"]), float(first.at[v, "params.total"]))
    if col == "format.name":
        bits = rows.groupby(col)["bits_per_weight"].first()
        return lambda v: (-float(bits.get(v, 0.0)), str(v))
    return lambda v: (0, str(v))
