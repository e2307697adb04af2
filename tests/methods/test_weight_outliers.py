"""Per-layer outlier statistics of the full-precision weights (issue 22's transfer features)."""

from __future__ import annotations

import pytest
import torch

from ptqscale.methods.base import QuantReport, layer_stats


def test_gaussian_weights_have_no_excess_kurtosis_and_an_outlier_shows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    flat = layer_stats("a", w, w.round(), 0)
    assert flat["kurtosis"] == pytest.approx(0.0, abs=0.1)
    assert 3.5 < flat["absmax_rms"] < 5.5      # ~4.4 sigma is the max of 65k normal draws
    spiky = w.clone()
    spiky[0, :4] = 60.0
    out = layer_stats("b", spiky, spiky.round(), 0)
    assert out["kurtosis"] > 50 and out["absmax_rms"] > 40


def test_the_report_summarises_them_numel_weighted():
    layers = [{"name": "a", "numel": 3, "signal": 1.0, "noise": 0.1, "kurtosis": 1.0,
               "absmax_rms": 2.0},
              {"name": "b", "numel": 1, "signal": 1.0, "noise": 0.1, "kurtosis": 5.0,
               "absmax_rms": 7.0}]
    q = QuantReport("rtn", "int4", layers).to_dict()
    assert q["weight_kurtosis"] == pytest.approx(2.0) and q["weight_absmax_rms"] == 7.0
    assert "weight_kurtosis" not in QuantReport("rtn", "int4", [{"name": "c", "numel": 1,
                                                                "signal": 1.0, "noise": 0.1}]).to_dict()
