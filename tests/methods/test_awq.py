"""AWQ: the error identity it searches with, the scale and clip searches against brute force,
folds that keep the function, and NLL below RTN on a trained model."""

from __future__ import annotations

import copy

import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.formats import get_format
from ptqscale.methods import AWQConfig, QuantContext, RTNConfig, quantize
from ptqscale.methods.awq import output_error, search_clip, search_scale
from ptqscale.methods.capture import HessianAccumulator


def _hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[-1], X.device)
    acc.add(X)
    return acc.hessian()


def test_output_error_is_the_mean_squared_output_error():
    torch.manual_seed(0)
    X, W, V = torch.randn(200, 16), torch.randn(8, 16), torch.randn(8, 16)
    direct = float((X @ (W - V).T).double().square().sum() / 200)
    assert output_error(W, V, _hessian(X)) == pytest.approx(direct, rel=1e-5)


def test_scale_search_starts_at_rtn_and_never_does_worse():
    torch.manual_seed(0)
    X = torch.randn(256, 64) * torch.linspace(0.1, 5, 64)  # uneven channel magnitudes
    W = torch.randn(32, 64)
    fmt = get_format("int4_g32")
    H = _hessian(X)
    s, a, errors = search_scale([W], X.abs().mean(0), H, fmt, grid=20)
    assert errors[0] == pytest.approx(output_error(W, fmt.fake_quantize(W), H))
    assert len(errors) == 20 and min(errors) == errors[round(a * 20)] < errors[0]
    direct = float((X @ W.T - (X / s) @ fmt.fake_quantize(W * s).T).double().square().mean(0)
                   .sum())
    assert errors[round(a * 20)] == pytest.approx(direct, rel=1e-4)


def test_clip_search_matches_brute_force_per_row_and_group():
    torch.manual_seed(0)
    X, W = torch.randn(300, 16), torch.randn(3, 16)
    fmt = get_format("int3_g8")
    H = _hessian(X)
    clipped, _ = search_clip(W, H, fmt, clip_grid=10, max_shrink=0.5)
    for r in range(3):
        for k in range(2):
            cols = slice(8 * k, 8 * k + 8)
            w = W[r, cols]
            best = min(((X[:, cols] @ (fmt.fake_quantize(w.clamp(-m, m).unsqueeze(0))[0] - w))
                        .double().square().sum().item(), m)
                       for m in (w.abs().max() * (1 - i / 10) for i in range(5)))
            assert clipped[r, cols].abs().max() == pytest.approx(float(best[1]), rel=1e-6)


@pytest.mark.parametrize("unfoldable", ["skip", "explicit"])
def test_folds_keep_the_full_precision_function(tiny_llama, unfoldable):
    """fp16 as the 'format' is a near-identity: whatever AWQ scales and folds, the logits stay."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    report = quantize(tiny_llama, AWQConfig(format="fp16", clip_search=False, device="cpu",
                                            unfoldable=unfoldable),
                      QuantContext(calibration=ids))
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, ref, rtol=1e-2, atol=2e-3)
    how = {e["name"].split(".")[-1]: e["scaling"] for e in report.layers[:7]}
    assert how["q_proj"] == "folded into input_layernorm"
    assert how["down_proj"] == "folded into mlp.up_proj"
    # GQA (4 query heads, 2 kv heads): v_proj's rows cannot absorb o_proj's input scale
    assert how["o_proj"] == ("explicit pre-hook x/s" if unfoldable == "explicit"
                             else "skipped: nothing to fold 1/s into")


def test_awq_without_clipping_has_no_more_output_error_than_rtn(tiny_llama):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    report = quantize(tiny_llama, AWQConfig(format="int3_g32", clip_search=False, device="cpu"),
                      QuantContext(calibration=ids))
    extra = report.extra["awq"]
    assert extra["out_err_awq"] <= extra["out_err_rtn"] * (1 + 1e-3)
    assert report.extra["cost"]["seconds"] > 0


@pytest.mark.parametrize("kw, needle", [
    (dict(format="int4_t"), "one scale per tensor"),
    (dict(unfoldable="drop"), "unfoldable"),
    (dict(max_shrink=1.0), "max_shrink"),
    (dict(grid=0), "grid"),
    (dict(device="tpu"), "device"),
])
def test_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        AWQConfig(**kw)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g32", "int3_g32"])
def test_awq_nll_below_rtn_on_stories260k(fmt):
    from ptqscale.assets import DATA as ASSETS
    from ptqscale.data import CalibConfig, DataConfig, sample_calibration, tokenize_corpus
    from ptqscale.metrics import EvalConfig, measure_perplexity
    from ptqscale.models import ModelConfig, load_model

    path = ASSETS / "models" / "stories260K" / "stories260K.gguf"
    model, tok = load_model(ModelConfig(name="stories260k", path=str(path), max_seqlen=512))
    corpus = str(ASSETS / "tinystories-valid-sample")
    calib = DataConfig("tinystories", "validation", path=corpus, max_documents=3000)
    ids, _ = sample_calibration(CalibConfig(calib, nsamples=16, seqlen=256, seed=0), tok, None)
    held = tokenize_corpus(DataConfig("tinystories", "validation", path=corpus), tok, None,
                           preset="gptq")[-8192:]
    ev = EvalConfig(seqlen=256, batch_size=8)
    rtn = copy.deepcopy(model)
    quantize(rtn, RTNConfig(format=fmt))
    quantize(model, AWQConfig(format=fmt, device="cpu"), QuantContext(calibration=ids))
    assert measure_perplexity(model, held, ev).nll < measure_perplexity(rtn, held, ev).nll
