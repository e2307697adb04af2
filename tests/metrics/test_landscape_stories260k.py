"""Landscape features of the one real pretrained model (stories260K) on in-domain text.

kappa (noise response) and kappa_h (weighted Hutchinson trace) estimate the same
small-noise coefficient; measured here (2,048 tokens, see docs/landscape.md) they agree
to about 3%, well inside the 20% the issue asks for.
"""

from __future__ import annotations

import pytest

from ptqscale.metrics.landscape import LandscapeConfig, measure_hessian, measure_noise_response
from ptqscale.models import get_anatomy

SEQLEN, N_WINDOWS = 256, 8


@pytest.fixture(scope="module")
def stories(stories_tokens):
    model, tokens = stories_tokens
    ids = tokens(20_000)
    assert ids.numel() >= SEQLEN * N_WINDOWS
    windows = ids[: SEQLEN * N_WINDOWS].view(N_WINDOWS, SEQLEN).long()
    targets = get_anatomy(model).targets
    cfg = LandscapeConfig(enabled=True, max_tokens=SEQLEN * N_WINDOWS, batch_size=N_WINDOWS,
                          hvp_windows=N_WINDOWS,
                          hutchinson_probes=16, power_iters=0)
    noise = measure_noise_response(model, targets, windows, cfg)
    return model, targets, windows, cfg, noise


@pytest.mark.slow
def test_dnll_rises_as_sqnr_falls_on_stories260k(stories):
    *_, cfg, noise = stories
    levels = sorted(cfg.levels_db, reverse=True)
    curve = [noise[f"dnll_at_{s:g}db"] for s in levels]
    assert all(a < b for a, b in zip(curve, curve[1:])), dict(zip(levels, curve))
    assert curve[0] > 0 and curve[-1] > cfg.threshold  # the basin edge is inside the grid
    assert noise["s_star_bracketed"] and 10 < noise["s_star_db"] < 50
    assert 1.0 < noise["nll_clean"] < 2.0  # the model reads its own domain (~1.4 nats)


@pytest.mark.slow
def test_kappa_and_kappa_h_agree_on_stories260k(stories, record_property):
    model, targets, windows, cfg, noise = stories
    second = measure_hessian(model, targets, windows, cfg)
    record_property("kappa", noise["kappa"])
    record_property("kappa_h", second["kappa_h"])
    print(f"stories260K: kappa={noise['kappa']:.3f} (levels >= {noise['kappa_min_db']} dB), "
          f"kappa_h={second['kappa_h']:.3f} +- {second['kappa_h_sem']:.3f}")
    assert noise["kappa_linear"] and noise["kappa_n_levels"] >= 2
    assert second["kappa_h"] == pytest.approx(noise["kappa"], rel=0.20)
    assert second["hessian_trace"] > 0
