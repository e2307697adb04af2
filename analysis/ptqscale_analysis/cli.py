"""Console scripts: ptqscale-fit, ptqscale-predict, ptqscale-pareto, ptqscale-report.

Every script takes ``--results DIR --study NAME``. Bad input ends with ``error: <why>`` on
stderr and exit status 2, never a traceback.

Example::

    $ ptqscale-fit --results results --study quickstart
    $ ptqscale-fit --results results --study awq_tasks --target task.ptq_gutenberg_cloze.acc
    $ ptqscale-fit --results results --study zoo_cross --lofo family    # issue 22's bar
    $ ptqscale-fit --results results --study zoo_depth --depth-law      # dNLL = f(N, D, bits)
    $ ptqscale-predict --results results --study quickstart --model zoo-16m \\
          --format mxfp4 --method gptq
    $ ptqscale-pareto --results results --study quickstart --budget 50MB
    $ ptqscale-pareto --results results --study awq_tasks --budget 2MB --target kl_mean
    $ ptqscale-report --results results --study quickstart
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import FitConfig
from ptqscale_analysis.load import load_study
from ptqscale_analysis.predictor import (
    Predictor,
    PredictorConfig,
    load,
    save,
    train_predictor,
)
from ptqscale_analysis.study_fits import StudyFitConfig, fit_study_laws


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--results", required=True, help="results root of the store")
    p.add_argument("--study", required=True, help="study name (the sweep file's name)")
    return p


def _predictor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor", type=Path, default=None,
                   help="saved predictor (JSON): refitted from the study's records and checked "
                        "if present, else trained and saved there; pickles are refused")
    p.add_argument("--n-estimators", type=int, default=PredictorConfig.n_estimators)
    p.add_argument("--seed", type=int, default=PredictorConfig.seed)


def _target_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--target", default="dnll",
                   help=help or "what the damage laws and the predictor model: dnll (default) "
                        "or any measured field, e.g. kl_mean, flip_rate, "
                        "task.ptq_gutenberg_cloze.acc (its loss against the model's "
                        "method=none record)")


def _split_args(p: argparse.ArgumentParser, axes=("data", "family", "activations")) -> None:
    helps = {"data": "evaluation corpus (data.name); default: each corpus of the study",
             "family": "model family, i.e. tokenizer (model.family); default: each",
             "activations": "activation scheme, e.g. 'none' or 'int8 per_token'; default: each"}
    for axis in axes:
        p.add_argument(f"--{axis}", default=None, help=helps[axis])


def _run(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    from ptqscale.errors import ConfigError
    from ptqscale.store import RecordSchemaError

    try:
        return main(argv)
    # ConfigError: a study name that is no name; RecordSchemaError: a record a newer
    # ptqscale wrote
    except (AnalysisError, ConfigError, RecordSchemaError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _get_predictor(args, frame: pd.DataFrame) -> Predictor:
    path: Path | None = args.predictor
    if path is not None and path.is_file():
        return load(path, frame)
    pred = train_predictor(frame, PredictorConfig(n_estimators=args.n_estimators, seed=args.seed,
                                                  target=getattr(args, "target", "dnll")))
    if path is not None:
        save(pred, path, frame)
        print(f"saved the predictor to {path} (records sha256 {pred.records_sha256[:12]})")
    return pred


# ---- ptqscale-fit -----------------------------------------------------------------------

def _fit(argv):
    p = _parser("ptqscale-fit", "Fit the scaling laws of a study and print them.")
    p.add_argument("--n-boot", type=int, default=FitConfig.n_boot, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=FitConfig.seed)
    p.add_argument("--size-column", default=StudyFitConfig.size_column)
    p.add_argument("--csv", type=Path, default=None, help="also write the table here")
    _target_arg(p)
    p.add_argument("--lofo", default=None, metavar="COLUMN",
                   help="instead of the laws: leave-one-out validation over this column "
                        "(family = model.family, size = model.size, or any column) of the "
                        "forest variants and the laws, with issue 22's pass flags")
    p.add_argument("--depth-law", action="store_true",
                   help="instead of the laws: fit dNLL = C N^-gN D^gD exp(-P/gP) over the "
                        "study's training lengths (model.revision x0.25..x4)")
    p.add_argument("--bootstrap", default="cases", choices=("cases", "residuals"),
                   help="resampling of the --depth-law intervals (default: cases)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="with --lofo or --depth-law: also write the table here as Markdown")
    p.add_argument("--data", default=None,
                   help="with --lofo or --depth-law: only this corpus's records (data.name)")
    p.add_argument("--fisher", type=Path, default=None,
                   help="with --lofo: a CSV of fisher_ratio by model.name, model.revision, "
                        "format.name (bench/zoo_fisher.py); scales the physics guess")
    args = p.parse_args(argv)
    if args.data is not None and not (args.lofo or args.depth_law):
        raise AnalysisError("--data applies to --lofo and --depth-law (the laws are fitted "
                            "per corpus already)")
    if args.fisher is not None and not args.lofo:
        raise AnalysisError("--fisher applies to --lofo")
    if args.fisher is not None and not args.fisher.is_file():
        raise AnalysisError(f"--fisher {args.fisher}: no such file")
    if args.lofo or args.depth_law:
        return _fit_transfer(args)
    cfg = StudyFitConfig(size_column=args.size_column,
                         fit=FitConfig(n_boot=args.n_boot, seed=args.seed), target=args.target)
    fits = fit_study_laws(load_study(args.results, args.study), cfg)
    if not fits.fits:
        raise AnalysisError("no law could be fitted for study "
                            f"{args.study!r}:\n  " + "\n  ".join(fits.notes))
    table = fits.table()
    label = fits.target.label
    if fits.target.name != "dnll":
        print(f"target: {label} ({fits.target.source} against the full-precision model's; "
              "dNLL in the formulas reads as this)")
    with pd.option_context("display.width", 160, "display.max_rows", None,
                           "display.float_format", "{:.4g}".format):
        for law, rows in table.groupby("law", sort=False):
            formula = next(g.fit.formula for g in fits.fits if g.law == law)
            print(f"\n{law}: {formula.replace('dNLL', label)}")
            print(rows.drop(columns="law").to_string(index=False))
    for note in fits.notes:
        print(f"note: {note}")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


def _fit_transfer(args) -> int:
    """ptqscale-fit --lofo / --depth-law (ptqscale_analysis.transfer, .depth_law)."""
    from ptqscale_analysis.depth_law import depth_slopes, depth_verdict, fit_depth_law
    from ptqscale_analysis.queries import select
    from ptqscale_analysis.transfer import lofo, markdown_table

    frame = select(load_study(args.results, args.study), data=args.data)
    if args.depth_law:
        fit = fit_depth_law(frame, FitConfig(n_boot=args.n_boot, seed=args.seed,
                                             bootstrap=args.bootstrap),
                            size_column=args.size_column)
        table = pd.DataFrame([{"param": k, "value": v, "ci_low": fit.ci[k][0],
                               "ci_high": fit.ci[k][1]} for k, v in fit.params.items()])
        text = (f"{fit.formula} ({fit.n} jobs, D as multiples of the base token count, "
                f"{'converged' if fit.converged else 'NOT converged'})\n"
                + table.to_string(index=False, float_format="{:.4g}".format)
                + f"\n{depth_verdict(fit)}")
        slopes = depth_slopes(frame)
        if len(slopes):
            text += (f"\nper-model slope of log dNLL over log D: median "
                     f"{slopes['slope'].median():.3f}, positive in "
                     f"{(slopes['slope'] > 0).sum()} of {len(slopes)}")
        md = text
    else:
        column = {"family": "model.family", "size": "model.size"}.get(args.lofo, args.lofo)
        fisher = None if args.fisher is None else pd.read_csv(args.fisher)
        res = lofo(frame, column, PredictorConfig(seed=args.seed), fisher=fisher)
        table = res.table
        text = table.to_string(index=False, float_format="{:.3g}".format)
        text += "\nforest+transfer importances: " + ", ".join(
            f"{k} {v:.3f}" for k, v in res.importances.head(6).items())
        md = markdown_table(table)
    print(text)
    for note in fit.notes if args.depth_law else []:
        print(f"note: {note}")
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.markdown:
        args.markdown.write_text(md + "\n")
    return 0


def fit_main(argv: list[str] | None = None) -> int:
    return _run(_fit, argv)


# ---- ptqscale-predict -------------------------------------------------------------------

def _key_values(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise AnalysisError(f"--feature takes KEY=NUMBER (e.g. landscape.kappa=0.3), "
                                f"got {pair!r}") from None
    return out


def _predict(argv):
    from ptqscale_analysis.queries import predict_nll, select, split

    p = _parser("ptqscale-predict", "Predict the NLL of a model in a format with a method.")
    p.add_argument("--format", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--model", default=None, help="a model of the study (its features come "
                                                 "from the store)")
    p.add_argument("--params", type=float, default=None, help="params.total of a new model")
    p.add_argument("--nll-fp", type=float, default=None, help="its full-precision NLL")
    p.add_argument("--feature", action="append", default=[], metavar="KEY=VALUE",
                   help="another model feature, e.g. landscape.kappa=0.3 (repeatable)")
    _split_args(p, ("data",))
    _predictor_args(p)
    _target_arg(p)
    args = p.parse_args(argv)
    if args.target != "dnll":
        return _predict_target(args)
    features = _key_values(args.feature)
    if args.params is not None:
        features["params.total"] = args.params
    if args.nll_fp is not None:
        features["metrics.nll_fp"] = args.nll_fp
    frame = load_study(args.results, args.study)
    pred = _get_predictor(args, frame)
    scope = select(frame, data=args.data)
    groups = [scope]
    if args.model is not None:  # one prediction per corpus the model was measured on
        rows = scope[(scope["model.name"] == args.model) & (scope["activations"] == "none")]
        groups = [part for _, part in split(rows)] if len(rows) else groups
    for part in groups:
        r = predict_nll(pred, part, args.format, args.method, model=args.model,
                        features=features)
        where = f" on {part['data.name'].iloc[0]}" if args.model and "data.name" in part else ""
        print(f"{r.model}{where} {r.format} {r.method}: NLL {r.nll:.4f} "
              f"[{r.nll_low:.4f}, {r.nll_high:.4f}] ({pred.cfg.interval:.0%} of trees), "
              f"dNLL {r.dnll:.4g}, full precision {r.nll_fp:.4f}")
        if r.measured_nll is not None:
            print(f"  measured{where}: {r.measured_nll:.4f}")
    print(f"features used: {', '.join(pred.features)}")
    if pred.dropped:
        print(f"features dropped (missing in some records): {', '.join(pred.dropped)}")
    return 0


def _predict_target(args) -> int:
    """``ptqscale-predict --target FIELD``: the field after quantization, per corpus."""
    from ptqscale_analysis.queries import predict_target, select, split

    if args.model is None:
        raise AnalysisError("--target needs --model (a model of the study: its "
                            "full-precision value comes from its method=none record)")
    frame = load_study(args.results, args.study)
    pred = _get_predictor(args, frame)
    scope = select(frame, data=args.data)
    rows = scope[(scope["model.name"] == args.model) & (scope["activations"] == "none")]
    for _, part in split(rows) if len(rows) else [((), scope)]:
        r = predict_target(pred, part, args.format, args.method, args.model)
        where = f" on {part['data.name'].iloc[0]}" if "data.name" in part else ""
        print(f"{r.model}{where} {r.format} {r.method}: {r.target} {r.value:.4f} "
              f"[{r.low:.4f}, {r.high:.4f}] ({pred.cfg.interval:.0%} of trees), damage "
              f"{r.damage:.4g}, full precision {r.fp:.4f}")
        if r.measured is not None:
            print(f"  measured{where}: {r.measured:.4f}")
    print(f"features used: {', '.join(pred.features)}")
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    return _run(_predict, argv)


# ---- ptqscale-pareto --------------------------------------------------------------------

def _pareto(argv):
    from ptqscale_analysis.load import add_target, target_fields
    from ptqscale_analysis.queries import (
        best_under_budget,
        pareto_frontier,
        parse_bytes,
        select,
        setting_columns,
        split,
        split_label,
    )

    p = _parser("ptqscale-pareto", "Best (size, format, method) under a memory budget.")
    p.add_argument("--budget", required=True, help="bytes, e.g. 500MB, 1.5GiB or 2e9")
    p.add_argument("--no-predict", action="store_true", help="measured records only")
    _split_args(p)
    _predictor_args(p)
    _target_arg(p, "the quantity to make best: dnll (default: the NLL) or any measured field "
                   "with a direction, e.g. task.ptq_gutenberg_cloze.acc (highest wins), "
                   "kl_mean (lowest wins), top1_agreement; the predictor learns its damage")
    args = p.parse_args(argv)
    budget = parse_bytes(args.budget)
    frame, t = add_target(load_study(args.results, args.study), args.target)
    scope = select(frame, data=args.data, family=args.family, activations=args.activations)
    if scope[t.source].isna().all():
        raise AnalysisError(f"no record of study {args.study!r} with these --data/--family/"
                            f"--activations measured {t.source}; fields measured there: "
                            f"{target_fields(scope)}")
    weights = scope[~scope["is_baseline"] & (scope["activations"] == "none")
                    & scope[t.source].notna()]
    pred = None
    if not args.no_predict and weights.empty:
        print("measured answers only: no weight-only quantized records to train the predictor")
    elif not args.no_predict:
        try:
            pred = _get_predictor(args, frame)
        except AnalysisError as e:   # e.g. no method=none record to measure damage against
            print(f"measured answers only: {e}")
    name = "NLL" if t.name == "dnll" else t.name
    if t.name != "dnll":
        print(f"target: {t.source} ({'higher' if t.higher_is_better else 'lower'} is better, "
              "as the records' metric_info declares)")
    print(f"budget: {budget:.6g} bytes")
    # values of other corpora/tokenizers/activation schemes/metric settings never compete
    for labels, part in split(scope, setting_columns(scope, t)):
        if labels:
            print(f"\n== {split_label(labels)}")
        if part[t.source].isna().all():
            print(f"  no record of this group measured {t.source}")
            continue
        weights_only = part["activations"].eq("none").all()
        try:
            ans = best_under_budget(part, budget, pred if weights_only else None, args.target)
        except AnalysisError as e:
            print(f"  {e}")
            continue
        _print_budget_answer(ans, pareto_frontier(part, y=t.source), budget, name)
    return 0


def _print_budget_answer(ans, front: pd.DataFrame, budget: float, name: str) -> None:
    y = ans.target.source
    if ans.measured is not None:
        m = ans.measured
        print(f"best measured:  {m['model.name']} {m['format.name']} {m['method.name']}: "
              f"{name} {m[y]:.4f}, {m['model_bytes']:.6g} bytes")
    else:
        print("best measured:  none of the measured records fits")
    if ans.predicted is not None:
        b = ans.predicted
        print(f"best predicted: {b['model.name']} {b['format.name']} {b['method.name']}: "
              f"{name} {b['value']:.4f}, {b['model_bytes']:.6g} bytes ({b['source']})")
    cols = ["model.name", "format.name", "method.name", "model_bytes", y]
    under = front[front["model_bytes"] <= budget]
    print("measured Pareto frontier under the budget:")
    print(under[cols].to_string(index=False) if len(under) else "  (none)")


def pareto_main(argv: list[str] | None = None) -> int:
    return _run(_pareto, argv)


# ---- ptqscale-report --------------------------------------------------------------------

def _report(argv):
    from ptqscale_analysis.report import ReportConfig, write_report

    p = _parser("ptqscale-report", "Write a Markdown and an HTML report of a study.")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <results>/<study>/report)")
    p.add_argument("--tables", default=None,
                   help="lay the study out as this paper's tables too (paper_tables.py; "
                        "default: the study's name, when it has tables), e.g. xu2024")
    p.add_argument("--n-boot", type=int, default=FitConfig.n_boot)
    p.add_argument("--n-estimators", type=int, default=PredictorConfig.n_estimators)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb-project", default=None,
                   help="also log the report, figures and laws as the study's W&B run")
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline"])
    _target_arg(p)
    args = p.parse_args(argv)
    out = args.out or Path(args.results) / args.study / "report"
    cfg = ReportConfig(StudyFitConfig(fit=FitConfig(n_boot=args.n_boot, seed=args.seed),
                                      target=args.target),
                       PredictorConfig(n_estimators=args.n_estimators, seed=args.seed,
                                       target=args.target))
    path = write_report(args.results, args.study, out, cfg, args.tables)
    print(f"wrote {path} and {path.with_suffix('.html')}")
    if args.wandb_project:
        import pandas as pd

        from ptqscale_analysis.wandb_study import mirror_study

        laws = pd.read_csv(out / "laws.csv") if (out / "laws.csv").is_file() else None
        mode = mirror_study(out, args.study, args.wandb_project, args.wandb_entity,
                            args.wandb_mode, laws, str(Path(args.results) / "_wandb"))
        print(f"W&B study run study-{args.study} ({mode}) in project {args.wandb_project}")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    return _run(_report, argv)
