"""GPTQ on a real trained model (stories260K): per-layer error and held-out NLL below RTN's."""

from __future__ import annotations

import copy

import pytest

from ptqscale.assets import DATA as ASSETS
from ptqscale.data import CalibConfig, DataConfig, sample_calibration, tokenize_corpus
from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.models import ModelConfig, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stories():
    """The model, calibration from the first 3000 TinyStories documents, and held-out tokens
    (the corpus's last 4096 tokens, from documents after those 3000)."""
    path = ASSETS / "models" / "stories260K" / "stories260K.gguf"
    model, tok = load_model(ModelConfig(name="stories260k", path=str(path), max_seqlen=512))
    corpus = str(ASSETS / "tinystories-valid-sample")
    calib_data = DataConfig("tinystories", "validation", path=corpus, max_documents=3000)
    ids, digest = sample_calibration(CalibConfig(calib_data, nsamples=16, seqlen=256, seed=0),
                                     tok, None)
    stream = tokenize_corpus(DataConfig("tinystories", "validation", path=corpus), tok, None,
                             preset="gptq")
    return model, ids, digest, stream[-4096:]


@pytest.mark.parametrize("fmt", ["mxint4_b32", "mxint3_b32",
                                 "int4_g128", "int3_g128"])
def test_gptq_beats_rtn_per_layer_and_in_nll(stories, fmt):
    model, ids, digest, held = stories
    ev = EvalConfig(seqlen=256, batch_size=8)
    rtn_model = copy.deepcopy(model)
    quantize(rtn_model, RTNConfig(format=fmt))
    gptq_model = copy.deepcopy(model)
    report = quantize(gptq_model, GPTQConfig(format=fmt, device="cpu"),
                      QuantContext(calibration=ids, calibration_hash=digest))
    assert len(report.layers) == 35
    for layer in report.layers:
        assert layer["out_err_gptq"] <= layer["out_err_rtn"], layer["name"]
    nll_rtn = measure_perplexity(rtn_model, held, ev).nll
    nll_gptq = measure_perplexity(gptq_model, held, ev).nll
    assert nll_gptq < nll_rtn, (nll_gptq, nll_rtn)
