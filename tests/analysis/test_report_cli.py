"""The report renders (PNG figures open) and every script fails clearly on bad input."""

import subprocess
import sys

import matplotlib.image as mpimg
import pytest
from PIL import Image

from ptqscale_analysis.cli import fit_main, pareto_main, predict_main, report_main

FAST = ["--n-boot", "10", "--n-estimators", "10"]


@pytest.fixture(scope="module")
def one_size_root(tmp_path_factory, study_factory):
    root = tmp_path_factory.mktemp("one")
    study_factory(root, study="one", sizes={"8m": 8e6}, formats=("int4_g128", "mxfp4"))
    return root


@pytest.mark.slow  # two cross-validations and six PNGs: ~10 s on 2 idle cores
def test_report_renders_with_figures(small_root, tmp_path, capsys):
    assert report_main(["--results", str(small_root), "--study", "small",
                        "--out", str(tmp_path), *FAST]) == 0
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for section in ("## Fitted laws", "## Predictor", "### Leave-one-size-out",
                    "### Leave-one-family-out", "## Pareto frontier", "## Figures"):
        assert section in md
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"nll_vs_params", "dnll_vs_sqnr", "pareto",
                                      "predicted_vs_measured_size"}
    for p in pngs:
        assert f"({p.relative_to(tmp_path)})" in md and f"src='{p.relative_to(tmp_path)}'" in html
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0  # not blank
        with Image.open(p) as im:
            assert im.mode == "P"   # 256 colours: a third of the bytes
    assert "noise-response curves' skipped: no noise-response features" in md
    assert "wrote" in capsys.readouterr().out


def test_report_on_one_size_says_why_laws_are_missing(one_size_root, tmp_path):
    assert report_main(["--results", str(one_size_root), "--study", "one",
                        "--out", str(tmp_path), *FAST]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "No law could be fitted" in md
    assert "one model size ([" in md and "no size law" in md
    assert "Leave-one-size-out skipped" in md
    assert (tmp_path / "figures" / "pareto.png").is_file()


def test_fit_prints_laws(small_root, capsys):
    assert fit_main(["--results", str(small_root), "--study", "small", "--n-boot", "5"]) == 0
    out = capsys.readouterr().out
    assert "noise: dNLL = K * N^-gamma * 10^(-SQNR/10)" in out and "family=zoo" in out


def test_predict_and_pareto_print_answers(small_root, tmp_path, capsys):
    saved = tmp_path / "rf.json"
    args = ["--results", str(small_root), "--study", "small", "--n-estimators", "10",
            "--predictor", str(saved)]
    assert predict_main([*args, "--model", "zoo-8m", "--format", "mxfp4",
                         "--method", "gptq"]) == 0
    assert saved.is_file()
    assert pareto_main([*args, "--budget", "20MB"]) == 0  # loads the saved predictor
    out = capsys.readouterr().out
    assert "zoo-8m mxfp4 gptq: NLL" in out and "features used:" in out
    assert "best measured:" in out and "best predicted:" in out


def _err(main, argv, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_error_paths_exit_2_with_a_message(tmp_path, one_size_root, small_root, capsys):
    err = _err(fit_main, ["--results", str(tmp_path), "--study", "quickstart"], capsys)
    assert err.startswith("error: no complete records for study 'quickstart'")
    assert "the store is empty" in err
    err = _err(fit_main, ["--results", str(one_size_root), "--study", "one"], capsys)
    assert "no law could be fitted" in err and "got 1" in err
    err = _err(predict_main, ["--results", str(small_root), "--study", "small", "--model",
                              "zoo-8m", "--format", "fp3_e1m1", "--method", "rtn",
                              "--n-estimators", "5"], capsys)
    assert "format 'fp3_e1m1' was never seen" in err
    err = _err(pareto_main, ["--results", str(small_root), "--study", "small",
                             "--budget", "lots"], capsys)
    assert "cannot read the budget 'lots'" in err
    err = _err(predict_main, ["--results", str(small_root), "--study", "small", "--format",
                              "mxfp4", "--method", "rtn", "--feature", "kappa"], capsys)
    assert "--feature takes KEY=NUMBER" in err


def test_console_entry_point_has_no_traceback(tmp_path):
    code = "import sys; from ptqscale_analysis.cli import fit_main; sys.exit(fit_main())"
    out = subprocess.run([sys.executable, "-c", code, "--results", str(tmp_path), "--study",
                          "x"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_activation_schemes_table(tmp_path):
    import pandas as pd

    from ptqscale_analysis.load import activation_scheme
    from ptqscale_analysis.report import _activation_schemes, _Doc

    rows = []
    for scheme, alpha, nll, kernel in (("per_token", 0.15, 2.0, 0.3), ("crossquant", 0.15, 2.1, 0.2)):
        rows.append({"model.name": "m", "format.name": "int8", "method.name": "rtn",
                     "method.activations.granularity": scheme, "method.activations.alpha": alpha,
                     "method.activations.format": "int8", "metrics.nll": nll,
                     "quantization.activations.kernel_proportion": kernel})
    rows.append({"model.name": "m", "format.name": "int4_g128", "method.name": "gptq",
                 "method.activations.granularity": None, "metrics.nll": 2.5})
    frame = pd.DataFrame(rows).assign(activations=lambda d: activation_scheme(d))
    assert frame["activations"].tolist() == ["int8 per_token", "int8 crossquant a=0.15", "none"]
    doc = _Doc()
    _activation_schemes(doc, frame, tmp_path)
    md = doc.markdown()
    assert "## Activation quantization" in md
    assert "rtn/crossquant a=0.15" in md and "rtn/per_token" in md and "int8 / int8" in md
    assert "| m | int8 / int8 | 0.2000 | 0.3000 |" in md      # kernel proportions, 4 decimals
    assert "| m | int8 / int8 | 2.1000 | 2.0000 |" in md      # NLL: 4 decimals (W8A8 gaps)
    empty = _Doc()
    _activation_schemes(empty, frame.iloc[2:], tmp_path)
    assert empty.markdown().strip() == ""


def test_findings_pipe_tables_and_weight_only_frame(tmp_path):
    import pandas as pd

    from ptqscale_analysis.load import activation_scheme, weight_only
    from ptqscale_analysis.report import _Doc, _findings

    doc = _Doc()
    path = tmp_path / "findings.md"
    path.write_text("## Found\n\n| model | NLL |\n|---|---|\n| m | 2.5 |\n\n- a point\n")
    _findings(doc, path)
    md = doc.markdown()
    assert "| model | NLL |" in md and "| m | 2.5 |" in md and "- a point" in md
    frame = pd.DataFrame({"method.activations.granularity": [None, "per_token"], "x": [1, 2]})
    assert weight_only(frame.assign(activations=activation_scheme(frame)))["x"].tolist() == [1]
