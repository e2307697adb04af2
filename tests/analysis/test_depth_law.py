"""The precision law with a D term recovers known exponents, and says which way D goes."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import pytest

from ptqscale.store import write_record
from ptqscale_analysis.cli import fit_main
from ptqscale_analysis.depth_law import (
    depth_slopes,
    depth_verdict,
    fit_depth_law,
    tokens_multiple,
)
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import FitConfig
from ptqscale_analysis.load import load_study

C, GAMMA_N, GAMMA_P = 40.0, 0.3, 0.9
SIZES = {"25k": 2.5e4, "55k": 5.5e4, "150k": 1.5e5, "230k": 2.3e5}
REVISIONS = {"x0.25": 0.25, "x0.5": 0.5, "x1": 1.0, "x2": 2.0, "x4": 4.0}
BITS = {"int3_g128": 3.125, "mxfp4": 4.25, "int4_g128": 4.125, "mxfp6_e2m3": 6.25}


def _write(root, study, gamma_d, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    for size, n in SIZES.items():
        for rev, d in REVISIONS.items():
            for fmt, bits in BITS.items():
                dnll = C * n ** -GAMMA_N * d ** gamma_d * math.exp(-bits / GAMMA_P
                                                                   + rng.normal(0, noise))
                name = f"{study}/zoo-t-{size}@{rev}/{fmt}/rtn"
                write_record(root, {
                    "job_key": hashlib.sha256(name.encode()).hexdigest()[:16], "study": study,
                    "status": "complete", "name": name, "protocol_version": 1,
                    "model": {"name": f"zoo-t-{size}", "family": "zoo-t", "size": size,
                              "revision": rev},
                    "format": {"name": fmt, "family": "int", "bits_per_weight": bits},
                    "method": {"name": "rtn"},
                    "params": {"total": int(2 * n), "embedding": int(n / 2), "head": 0,
                               "blocks": int(n), "quantizable": int(n)},
                    "metrics": {"nll": 5.0 + dnll, "perplexity": math.exp(5.0 + dnll),
                                "nll_fp": 5.0, "perplexity_fp": math.exp(5.0), "dnll": dnll,
                                "tokens": 4096, "nll_sum": (5.0 + dnll) * 4096,
                                "model_bytes": int(n)}})


@pytest.fixture(scope="module")
def depth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    _write(root, "grows", gamma_d=0.25)
    _write(root, "flat", gamma_d=0.0, seed=1)
    return root


def test_the_fit_recovers_known_exponents_with_intervals(depth_root):
    fit = fit_depth_law(load_study(depth_root, "grows"), FitConfig(n_boot=60, bootstrap="cases"))
    assert fit.converged and fit.n == len(SIZES) * len(REVISIONS) * len(BITS)
    for name, true in (("gamma_N", GAMMA_N), ("gamma_D", 0.25), ("gamma_P", GAMMA_P)):
        lo, hi = fit.ci[name]
        assert lo <= true <= hi, (name, fit.params[name], lo, hi)
        assert fit.params[name] == pytest.approx(true, abs=0.05 if name != "gamma_P" else 0.1)
    assert "grows" in depth_verdict(fit)


def test_no_trend_is_said_as_such(depth_root):
    frame = load_study(depth_root, "flat")
    fit = fit_depth_law(frame, FitConfig(n_boot=60, bootstrap="cases"))
    assert "no significant trend" in depth_verdict(fit)
    slopes = depth_slopes(frame)
    assert len(slopes) == len(SIZES) * len(BITS) and abs(slopes["slope"].median()) < 0.05


def test_revisions_must_be_training_multiples():
    assert tokens_multiple(pd.Series(["x0.25", "x4"])).tolist() == [0.25, 4.0]
    with pytest.raises(AnalysisError, match="model.revision 'main'"):
        tokens_multiple(pd.Series(["main"]))


def test_the_cli_fits_the_d_law(depth_root, capsys):
    assert fit_main(["--results", str(depth_root), "--study", "grows", "--depth-law",
                     "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "gamma_D" in out and "grows with training tokens" in out


def test_report_tables_each_checkpoint_of_a_name(depth_root, tmp_path):
    """A study over training lengths holds several checkpoints per model name: the report's
    dNLL table has a row for each (name@revision), not one value blended over them."""
    from ptqscale_analysis.cli import report_main

    out = tmp_path / "report"
    assert report_main(["--results", str(depth_root), "--study", "grows",
                        "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| zoo-t-25k")]
    assert [r.split("|")[1].strip() for r in rows[:5]] == [f"zoo-t-25k@{r}" for r in REVISIONS]
