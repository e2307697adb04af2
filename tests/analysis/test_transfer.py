"""Transfer features and leave-one-family-out validation (issue 22) on a synthetic study whose
GPTQ gain differs by family and is carried by the records' calibration-set error ratio."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import pytest

from ptqscale.store import write_record
from ptqscale_analysis.cli import fit_main
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import load_study
from ptqscale_analysis.predictor import PredictorConfig
from ptqscale_analysis.transfer import (
    add_transfer_features,
    gain_frame,
    lofo,
    must_show_table,
    noise_ceiling,
)

# the rows the transfer features read: format (bits, RTN SQNR dB), params, metrics, landscape
SQNR = {"int4_g128": (4.125, 20.0), "int3_g128": (3.125, 14.0), "mxfp4": (4.25, 16.0),
        "nvfp4": (4.5, 19.0), "mxint3_128": (3.0625, 13.0), "bf16": (16.0, None)}


def _record(study, fam, size, fmt, method, dnll, sqnr, n, landscape):
    name = f"{study}/{fam}-{size}/{fmt}/{method}"
    return {"job_key": hashlib.sha256(name.encode()).hexdigest()[:16], "study": study, "status": "complete",
            "name": name, "protocol_version": 1,
            "model": {"name": f"{fam}-{size}", "family": fam, "size": size},
            "format": {"name": fmt, "family": "baseline" if fmt == "bf16" else "int",
                       "element_bits": 4, "block_size": 32, "bits_per_weight": SQNR[fmt][0]},
            "method": {"name": method}, "data": {"name": "corpus"},
            "params": {"total": int(2 * n), "embedding": int(n / 2), "head": int(n / 2),
                       "blocks": int(n), "quantizable": int(n)},
            "metrics": {"nll": 3.0 + dnll, "perplexity": math.exp(3.0 + dnll), "nll_fp": 3.0,
                        "perplexity_fp": math.exp(3.0), "dnll": dnll, "tokens": 4096,
                        "nll_sum": (3.0 + dnll) * 4096, "weight_sqnr_db": sqnr,
                        "model_bytes": int(n)},
            "landscape": landscape}

# per family: noise-law constant of RTN and the factor GPTQ takes off RTN's damage (and off
# its calibration-set Hessian-weighted error, up to jitter): the gain is the family's own
FAMS = {"fa": (300.0, 0.35), "fb": (500.0, 0.6), "fc": (200.0, 0.8), "fd": (400.0, 0.5)}
SIZES = {"1m": 1e6, "4m": 4e6, "16m": 1.6e7, "64m": 6.4e7}
FMTS = ("int4_g128", "int3_g128", "mxfp4", "nvfp4", "mxint3_128")


@pytest.fixture(scope="module")
def transfer_frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    rng = np.random.default_rng(0)
    for fam, (k, ratio) in FAMS.items():
        for size, n in SIZES.items():
            kappa = k * n ** -0.4
            land = {"kappa": kappa}
            write_record(root, _record("tr", fam, size, "bf16", "none", 0.0, None, n, land))
            for fmt in FMTS:
                sqnr = SQNR[fmt][1] + rng.normal(0, 0.3)
                err_rtn = n * 10 ** (-sqnr / 10)
                r = ratio * math.exp(rng.normal(0, 0.03))
                for method in ("rtn", "gptq"):
                    f = r if method == "gptq" else 1.0
                    dnll = kappa * 10 ** (-sqnr / 10) * f * math.exp(rng.normal(0, 0.03))
                    rec = _record("tr", fam, size, fmt, method, dnll, sqnr, n, land)
                    # the weights' outlier statistics: per model, whatever the method
                    rec["quantization"] = {"weight_kurtosis": 1.0 + ratio, "weight_absmax_rms": 6.0}
                    if method == "gptq":
                        rec["quantization"] |= {"out_err_rtn": err_rtn, "out_err_gptq": err_rtn * r}
                    write_record(root, rec)
    return root, load_study(root, "tr")


def test_the_rtn_row_gets_its_gptq_twins_error_ratio(transfer_frame):
    _, frame = transfer_frame
    rows = add_transfer_features(frame[frame["method.name"] != "none"])
    assert rows["gptq_err_ratio"].notna().all()
    cell = ["model.name", "format.name"]
    assert (rows.groupby(cell)["gptq_err_ratio"].nunique() == 1).all()
    fa = rows[rows["model.family"] == "fa"]["gptq_err_ratio"]
    assert fa.mean() == pytest.approx(0.35, rel=0.05)


def test_gain_is_rtn_minus_gptq_per_cell():
    preds = pd.DataFrame({"group": "g", "model.name": ["m", "m", "m", "m"],
                          "format.name": ["a", "a", "b", "b"],
                          "method.name": ["rtn", "gptq", "rtn", "gptq"],
                          "measured": [0.5, 0.2, 0.1, 0.1], "p": [0.4, 0.2, 0.2, 0.05]})
    gains = gain_frame(preds, ["p"]).set_index("format.name")
    assert gains.loc["a", "measured"] == pytest.approx(0.3)
    assert gains.loc["b", "p"] == pytest.approx(0.15)
    table = must_show_table(preds, ["p"]).iloc[0]
    assert np.isnan(table["r2_ceiling"])   # no dnll_se in these rows: no ceiling claimed
    assert table["gain_rel_err"] == pytest.approx(abs(0.35 - 0.3) / 0.3)
    assert table["mae_share"] == pytest.approx(
        np.mean([0.1, 0.0, 0.1, 0.05]) / np.mean([0.5, 0.2, 0.1, 0.1]))


def test_noise_ceiling_is_what_a_predictor_of_the_true_damage_reaches():
    rng = np.random.default_rng(0)
    truth = 10 ** rng.uniform(-3, -1, 4000)
    se = 0.2 * truth + 0.002
    measured = truth + se * rng.standard_normal(truth.size)
    part = pd.DataFrame({"group": "g", "measured": measured, "measured_se": se, "p": truth})
    ceiling = noise_ceiling(part)
    from ptqscale_analysis.predictor import r2_score

    assert ceiling["r2_ceiling"] == pytest.approx(r2_score(measured, truth), abs=0.02)
    big = measured > 0.01
    mae = np.mean(np.abs(measured - truth)[big]) / np.mean(np.abs(measured[big]))
    assert ceiling["mae_floor_share"] == pytest.approx(mae, rel=0.1)
    row = must_show_table(part.assign(**{"method.name": "rtn"}), ["p"]).iloc[0]
    assert row["r2_ceiling"] == ceiling["r2_ceiling"] and row["r2_dnll"] <= 1


def test_lofo_physics_forest_carries_the_gain_the_plain_forest_misses(transfer_frame):
    _, frame = transfer_frame
    res = lofo(frame, "model.family", PredictorConfig(n_estimators=60))
    t = res.table.set_index(["group", "predictor"])
    assert set(t.index.get_level_values(0)) == set(FAMS)
    phys = t.xs("forest/physics", level=1)
    assert phys["pass_r2"].all() and phys["pass_mae"].all() and phys["pass_gain"].all()
    plain = t.xs("forest", level=1)
    # the family with the largest gain (fa) is outside what the others teach the plain forest
    assert plain.loc["fa", "gain_rel_err"] > 2 * phys.loc["fa", "gain_rel_err"]
    assert {"gptq_err_ratio", "weight_kurtosis"} <= set(res.features["forest+transfer"])
    assert t.xs("noise", level=1)["coverage"].eq(1.0).all()   # laws on the same splits
    # the guess itself, nothing fitted: these rows are the guess up to 3% jitter
    land = res.predictions
    assert np.allclose(land["landscape"], land["measured"], rtol=0.15)
    assert t.xs("landscape", level=1)["pass_r2"].all()


def test_the_cli_prints_the_lofo_table(transfer_frame, tmp_path, capsys):
    root, _ = transfer_frame
    md = tmp_path / "lofo.md"
    assert fit_main(["--results", str(root), "--study", "tr", "--lofo", "family",
                     "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "forest/physics" in out and "pass_gain" in out
    assert md.read_text().startswith("| group | predictor |")
    assert fit_main(["--results", str(root), "--study", "tr", "--lofo", "nope"]) == 2
    # one corpus's records: the study has only this one, so the same table
    one = tmp_path / "one.md"
    assert fit_main(["--results", str(root), "--study", "tr", "--lofo", "family",
                     "--data", "corpus", "--markdown", str(one)]) == 0
    assert one.read_text() == md.read_text()
    capsys.readouterr()
    assert fit_main(["--results", str(root), "--study", "tr", "--lofo", "family",
                     "--data", "wiki"]) == 2
    assert "--data 'wiki' is not in the study; data.name values: ['corpus']" in \
        capsys.readouterr().err
    assert fit_main(["--results", str(root), "--study", "tr", "--data", "corpus"]) == 2


def test_rows_without_a_physics_guess_take_the_floor(transfer_frame):
    _, frame = transfer_frame
    frame = frame.copy()
    frame.loc[frame["model.family"] == "fd", "landscape.kappa"] = np.nan  # no landscape there
    res = lofo(frame, "model.family", PredictorConfig(n_estimators=20))
    phys = res.table[res.table["predictor"] == "forest/physics"]
    assert phys["coverage"].eq(1.0).all()
    assert "noise_equiv_log10" not in res.features["forest/physics"]   # not in every row


def test_a_fisher_table_scales_the_physics_guess(transfer_frame, tmp_path, capsys):
    root, frame = transfer_frame
    rows = frame[frame["method.name"] != "none"]
    # family fb's error avoids the sensitive weights: its damage is half the noise's
    table = rows[["model.name", "format.name"]].drop_duplicates()
    table["fisher_ratio"] = np.where(table["model.name"].str.startswith("fb"), 0.5, 1.0)
    plain = add_transfer_features(rows)
    scaled = add_transfer_features(rows, table)
    fb = rows["model.family"] == "fb"
    diff = scaled["noise_equiv_log10"] - plain["noise_equiv_log10"]
    assert np.allclose(diff[fb], np.log10(0.5)) and np.allclose(diff[~fb], 0.0)
    assert plain["fisher_ratio"].isna().all() and scaled["fisher_ratio"].notna().all()
    with pytest.raises(AnalysisError, match="lacks 10 row"):   # fa-1m: 5 formats x 2 methods
        add_transfer_features(rows, table[table["model.name"] != "fa-1m"])
    with pytest.raises(AnalysisError, match="no column"):
        add_transfer_features(rows, table.drop(columns="fisher_ratio"))
    csv = tmp_path / "fisher.csv"
    table.to_csv(csv, index=False)
    assert fit_main(["--results", str(root), "--study", "tr", "--lofo", "family",
                     "--fisher", str(csv)]) == 0
    capsys.readouterr()
    assert fit_main(["--results", str(root), "--study", "tr", "--lofo", "family",
                     "--fisher", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_records_fisher_ratio_scales_the_guess_per_cell(transfer_frame):
    _, frame = transfer_frame
    rows = frame[frame["method.name"] != "none"].copy()
    # metric fisher in every job; the cell's RTN value is what both of its rows take
    rows["metrics.fisher_ratio"] = np.where(rows["method.name"] == "rtn",
                                            np.where(rows["model.family"] == "fc", 0.6, 1.0), 5.0)
    plain = add_transfer_features(rows.drop(columns="metrics.fisher_ratio"))
    scaled = add_transfer_features(rows)
    diff = scaled["noise_equiv_log10"] - plain["noise_equiv_log10"]
    fc = rows["model.family"] == "fc"
    assert np.allclose(diff[fc], np.log10(0.6)) and np.allclose(diff[~fc], 0.0)
    rows.loc[rows.index[0], "metrics.fisher_ratio"] = np.nan   # an RTN job without it
    assert rows.loc[rows.index[0], "method.name"] == "rtn"
    with pytest.raises(AnalysisError, match="1 of 80 RTN jobs have no metrics.fisher_ratio"):
        add_transfer_features(rows)


def test_the_first_order_term_joins_the_guess(transfer_frame):
    """Damage = g.e + the second-order part, g.e signed and as large: the landscape guess
    (nothing fitted) recovers each row once the records hold metric first_order, and misses
    without it; forest/physics learns the factor on the second-order part only."""
    _, frame = transfer_frame
    rows = frame.copy()
    rng = np.random.default_rng(1)
    quantized = rows["format.name"] != "bf16"
    first = pd.Series(0.0, index=rows.index)
    first[quantized] = rng.uniform(-1.0, 1.0, int(quantized.sum())) * rows["dnll"][quantized]
    rows["dnll"] = rows["dnll"] + first
    without = lofo(rows, "model.family", PredictorConfig(n_estimators=30))
    rows["metrics.first_order_dnll"] = first.where(quantized)   # bf16: no error, no value
    res = lofo(rows, "model.family", PredictorConfig(n_estimators=30))
    assert "first_order_dnll" in res.features["forest+transfer"]
    p = res.predictions
    assert np.allclose(p["landscape"], p["measured"], atol=0.15 * p["measured"].abs().max())
    land = res.table[res.table["predictor"] == "landscape"].set_index("group")
    land0 = without.table[without.table["predictor"] == "landscape"].set_index("group")
    assert (land["r2_dnll"] > 0.9).all() and (land0["r2_dnll"] < land["r2_dnll"] - 0.2).all()
    phys = res.table[res.table["predictor"] == "forest/physics"]
    assert (phys["r2_dnll"] > 0.9).all()
    rows.loc[rows.index[quantized][0], "metrics.first_order_dnll"] = np.nan
    with pytest.raises(AnalysisError, match="1 quantized job"):
        add_transfer_features(rows)
