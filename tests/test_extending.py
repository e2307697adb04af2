"""docs/extending.md, done for real: a new method is one module plus one config file, a new
model family one config file, and each runs a job end to end.

The method module and the config files are written to a temporary folder, exactly as a
contributor would write them into src/ptqscale/methods/ and conf/: the module is found by
the package's own discovery (its folder added to the package path), the configs through
Hydra's ``--config-dir`` search path (``ptqscale-run -cd``). A metric is demonstrated in
tests/metrics/test_metric_registry.py, a format's fast-path guard in
tests/formats/test_formats_kernel_spec.py.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

import ptqscale.methods as methods_pkg
from ptqscale.methods import METHODS
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job
from ptqscale.runner.planner import compose, hydra_context

FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false", "wandb.mode=disabled"]

# src/ptqscale/methods/rtn_clip.py, as docs/extending.md writes it
METHOD_MODULE = '''
"""RTN after clipping each row of a weight at ``clip`` times its absolute maximum."""

from dataclasses import dataclass

import torch

from ptqscale.formats import get_format
from ptqscale.methods.base import (MethodConfig, QuantReport, layer_stats, register_method,
                                   select_targets)


@dataclass
class RTNClipConfig(MethodConfig):
    name: str = "rtn_clip"
    clip: float = 0.9  # fraction of each row's absolute maximum kept


@register_method("rtn_clip", RTNClipConfig)
def quantize_rtn_clip(model, cfg, ctx) -> QuantReport:
    from ptqscale.models import get_anatomy

    fmt = get_format(cfg.format)
    report = QuantReport(method="rtn_clip", format=fmt.name)
    for name, module in select_targets(model, get_anatomy(model), cfg.targets).items():
        w = module.weight.data
        bound = cfg.clip * w.abs().amax(dim=1, keepdim=True)
        with torch.no_grad():
            q = fmt.fake_quantize(torch.maximum(torch.minimum(w, bound), -bound))
        report.layers.append(layer_stats(name, w, q, fmt.padding_needed(w.shape[-1])))
        module.weight.data.copy_(q)
    return report
'''

# conf/method/rtn_clip.yaml
METHOD_CONFIG = """\
# RTN after clipping each row at clip x its absolute maximum (src/ptqscale/methods/rtn_clip.py).
defaults:
  - /rtn_clip_schema
  - /method_common
  - _self_
name: rtn_clip
clip: 0.9
"""

# conf/model/my-stories.yaml: a family of one member (stories260K under another name)
MODEL_CONFIG = """\
name: my-stories
family: my-family
size: 260k
path: ${paths.data}/models/stories260K/stories260K.gguf
revision: null
dtype: float32
device: auto
allow_pickle: false
trust_remote_code: false
tokenizer: null
max_seqlen: 512
placement: one
max_gpu_memory: null
gpus: null
reuse: true
stand_in: false
"""


@pytest.fixture
def contributed(tmp_path, monkeypatch):
    """The contributor's three files in a folder; the method discovered, the configs found."""
    package = tmp_path / "methods"
    package.mkdir()
    (package / "rtn_clip.py").write_text(textwrap.dedent(METHOD_MODULE))
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "model").mkdir()
    (conf / "method" / "rtn_clip.yaml").write_text(METHOD_CONFIG)
    (conf / "model" / "my-stories.yaml").write_text(MODEL_CONFIG)
    monkeypatch.setattr(methods_pkg, "__path__", [*methods_pkg.__path__, str(package)])
    methods_pkg._discover()
    register_configs()
    try:
        with hydra_context(config_dir=str(conf)):
            yield lambda overrides: compose([*FAST, f"paths.results={tmp_path / 'results'}",
                                             *overrides])
    finally:
        METHODS.pop("rtn_clip", None)
        sys.modules.pop("ptqscale.methods.rtn_clip", None)


@pytest.mark.slow
def test_a_new_method_is_one_module_and_one_config_file(contributed):
    clipped = run_job(contributed(["method=rtn_clip", "format=int4_g32"]))
    unclipped = run_job(contributed(["method=rtn_clip", "format=int4_g32", "method.clip=1.0"]))
    rtn = run_job(contributed(["method=rtn", "format=int4_g32"]))
    assert clipped["status"] == "complete" and clipped["method"]["clip"] == 0.9
    # clipping at the absolute maximum clips nothing: exactly RTN
    assert unclipped["metrics"]["nll"] == rtn["metrics"]["nll"]
    assert clipped["metrics"]["nll"] != rtn["metrics"]["nll"]
    assert len({clipped["job_key"], unclipped["job_key"], rtn["job_key"]}) == 3


@pytest.mark.slow
def test_a_new_model_family_is_one_config_file(contributed):
    mine = run_job(contributed(["model=my-stories", "method=rtn", "format=int8"]))
    reference = run_job(contributed(["model=stories260k", "method=rtn", "format=int8"]))
    assert mine["model"]["family"] == "my-family" and mine["job_key"] != reference["job_key"]
    assert mine["metrics"]["nll"] == reference["metrics"]["nll"]  # the same weights
