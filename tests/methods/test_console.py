"""Progress bars, stage lines and silenced third-party noise (ptqscale.console).

Bars appear only where asked for and on a terminal; they never change a result; the known
third-party messages are dropped by their exact text and nothing else is.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings

import pytest
import torch

from ptqscale import console
from ptqscale.methods import AWQConfig, GPTQConfig, QuantContext, quantize
from ptqscale.metrics import EvalConfig, LandscapeConfig, measure_landscape, measure_perplexity


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stderr(monkeypatch):
    """Returns a function that points sys.stderr at a fake terminal or a plain pipe."""
    def use(tty: bool) -> io.StringIO:
        out = _Terminal() if tty else io.StringIO()
        monkeypatch.setattr("sys.stderr", out)
        return out
    return use


@pytest.mark.parametrize(("enabled", "tty", "drawn"),
                         [(True, True, True), (False, True, False), (True, False, False)])
def test_a_bar_only_where_asked_for_and_on_a_terminal(stderr, enabled, tty, drawn):
    out = stderr(tty)
    assert list(console.progress(range(5), "demo items", enabled)) == list(range(5))
    with console.bar(3, "demo hand", enabled) as b:
        for _ in range(3):
            b.update()
    text = out.getvalue()
    assert ("demo items" in text and "demo hand" in text) == drawn
    assert (text == "") == (not drawn)


def test_stage_lines_and_timings(caplog):
    timings = {}
    with caplog.at_level(logging.INFO, logger="ptqscale"), console.stage("demo", timings, "d"):
        pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage demo" and lines[1].startswith("stage demo: ")
    assert set(timings) == {"d"} and timings["d"] >= 0


def test_known_third_party_noise_is_silenced_and_nothing_else(caplog):
    console.quiet_third_party()
    console.quiet_third_party()  # idempotent: one filter, not two
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warnings.warn("torch.utils._pytree._register_pytree_node is deprecated. Please use "
                      "torch.utils._pytree.register_pytree_node instead.", UserWarning,
                      stacklevel=1)
        warnings.warn("something else is deprecated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    torchao = logging.getLogger("torchao")
    assert len(torchao.filters) == 1
    hf = logging.getLogger("transformers.configuration_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.configuration_utils"):
        hf.warning("Model config: pad_token_id must be `None` or an integer within the "
                   "vocabulary (between 0 and 511), got 4294967295.")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="torchao"):
        torchao.warning("Skipping import of cpp extensions due to incompatible torch version")
        torchao.warning("a real torchao problem")
    assert [r.getMessage() for r in caplog.records] == ["a real torchao problem"]


def test_method_and_eval_bars_change_no_result(stderr, tiny_llama):
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    stream = torch.randint(0, 128, (4 * 32 + 1,), generator=torch.Generator().manual_seed(1))
    eval_cfg = EvalConfig(seqlen=32, batch_size=2)
    results = {}
    for shown in (False, True):
        out = stderr(True)
        model = copy.deepcopy(tiny_llama)
        for cfg in (GPTQConfig(format="int4_g32"), AWQConfig(format="int4_g32")):
            quantize(model, cfg, QuantContext(calibration=calib, progress=shown))
        nll = measure_perplexity(model, stream, eval_cfg, progress=shown).nll
        results[shown] = (nll, [p.detach().clone() for p in model.parameters()])
        text = out.getvalue()
        for label in ("gptq int4_g32", "awq int4_g32", "ppl gptq/32"):
            assert (label in text) == shown, (label, shown)
    assert results[True][0] == results[False][0]
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))


def test_landscape_bars(stderr, tiny_llama):
    from ptqscale.models import get_anatomy

    out = stderr(True)
    batches = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    cfg = LandscapeConfig(levels_db=[30.0, 20.0], seeds=1, max_tokens=64, hutchinson_probes=2,
                          power_iters=2)
    targets = dict(get_anatomy(tiny_llama).targets)
    measure_landscape(tiny_llama, targets, batches, cfg, progress=True)
    text = out.getvalue()
    assert all(label in text for label in ("noise response", "hessian trace", "top eigenvalue"))
