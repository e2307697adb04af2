"""Records -> frame: derived columns checked against the records they come from."""

import json
from pathlib import Path

import numpy as np
import pytest

from ptqscale.files import atomic_write_json
from ptqscale.store import RECORD_SCHEMA_VERSION, record_path, upgrade, write_record
from ptqscale_analysis.cli import fit_main
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import load_study, load_wandb

COMMITTED = Path(__file__).resolve().parents[2] / "results" / "awq" / "records"


def test_derived_columns(synth_frame):
    f = synth_frame
    assert len(f) == 2 * 5 * (8 * 2 + 1)
    np.testing.assert_allclose(f["dnll"], f["metrics.nll"] - f["metrics.nll_fp"])
    np.testing.assert_allclose(f["dnll"], f["metrics.dnll"], atol=1e-12)
    np.testing.assert_allclose(f["params.non_quantized"], f["params.total"] - f["params.quantized"])
    np.testing.assert_allclose(f["params.non_embedding"], f["params.blocks"])
    assert f.loc[f["format.name"] == "bf16", "is_baseline"].all()
    assert not f.loc[f["format.name"] != "bf16", "is_baseline"].any()
    # GPTQ rows carry the SQNR of the RTN record of the same (model, format)
    rtn = f[f["method.name"] == "rtn"].set_index(["model.name", "format.name"])
    gptq = f[f["method.name"] == "gptq"].set_index(["model.name", "format.name"])
    np.testing.assert_allclose(gptq["rtn_sqnr_db"],
                               rtn.loc[gptq.index, "metrics.weight_sqnr_db"])


def test_model_bytes_computed_when_not_recorded(tmp_path):
    rec = {"job_key": "k1", "study": "s", "status": "complete",
           "model": {"name": "m", "family": "f", "size": "1"},
           "format": {"name": "mxfp4", "family": "mx", "bits_per_weight": 4.25},
           "method": {"name": "rtn"}, "metrics": {"nll": 3.1, "nll_fp": 3.0},
           "params": {"total": 1000, "quantized": 800}}
    write_record(tmp_path, rec)
    f = load_study(tmp_path, "s")
    assert f["model_bytes"].iloc[0] == pytest.approx(800 * 4.25 / 8 + 200 * 2)
    assert f["bits_per_param"].iloc[0] == pytest.approx(8 * (425 + 400) / 1000)
    assert f["dnll"].iloc[0] == pytest.approx(0.1)


def test_empty_store_and_unknown_study(tmp_path, synth_root):
    with pytest.raises(AnalysisError, match="the store is empty"):
        load_study(tmp_path, "quickstart")
    with pytest.raises(AnalysisError, match=r"studies with records: \['synth'\]"):
        load_study(synth_root, "nope")
    with pytest.raises(AnalysisError, match="results folder not found"):
        load_study(tmp_path / "missing", "x")


def test_missing_columns_named(tmp_path):
    write_record(tmp_path, {"job_key": "a", "study": "s", "status": "complete",
                            "metrics": {"nll": 1.0}})
    with pytest.raises(AnalysisError, match="lack the columns.*metrics.nll_fp"):
        load_study(tmp_path, "s")


def test_old_and_new_record_layouts_load_alike(tmp_path, capsys):
    """A study may hold version-1 records (five copies of the format name, committed and
    never rewritten) next to new ones (the name once, in format.name)."""
    old = json.loads(min(COMMITTED.glob("*.json")).read_text())
    assert old["schema_version"] == 1 and old["method"]["format"] == old["format"]["name"]
    atomic_write_json(record_path(tmp_path, "awq", old["job_key"]), old)
    write_record(tmp_path, {**upgrade(old), "job_key": "new"})
    frame = load_study(tmp_path, "awq")
    assert frame["schema_version"].tolist() == [1, RECORD_SCHEMA_VERSION]
    assert frame["format.name"].tolist() == [old["format"]["name"]] * 2
    assert frame["dnll"].iloc[0] == frame["dnll"].iloc[1]
    # a record of a newer layout: one line, exit 2
    atomic_write_json(record_path(tmp_path, "awq", "newer"),
                      {**old, "job_key": "newer", "schema_version": RECORD_SCHEMA_VERSION + 1})
    assert fit_main(["--results", str(tmp_path), "--study", "awq"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "newer.json: schema_version=" in err
    assert "upgrade ptqscale" in err


class _Run:
    def __init__(self, i, study):
        self.id = f"run{i}"
        self.config = {"study": study, "status": "complete", "_wandb": {"x": 1},
                       "model": {"name": f"m{i}", "family": "f", "size": str(i)},
                       "format": {"name": "int4", "bits_per_weight": 4.0},
                       "method": {"name": "rtn"}, "params": {"total": 100 * (i + 1)}}
        self.summary = {"metrics/nll": 3.0 + i, "metrics/nll_fp": 2.5 + i, "_step": 3}


class _Api:
    def __init__(self):
        self.asked = None

    def runs(self, path, filters=None):
        self.asked, self.filters = path, filters
        runs = [_Run(0, "a"), _Run(1, "a"), _Run(2, "b")]
        study = (filters or {}).get("config.study")  # what the server does with the filter
        return [r for r in runs if study is None or r.config["study"] == study]


def test_load_wandb_with_a_fake_api():
    api = _Api()
    f = load_wandb("ent/proj", study="a", api=api)
    assert api.asked == "ent/proj"
    # filtered on the server: the study's job runs only, never the study report run
    assert api.filters == {"config.study": "a", "jobType": {"$ne": "report"}}
    assert sorted(f["model.name"]) == ["m0", "m1"]
    np.testing.assert_allclose(f["dnll"], 0.5)
    assert "_step" not in f and "wandb.run_id" in f
    with pytest.raises(AnalysisError, match="no complete records for study 'zzz'"):
        load_wandb("ent/proj", study="zzz", api=api)
