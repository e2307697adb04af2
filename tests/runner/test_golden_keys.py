"""Golden keys: every committed record's job key is reproduced from its own stored config.

A change to the key code (a new field, a default, an identity rule) that would re-key the
committed studies, and so make a re-launch redo them, fails here. The configs are rebuilt
through the same typed schemas the runner uses (``RunConfig`` and the method's config class),
from ``job_config(record)``: the stored config with the format name put back (a record stores
it once, in ``format.name``; store/schema.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptqscale.methods import get_method
from ptqscale.metrics.registry import resolve_metrics
from ptqscale.runner import keys
from ptqscale.runner.config import RunConfig
from ptqscale.store import job_config

RESULTS = Path(__file__).resolve().parents[2] / "results"
STUDIES = sorted(p.parent.name for p in RESULTS.glob("*/records"))
# Not part of the semantic config or added after these records were written.
_DROP = ("paths", "wandb")


def _records(study: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / study / "records").glob("*.json"))]


def _typed(config: dict):
    """The record's resolved config as typed objects (paths and tracking left at defaults)."""
    config = {k: v for k, v in config.items() if k not in _DROP}
    method_cls, _ = get_method(config["method"]["name"])
    root = OmegaConf.structured(RunConfig)
    root.method = OmegaConf.structured(method_cls)
    merged = OmegaConf.merge(root, config)
    return {k: OmegaConf.to_object(merged[k]) if k in ("model", "data", "eval", "method",
                                                       "calib", "landscape") else merged[k]
            for k in merged if k in config}


def _recomputed_key(record: dict) -> str:
    c = _typed(job_config(record))
    method = c["method"]
    calib = c["calib"] if method.uses_calibration else None
    landscape = c["landscape"] if c["landscape"].enabled else None
    names = c.get("metrics")   # a non-default metric set is in the key (metrics/registry.py)
    metrics = resolve_metrics(names) if names is not None else None
    return keys.job_key(c["study"], c["model"], c["data"], c["eval"], method, calib, landscape,
                        c["seed"], metrics=metrics)


def test_there_are_committed_studies():
    assert {"family_scan", "awq", "crossquant", "blockft"} <= set(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_committed_keys_are_reproduced(study):
    records = _records(study)
    assert records
    wrong = [(r["job_key"], _recomputed_key(r)) for r in records
             if _recomputed_key(r) != r["job_key"]]
    assert not wrong, f"{len(wrong)} of {len(records)} keys of {study} changed, e.g. {wrong[:3]}"


# blockft's variants were five methods (conf/method/blockft_joint2.yaml, ...) when the study
# ran; they are now fields of the one method ``blockft``. The same settings keep their keys.
BLOCKFT_SPELLINGS = {
    "blockft_single": ["method=blockft"],
    "blockft_joint2": ["method=blockft", "method.variant=joint", "method.window=2"],
    "blockft_joint3": ["method=blockft", "method.variant=joint", "method.window=3"],
    "blockft_down1": ["method=blockft", "method.variant=downstream", "method.downstream=1"],
    "blockft_down2": ["method=blockft", "method.variant=downstream", "method.downstream=2"],
}


@pytest.mark.parametrize("old", sorted(BLOCKFT_SPELLINGS))
def test_a_blockft_variant_as_fields_has_the_key_of_its_old_method(composed, old):
    """``method=blockft method.variant=joint method.window=2`` is the job the study ran as
    ``method=blockft_joint2``: same key (a re-launch finds it), same name in the record."""
    from ptqscale.runner.job import validate_job

    (record,) = [r for r in _records("blockft") if r["method"]["name"] == old
                 and r["model"]["name"] == "stories260k" and r["config"]["format"] == "int2_g32"]
    spec = validate_job(composed(["+sweep=blockft", "model=stories260k", "data=gutenberg",
                                  "format=int2_g32", *BLOCKFT_SPELLINGS[old]]))
    assert (spec.key, spec.method.name) == (record["job_key"], old)


def test_the_blockft_study_finds_its_committed_records():
    """The study file's new method axis (sweeps/blockft_method) plans to the committed jobs."""
    from ptqscale.runner.plan import plan

    jobs = plan(["+sweep=blockft", "model=stories260k", f"paths.results={RESULTS}"])
    committed = {r["job_key"] for r in _records("blockft") if r["model"]["name"] == "stories260k"}
    assert len(jobs) == 16 and {j.state for j in jobs} == {"done"}
    assert {j.key for j in jobs} == committed
