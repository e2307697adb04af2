"""The seed papers' table layouts (paper_tables.py) on the committed toy-family studies, which
hold the same axes as the paper studies: family_scan (RTN/GPTQ x formats, two corpora, landscape)
as Xu's, blockft as Shabanovi's, crossquant as CrossQuant's. Fast: records only, no model.
(The paper studies themselves, on stand-ins: tests/runner/test_paper_studies.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import load_study
from ptqscale_analysis.paper_tables import paper_tables

RESULTS = Path(__file__).resolve().parents[2] / "results"


def _by_title(tables) -> dict:
    return {title: (table, notes) for title, table, notes in tables}


def test_xu_tables_one_per_corpus_never_averaged():
    frame = load_study(RESULTS, "family_scan")
    tables = _by_title(paper_tables(frame, "xu2024"))
    rtn, notes = tables["NLL (nats) after RTN: model x format (wikitext2)"]
    assert "NLL (nats) after RTN: model x format (gutenberg)" in tables
    assert not notes   # one record per cell: nothing averaged
    sizes = frame.drop_duplicates("model.name").set_index("model.name")["params.total"]
    llama = [m for m in rtn["model"] if m.startswith("gutenberg-llama")]
    assert llama == sorted(llama, key=sizes.get)   # models by size within a family
    bits = frame.groupby("format.name")["bits_per_weight"].first()
    fmts = list(rtn.columns[2:])
    assert rtn.columns[1] == "full precision"
    assert [bits[f] for f in fmts] == sorted((bits[f] for f in fmts), reverse=True)
    rec = frame[(frame["data.name"] == "wikitext2") & (frame["method.name"] == "rtn")
                & (frame["model.name"] == "gutenberg-llama-2m")
                & (frame["format.name"] == "mxint3_b128")].iloc[0]
    row = rtn.set_index("model").loc["gutenberg-llama-2m"]
    assert row["mxint3_b128"] == f"{rec['metrics.nll']:.4f}"
    assert row["full precision"] == f"{rec['metrics.nll_fp']:.4f}"
    features, _ = tables["Scaling factors per model: size, pre-trained NLL, local loss "
                         "landscape (wikitext2)"]
    kappa = features.set_index("model").loc["gutenberg-llama-2m", "kappa"]
    assert math.isclose(float(kappa), rec["landscape.kappa"], rel_tol=1e-3)


def test_shabanovi_rows_are_the_variants_in_the_papers_order():
    frame = load_study(RESULTS, "blockft")
    tables = paper_tables(frame, "shabanovi2024")   # a table per format, more bits first
    assert [t[0] for t in tables] == [
        "Perplexity: block fine-tuning variant x model (int3_g32)",
        "Perplexity: block fine-tuning variant x model (int2_g32)",
        "Quantization time (s): block fine-tuning variant x model (int3_g32)",
        "Quantization time (s): block fine-tuning variant x model (int2_g32)"]
    _, ppl, notes = tables[0]
    assert not notes
    assert list(ppl["method"])[:7] == [
        "RTN", "GPTQ", "single block", "2 blocks jointly", "3 blocks jointly",
        "1 block, error 1 block down", "1 block, error 2 blocks down"]
    assert list(ppl.columns[1:3]) == ["gutenberg-llama-200k", "gutenberg-llama-500k"]
    rec = frame[(frame["method.name"] == "blockft_joint2") & (frame["format.name"] == "int3_g32")
                & (frame["model.name"] == "gutenberg-llama-500k")].iloc[0]
    assert ppl.iloc[3]["gutenberg-llama-500k"] == f"{math.exp(rec['metrics.nll']):.2f}"


def test_crossquant_rows_are_settings_and_schemes_columns_models():
    frame = load_study(RESULTS, "crossquant")
    tables = _by_title(paper_tables(frame, "crossquant2024"))   # gutenberg; tinystories
    ppl, _ = tables["Perplexity: W/A setting and activation scheme x model (gutenberg)"]
    acc, acc_notes = tables["Zero-shot accuracy (mean over the tasks asked): W/A setting and "
                            "scheme x model (gutenberg)"]
    assert "stories260k" not in ppl.columns   # its own corpus (tinystories), its own table
    assert list(ppl.columns[:2]) == ["W/A", "scheme"]
    assert ppl.iloc[0]["W/A"] == "full precision"
    settings = list(dict.fromkeys(ppl["W/A"][1:]))
    assert settings == ["W8A8", "W4A8-g128", "W4A4"]
    w8 = ppl[ppl["W/A"] == "W8A8"]["scheme"].tolist()
    assert w8[:3] == ["per-token", "SmoothQuant", "CrossQuant (alpha=0.15)"]
    assert acc is None and "no record holds" in acc_notes[0]   # the toy study ran no tasks


def test_unknown_table_name_is_refused():
    frame = load_study(RESULTS, "blockft")
    with pytest.raises(AnalysisError, match="no paper tables named 'xu2025'.*xu2024"):
        paper_tables(frame, "xu2025")


def test_report_cli_refuses_unknown_tables_before_any_work(capsys, tmp_path):
    from ptqscale_analysis.cli import report_main

    assert report_main(["--results", str(RESULTS), "--study", "blockft", "--tables", "xu2025",
                        "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tables 'xu2025'") and "shabanovi2024" in err
    assert not any(tmp_path.iterdir())   # nothing written
