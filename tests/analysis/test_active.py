"""The predictor-guided design (ptqscale_analysis.active) replayed on the committed
family_scan records: the seed covers the study, budgets and baselines are respected, a
resumed design re-runs nothing, and the guided choices beat random ones of the same budget."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ptqscale_analysis.active import (
    DesignConfig,
    answer,
    grid_from_frame,
    match,
    run_design,
    runnable,
    screen_table,
    seed_design,
)
from ptqscale_analysis.active_pareto import rank1_dnll
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import load_study
from ptqscale_analysis.replay import ReplayOracle, point_se, score

RESULTS = Path(__file__).resolve().parents[2] / "results"
KEYS = ["model", "data", "method", "format"]
MODELS = [f"gutenberg-llama-{s}" for s in ("200k", "500k", "1m", "2m", "4m")]


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def full():
    return load_study(RESULTS, "family_scan")


@pytest.fixture(scope="module")
def part(full):
    """Five family members on Gutenberg: 130 points, 10 of them bf16 baselines."""
    return full[full["model.name"].isin(MODELS) & (full["data.name"] == "gutenberg")]


def test_every_record_is_one_grid_point_and_the_seed_covers_the_study(full):
    grid = grid_from_frame(full, KEYS)
    assert len(grid) == 416 and grid["baseline"].sum() == 32
    rows = match(grid, full)
    assert rows.notna().all() and rows.nunique() == 416
    seed = seed_design(grid, DesignConfig())
    picked = grid.loc[seed]
    assert len(seed) == 16 and not picked["baseline"].any()
    assert len(picked.drop_duplicates(["model", "data"])) == 16      # every model x corpus
    assert set(picked["format"]) == set(grid.loc[~grid["baseline"], "format"])  # 12 formats
    assert set(picked["method"]) == {"rtn", "gptq"}


def test_replay_keeps_to_the_budget_never_runs_a_baseline_or_a_point_twice(part):
    grid = grid_from_frame(part, KEYS)
    cfg = DesignConfig("predictor", budget=0.3, batch_size=6)
    h = run_design(grid, ReplayOracle(part, grid), cfg)
    ran = [i for s in h.steps for i in s.batch]
    assert len(ran) == len(set(ran)) == h.jobs <= int(0.3 * len(grid))
    assert not grid.loc[ran, "baseline"].any()
    assert h.steps[0].note == "seed" and all(len(s.batch) <= 6 for s in h.steps[1:])
    assert h.stopped and h.steps[-1].batch == []
    # the answer: measured dNLL where run, a prediction everywhere else, 0 for baselines
    t = h.final.table
    assert t["dnll"].notna().all() and (t.loc[grid["baseline"], "dnll"] == 0).all()
    assert t["measured"].sum() == h.jobs + grid["baseline"].sum()


def test_a_resumed_design_reads_what_ran_and_runs_none_of_it_again(part):
    grid = grid_from_frame(part, KEYS)
    cfg = DesignConfig("predictor", budget=24, batch_size=4)
    first = run_design(grid, ReplayOracle(part, grid), dataclasses.replace(cfg, budget=12))
    done = [i for s in first.steps for i in s.batch]
    oracle = ReplayOracle(part, grid)
    oracle.shown = set(done)           # the store holds the first sweep's records
    h = run_design(grid, oracle, cfg)
    assert h.steps[0].jobs == 12 and h.steps[0].note == "guided"
    again = [i for s in h.steps for i in s.batch]
    assert not set(again) & set(done) and h.jobs == 24


@pytest.mark.slow
def test_guided_design_predicts_the_grid_better_than_random_ones_of_its_budget(part):
    grid = grid_from_frame(part, KEYS)
    truth = answer(grid, part, DesignConfig())
    cfg = DesignConfig("predictor", budget=0.3, batch_size=6)
    guided = score(run_design(grid, ReplayOracle(part, grid), cfg).final, truth)["mae_unrun"]
    for seed in (0, 1):
        rnd = dataclasses.replace(cfg, strategy="random", seed=seed)
        mae = score(run_design(grid, ReplayOracle(part, grid), rnd).final, truth)["mae_unrun"]
        assert guided < mae, (guided, mae)


def test_rank1_recovers_a_product_law_and_marks_the_unit_that_breaks_it():
    # dNLL = s[model, corpus] * g[format, method]; unit d breaks the law by noise
    rng = np.random.default_rng(0)
    s = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.7, "h": 0.8, "i": 0.4, "j": 0.6}
    g = {("f1", "rtn"): 0.2, ("f1", "gptq"): 0.1, ("f2", "rtn"): 0.02, ("f2", "gptq"): 0.015}

    def table(units, noise):
        rows = [{"model.name": u, "data.name": "x", "format.name": f, "method.name": m,
                 "baseline": False, "dnll": s[u] * v + (rng.normal(0, noise) if u == "d" else 0)}
                for u in units for (f, m), v in g.items()]
        t = pd.DataFrame(rows + [{"model.name": "e", "data.name": "x", "format.name": "f1",
                                  "method.name": "rtn", "baseline": False, "dnll": np.nan}])
        return t.assign(measured=~t.index.isin(hidden) & t["dnll"].notna())

    hidden = [1, 6, 11]   # (a, f1 gptq), (b, f2 rtn), (c, f2 gptq): not measured
    t = table("abc", 0.0)
    pred, var = rank1_dnll(t)
    exact = [s[t.at[i, "model.name"]] * g[(t.at[i, "format.name"], t.at[i, "method.name"])]
             for i in hidden]
    np.testing.assert_allclose(pred[hidden], exact, rtol=1e-2)   # the ridge's pull only
    assert np.isnan(pred[12]) and np.isnan(var[12])   # unit e: nothing measured
    t = table("abcdhij", 0.03)
    pred, var = rank1_dnll(t)
    assert var[12] > 3 * var[:12].max() > 0            # d's residuals widen d's uncertainty


@pytest.mark.slow
def test_pareto_design_stops_when_nothing_could_join_the_frontier_and_finds_it(part):
    grid = grid_from_frame(part, KEYS)
    truth = answer(grid, part, DesignConfig("pareto"))
    h = run_design(grid, ReplayOracle(part, grid), DesignConfig("pareto", budget=1.0 * len(grid)))
    assert h.stopped == "nothing left that could change the answer"
    assert h.jobs < len(runnable(grid))
    s = score(h.final, truth)
    assert s["frontier"] == s["frontier_of"] and s["frontier_extra"] == 0
    assert s["frontier_gap"] == 0


@pytest.mark.slow
def test_frontier_within_noise_counts_the_misses_the_evaluation_cannot_resolve(part):
    grid = grid_from_frame(part, KEYS)
    truth = answer(grid, part, DesignConfig("pareto"))
    h = run_design(grid, ReplayOracle(part, grid), DesignConfig("pareto", budget=40))
    plain = score(h.final, truth)
    assert np.isnan(plain["frontier_noise"])         # family_scan predates dnll_se
    assert 0 < plain["frontier"] < plain["frontier_of"]
    exact = score(h.final, truth, point_se(part.assign(**{"metrics.dnll_se": 0.0}), grid))
    assert exact["frontier_noise"] == plain["frontier"]   # no noise: found is what counts
    wide = score(h.final, truth, point_se(part.assign(**{"metrics.dnll_se": 10.0}), grid))
    assert wide["frontier_noise"] == plain["frontier_of"]
    half = plain["frontier_gap"] / 4   # between: the misses by less than 2 se join
    some = score(h.final, truth, point_se(part.assign(**{"metrics.dnll_se": half}), grid))
    assert plain["frontier"] <= some["frontier_noise"] < plain["frontier_of"]


@pytest.mark.slow
def test_law_design_fits_every_group_near_the_full_grids_exponent(part):
    grid = grid_from_frame(part, KEYS)
    cfg = DesignConfig("law", budget=0.3, batch_size=6, law_boot=20)
    truth = answer(grid, part, cfg)
    h = run_design(grid, ReplayOracle(part, grid), cfg)
    assert h.jobs <= int(0.3 * len(grid)) and h.stopped
    s = score(h.final, truth)
    assert s["gamma_of"] == 2 and s["gamma_in_ci"] == 2 and s["gamma_err"] < 0.15, s


def test_law_scores_nothing_in_a_group_with_one_size(full):
    grid = grid_from_frame(full, KEYS)
    seeded = full.loc[match(grid, full)[seed_design(grid, DesignConfig())]]
    ans = answer(grid, seeded, DesignConfig("law", law_boot=0))
    stories = ans.table.loc[ans.score.index, "model.name"] == "stories260k"
    assert (ans.score[stories.to_numpy()] == 0).all()
    assert (ans.score[~stories.to_numpy()] > 0).any()


@pytest.mark.parametrize("kw, match_", [({"question": "laws"}, "question must be one of"),
                                        ({"budget": 0}, "budget must be"),
                                        ({"budget": 2.5}, "budget must be"),
                                        ({"strategy": "grid"}, "strategy must be"),
                                        ({"batch_size": 0}, "batch_size")])
def test_bad_design_settings_are_refused_with_what_is_allowed(kw, match_):
    with pytest.raises(AnalysisError, match=match_):
        DesignConfig(**kw)


def test_a_swept_key_the_records_lack_is_named(part):
    grid = grid_from_frame(part, KEYS).assign(landscape="default")
    with pytest.raises(AnalysisError, match=r"swept keys \['landscape'\] are not in the study"):
        match(grid, part)


def with_first_order_part(frame: pd.DataFrame, sd: float = 0.02, seed: int = 0) -> pd.DataFrame:
    """``frame`` with a signed first-order part per (model, format), as on a text the models
    are not at a minimum of: added to every quantized job's NLL (RTN and GPTQ alike), and
    recorded as RTN's ``first_order_dnll`` (what a screen measures). No other feature
    describes it."""
    rng = np.random.default_rng(seed)
    f = frame.copy()
    pair = f["model.name"].astype(str) + "/" + f["format.name"].astype(str)
    part = pair.map({p: rng.normal(0, sd) for p in sorted(pair.unique())})
    part = part.where(~f["is_baseline"].astype(bool), 0.0)
    f["metrics.nll"] = f["metrics.nll"] + part
    f["dnll"] = f["dnll"] + part
    f["metrics.first_order_dnll"] = part.where(f["method.name"] == "rtn")
    return f


def test_screen_lets_the_design_see_a_signed_first_order_part(part):
    """Unscreened, the signed part is noise the forest cannot learn (MAE ~ its size); screened,
    the design predicts the grid as well as it does the study without that part."""
    def mae(frame, cfg, screen=None):
        grid = grid_from_frame(frame, KEYS)
        h = run_design(grid, ReplayOracle(frame, grid), cfg, screen=screen)
        return score(h.final, answer(grid, frame, cfg, screen))["mae_unrun"]

    cfg = DesignConfig("predictor", budget=40, seed=0)
    f = with_first_order_part(part)
    plain, without = mae(f, cfg), mae(part, cfg)
    screened = mae(f, dataclasses.replace(cfg, screen=True), screen_table(f))
    assert plain > 2 * without and screened < 1.3 * without, (plain, screened, without)


def test_a_screened_design_needs_a_value_for_every_point(part):
    f = with_first_order_part(part)
    grid = grid_from_frame(f, KEYS)
    cfg = DesignConfig("predictor", budget=10, screen=True)
    with pytest.raises(AnalysisError, match="needs a screen"):
        run_design(grid, ReplayOracle(f, grid), cfg)
    screen = screen_table(f).drop(("gutenberg-llama-1m", "gutenberg", "int4_g128"))
    with pytest.raises(AnalysisError, match="no screening value for 1 .*gutenberg-llama-1m"):
        run_design(grid, ReplayOracle(f, grid), cfg, screen=screen)
    with pytest.raises(AnalysisError, match="metric first_order"):
        screen_table(part)


def test_replay_cli_says_what_a_screen_needs(capsys):
    from ptqscale_analysis.replay import main

    with pytest.raises(SystemExit, match="error: a screen needs RTN records with the metric "
                                         "first_order"):
        main(["--results", str(RESULTS), "--study", "family_scan", "--screen"])
