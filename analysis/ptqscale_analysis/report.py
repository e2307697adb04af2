"""A Markdown and an HTML report of one study: laws, predictor, Pareto frontier, figures.

A section that cannot be computed for this study (one size: no size law; one family: no
leave-one-family-out) is replaced by a note saying why, so the report renders for any
study with at least one complete record.

Example::

    >>> write_report("results", "quickstart", "results/quickstart/report")   # doctest: +SKIP
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ptqscale_analysis import plots
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import add_target, load_study, weight_only
from ptqscale_analysis.paper_tables import PAPER_TABLES, paper_tables
from ptqscale_analysis.predictor import PredictorConfig, cross_validate, train_predictor
from ptqscale_analysis.queries import pareto_frontier, setting_columns, split, split_label
from ptqscale_analysis.study_fits import StudyFitConfig, fit_study_laws


@dataclass(frozen=True)
class ReportConfig:
    fit: StudyFitConfig = field(default_factory=StudyFitConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)


class _Doc:
    """Blocks rendered twice: to Markdown and to HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def items(self, items: list[str]):
        if items:
            self.blocks.append(("list", items))

    def table(self, df: pd.DataFrame):
        self.blocks.append(("table", df))

    def img(self, rel: str, caption: str):
        self.blocks.append(("img", rel, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "list":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                out.append(markdown_table(b[1]))
            else:
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
               "</title><style>body{font-family:sans-serif;max-width:70em;margin:auto}"
               "table{border-collapse:collapse;font-size:small}td,th{border:1px solid #ccc;"
               "padding:2px 6px}td:first-child{white-space:nowrap}img{max-width:100%}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "list":
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                df = b[1].copy()
                df.columns.name = None  # a pivot's column-axis name: an empty header cell
                out.append(df.to_html(index=False, float_format=_fmt, border=0))
            else:
                out.append(f"<figure><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'>"
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        return "\n".join(out) + "\n</body></html>\n"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (floats to 4 significant digits)."""
    def cell(v) -> str:
        return _fmt(v) if isinstance(v, float) else str(v).replace("|", "\\|")
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def write_report(root: str | os.PathLike, study: str, out_dir: str | os.PathLike,
                 cfg: ReportConfig | None = None, tables: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    ``tables``: the paper whose tables (paper_tables.PAPER_TABLES) lead the report, also
    written as ``tables/<n>.csv``; default: the study's own name when it has tables."""
    cfg = cfg or ReportConfig()
    if tables is not None and tables not in PAPER_TABLES:
        raise AnalysisError(f"--tables {tables!r}: no such paper tables; have "
                            f"{sorted(PAPER_TABLES)}")
    frame = load_study(root, study)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    doc = _Doc()
    doc.h(1, f"PTQ scaling report: {study}")
    _findings(doc, Path(root) / study / "findings.md")
    _paper_tables(doc, frame, tables or (study if study in PAPER_TABLES else None), out)
    _summary(doc, frame)
    _accuracy_and_fidelity(doc, frame)
    _activation_schemes(doc, frame, out)
    weights = weight_only(frame)
    if weights.empty:
        doc.p(f"Every one of the {len(frame)} records quantizes activations too, so the "
              "weight-only laws, predictor and Pareto frontier do not apply; the activation "
              "figures and tables above are this study's results.")
        return _write(doc, out, study)
    if len(weights) < len(frame):  # laws, predictor, frontier: weights only
        doc.p(f"Laws, predictor, Pareto frontier and the figures below use the {len(weights)} "
              f"records whose activations stay in full precision; "
              f"{len(frame) - len(weights)} records quantize activations too.")
        frame = weights
    fits = _laws(doc, frame, cfg, out)
    _predictor(doc, frame, cfg, out)
    _pareto(doc, frame, out)
    if cfg.fit.target != "dnll":
        _pareto_target(doc, frame, cfg.fit.target)
    doc.h(2, "Figures")
    _figure(doc, out, "nll_vs_params", "NLL vs parameters per corpus and family, faceted by "
            "format family (black: full precision)", plots.plot_nll_vs_params, frame)
    _figure(doc, out, "dnll_vs_params", "dNLL vs parameters (log scale)",
            plots.plot_nll_vs_params, frame, "params.total", "dnll")
    _figure(doc, out, "dnll_vs_sqnr", "dNLL vs weight SQNR per size, with the noise law",
            plots.plot_dnll_vs_sqnr, frame, fits, cfg.fit.size_column)
    _figure(doc, out, "noise_response", "noise-response curves", plots.plot_noise_response,
            frame)
    return _write(doc, out, study)


def _write(doc: _Doc, out: Path, study: str) -> Path:
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"PTQ scaling report: {study}"))
    return out / "report.md"


def _findings(doc: _Doc, path: Path) -> None:
    """The study's written conclusions (``<study>/findings.md``, kept beside its records).

    Only headings (``## ``), bullet lists (``- ``), pipe tables and paragraphs are understood,
    so the same text renders in the Markdown and the HTML report.
    """
    if not path.is_file():
        return
    for block in path.read_text().strip().split("\n\n"):
        lines = block.strip().splitlines()
        if lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            doc.h(level, lines[0].lstrip("# ").strip())
            lines = lines[1:]
        if lines and all(line.startswith("|") for line in lines):
            doc.table(_pipe_table(lines))
        elif lines and all(line.startswith(("- ", "  ")) for line in lines):
            items = []
            for line in lines:
                if line.startswith("- "):
                    items.append(line[2:].strip())
                else:
                    items[-1] += " " + line.strip()
            doc.items(items)
        elif lines:
            doc.p(" ".join(line.strip() for line in lines))


def _pipe_table(lines: list[str]) -> pd.DataFrame:
    """A Markdown pipe table (header, rule, rows) as a frame of its cell texts."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return pd.DataFrame(rows[2:], columns=rows[0])


def _paper_tables(doc: _Doc, frame: pd.DataFrame, name: str | None, out: Path) -> None:
    """The paper's own tables (rows and columns as the paper has them), before the rest."""
    if name is None:
        return
    doc.h(2, f"Paper tables ({name})")
    paths = frame.get("model.path", pd.Series("", index=frame.index)).astype(str)
    if paths.str.startswith("stand-in:").any():
        doc.p("Stand-in records (model.stand_in=true): tiny random models of each member's "
              "architecture, a plumbing check; their numbers mean nothing about the real "
              "models.")
    (out / "tables").mkdir(exist_ok=True)
    for i, (title, table, notes) in enumerate(paper_tables(frame, name), 1):
        doc.h(3, f"Table {i}. {title}")
        if table is not None:
            doc.table(table)
            table.to_csv(out / "tables" / f"{i}.csv", index=False)
        doc.items(notes)


def _scheme(frame: pd.DataFrame) -> pd.Series:
    """The method, plus the activation scheme where activations are quantized
    (``rtn int8 crossquant a=0.15``)."""
    act = frame["activations"] != "none"
    return frame["method.name"].where(~act, frame["method.name"] + " " + frame["activations"])


def _summary(doc: _Doc, frame: pd.DataFrame) -> None:
    doc.h(2, "Study")
    frame = frame.assign(model=_checkpoint(frame))
    models = frame.drop_duplicates("model").sort_values(["model.family", "params.total", "model"])
    doc.items([f"{len(frame)} complete records",
               f"models: {', '.join(models['model'])}",
               f"formats: {', '.join(sorted(frame['format.name'].unique()))}",
               f"methods: {', '.join(sorted(frame['method.name'].unique()))}"])
    q = weight_only(frame[~frame["is_baseline"]])  # activation schemes: their own section
    by = [c for c in ("data.name", "method.name") if c in q]
    for key, rows in q.groupby(by, sort=True):
        pivot = rows.pivot_table(index="model", columns="format.name", values="dnll")
        pivot = pivot.reindex([m for m in models["model"] if m in pivot.index])
        doc.p(f"dNLL (nats) of every weight-only job, {', '.join(map(str, key))}:")
        doc.table(pivot.reset_index())
        se = pd.to_numeric(rows.get("metrics.dnll_se", pd.Series(dtype=float)), errors="coerce")
        if len(se) and se.notna().all():   # records from 2026-12-05 on
            resolved = int((rows["dnll"].abs() > 2 * se).sum())
            doc.p(f"Standard error of these dNLLs over the corpus (metrics.dnll_se): median "
                  f"{se.median():.2g} nats, {se.min():.2g} to {se.max():.2g}; {resolved} of "
                  f"{len(rows)} jobs differ from full precision by more than 2 SE.")


def _checkpoint(frame: pd.DataFrame) -> pd.Series:
    """The model name, with ``@revision`` where a study holds several checkpoints of one name
    (a training-length axis: ``zoo-opt-25k@x0.5``)."""
    name = frame["model.name"]
    if "model.revision" not in frame:
        return name
    rev = frame["model.revision"]
    several = rev.groupby(name).transform("nunique") > 1
    return name.where(~several, name + "@" + rev.astype(str))


FIDELITY_COLUMNS = {"metrics.kl_mean": "KL mean", "metrics.kl_p99": "KL p99",
                    "metrics.flip_rate": "flip rate"}


def accuracy_fidelity_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per job: each task's acc and acc_norm with their stderr (``0.412 ± 0.028``), KL to
    full precision (mean, p99) and flip rate; empty where no job measured tasks or fidelity."""
    tasks = sorted({c.split(".")[2] for c in frame.columns
                    if c.startswith("metrics.task.") and c.endswith(".acc")})
    kl = [c for c in FIDELITY_COLUMNS if c in frame and frame[c].notna().any()]
    if not tasks and not kl:
        return pd.DataFrame()
    keys = [c for c in ("data.name", "model.name", "format.name", "method.name") if c in frame]
    if "activations" in frame and frame["activations"].ne("none").any():
        keys.append("activations")  # W/A studies: two rtn rows differ by activation scheme
    rows = frame.sort_values([c for c in ("data.name", "params.total", "model.name",
                                          "format.name", "method.name", "activations")
                              if c in frame])
    table = rows[keys].rename(columns=lambda c: c.split(".")[0]).reset_index(drop=True)
    for task in tasks:
        for m in ("acc", "acc_norm"):
            col = f"metrics.task.{task}.{m}"
            if col not in rows:
                continue
            err = rows.get(f"{col}_stderr", pd.Series(float("nan"), index=rows.index))
            table[f"{task} {m}"] = [_pm(v, e) for v, e in zip(rows[col], err)]
    for col in kl:
        table[FIDELITY_COLUMNS[col]] = [f"{v:.4g}" if pd.notna(v) else "" for v in rows[col]]
    return table


def _pm(value, stderr) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.4f}" + ("" if pd.isna(stderr) else f" ± {stderr:.4f}")


def _accuracy_and_fidelity(doc: _Doc, frame: pd.DataFrame) -> None:
    """Task accuracy (lm-evaluation-harness, metric ``tasks``) and fidelity to the
    full-precision model (metric ``fidelity``) of every job that measured them."""
    table = accuracy_fidelity_table(frame)
    if table.empty:
        return
    doc.h(2, "Task accuracy and fidelity")
    versions = sorted({(c.split(".")[2], v) for c in frame.columns
                       if c.startswith("metrics.task.") and c.endswith(".version")
                       for v in frame[c].dropna().unique()})
    text = ("Accuracy: lm-evaluation-harness on the quantized model in memory (metric "
            "tasks), ± its standard error; KL(p_fp || p_q) in nats per token and the share "
            "of tokens whose top-1 prediction changed (metric fidelity).")
    if versions:
        text += " Task versions: " + ", ".join(f"{t} {v:g}" for t, v in versions) + "."
    doc.p(text)
    # one table per corpus, with only the tasks its jobs ran (each domain has its own tasks)
    parts = table.groupby("data", sort=False) if "data" in table else [(None, table)]
    for name, part in parts:
        if name is not None:
            doc.p(f"{name}:")
            part = part.drop(columns="data")
        doc.table(part.loc[:, [c for c in part if (part[c].astype(str) != "").any()]])


def _activation_schemes(doc: _Doc, frame: pd.DataFrame, out: Path) -> None:
    """Weight x activation studies (W8A8, W4A8, ...): NLL and quantization-kernel proportion
    per activation scheme (method, granularity, alpha), as in the CrossQuant paper's tables."""
    rows = frame[frame["activations"] != "none"].copy()
    if rows.empty:
        return
    models = rows.drop_duplicates("model.name")
    order = (models.sort_values("params.total") if "params.total" in models else models)["model.name"]
    rows["scheme"] = rows["method.name"] + "/" + rows["activations"].str.split(" ", n=1).str[1]
    rows["W/A"] = rows["format.name"] + " / " + rows["method.activations.format"]
    doc.h(2, "Activation quantization")
    _figure(doc, out, "activations_nll", "NLL per activation scheme (dashed: full precision)",
            plots.plot_activation_schemes, rows)
    _figure(doc, out, "activations_dnll", "dNLL per activation scheme (log scale)",
            plots.plot_activation_schemes, rows, "dnll")
    _figure(doc, out, "activations_kernel_proportion",
            "quantization-kernel proportion per activation scheme",
            plots.plot_activation_schemes, rows, "quantization.activations.kernel_proportion")
    index = [c for c in ("data.name", "model.name", "W/A") if c in rows]
    for value, label in (("metrics.nll", "NLL"),
                         ("quantization.activations.kernel_proportion",
                          "quantization-kernel proportion (activations rounded to zero)")):
        if value in rows:
            doc.p(f"{label} per weight / activation format and scheme:")
            table = rows.pivot_table(index=index, columns="scheme", values=value)
            table = table.reindex(order, level="model.name").map(lambda v: f"{v:.4f}")  # 1e-3 gaps
            doc.table(table.reset_index())


def _laws(doc: _Doc, frame: pd.DataFrame, cfg: ReportConfig, out: Path):
    doc.h(2, "Fitted laws")
    try:
        fits = fit_study_laws(frame, cfg.fit)
    except AnalysisError as e:
        doc.p(f"No law was fitted: {e}")
        return None
    doc.p(f"N = {cfg.fit.size_column}; Huber loss (delta {cfg.fit.fit.huber_delta:g}) on log "
          f"values, {cfg.fit.fit.n_boot} {cfg.fit.fit.bootstrap} bootstrap resamples, "
          f"{cfg.fit.fit.ci_level:.0%} intervals.")
    table = fits.table()
    if table.empty:
        doc.p("No law could be fitted for this study (see the notes).")
    else:
        formulas = {g.law: g.fit.formula for g in fits.fits}
        doc.items([f"{law}: {f}" for law, f in formulas.items()])
        doc.table(table)
        table.to_csv(out / "laws.csv", index=False)  # for the W&B study run and spreadsheets
    doc.items(fits.notes)
    return fits


def _predictor(doc: _Doc, frame: pd.DataFrame, cfg: ReportConfig, out: Path) -> None:
    doc.h(2, "Predictor (random forest)")
    try:
        pred = train_predictor(frame, cfg.predictor)
    except AnalysisError as e:
        doc.p(f"Not trained: {e}")
        return
    doc.p(f"Features used: {', '.join(pred.features)}. Dropped (missing in some rows): "
          f"{', '.join(pred.dropped) or 'none'}. Training records sha256 "
          f"{pred.records_sha256[:16]}.")
    doc.table(pred.importances().rename("importance").rename_axis("feature").reset_index())
    for scheme in ("size", "family"):
        try:
            cv = cross_validate(frame, scheme, cfg.predictor, cfg.fit)
        except AnalysisError as e:
            doc.p(f"Leave-one-{scheme}-out skipped: {e}")
            continue
        doc.h(3, f"Leave-one-{scheme}-out")
        doc.table(cv.metrics)
        doc.p("MAE of dNLL per held-out group:")
        doc.table(cv.per_group.reset_index())
        _figure(doc, out, f"predicted_vs_measured_{scheme}",
                f"predicted vs measured dNLL (leave-one-{scheme}-out)",
                plots.plot_predicted_vs_measured, cv.predictions)


def _pareto(doc: _Doc, frame: pd.DataFrame, out: Path) -> None:
    doc.h(2, "Pareto frontier (model bytes vs NLL, measured)")
    doc.p("One frontier per corpus and model family: NLLs of other corpora or tokenizers are "
          "not comparable. Bytes: quantized weights at their effective bits, the rest at 16 "
          "bits.")
    cols = ["model.name", "format.name", "method.name", "model_bytes", "metrics.nll"]
    for labels, part in split(frame):
        if labels:
            doc.h(3, split_label(labels))
        doc.table(pareto_frontier(part)[cols])
    _figure(doc, out, "pareto", "Pareto frontier per corpus and family", plots.plot_pareto,
            frame)


def _pareto_target(doc: _Doc, frame: pd.DataFrame, target: str) -> None:
    """The frontier on the report's target (``--target``), per group that measured it."""
    df, t = add_target(frame, target)
    doc.h(2, f"Pareto frontier (model bytes vs {t.name}, measured; "
             f"{'higher' if t.higher_is_better else 'lower'} is better)")
    cols = ["model.name", "format.name", "method.name", "model_bytes", t.source]
    for labels, part in split(df[df[t.source].notna()], setting_columns(df, t)):
        if labels:
            doc.h(3, split_label(labels))
        doc.table(pareto_frontier(part, y=t.source)[cols])


def _figure(doc: _Doc, out: Path, name: str, caption: str, fn, *args) -> None:
    try:
        fig = fn(*args)
    except AnalysisError as e:
        doc.p(f"Figure '{caption}' skipped: {e}")
        return
    rel = f"figures/{name}.png"
    fig.savefig(out / rel, dpi=100)
    plt.close(fig)
    _palette(out / rel)
    doc.img(rel, caption)


def _palette(path: Path) -> None:
    """Rewrite a figure as a 256-colour PNG: about a third of the bytes (a plot has few
    colours beyond antialiasing), so a study's report stays small enough to commit."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
