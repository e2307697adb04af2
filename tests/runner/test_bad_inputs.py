"""The bad-input catalogue: every case ends in exit status 2 with one line ``error: ...``
on stderr that names the key or file, no traceback, no model load, nothing written under
the results folder. Cases run in-process (the CLIs' ``main`` with a patched ``sys.argv``);
a few run as real subprocesses to prove the exit status and stderr end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from ptqscale.runner import app, outcomes

XZ_EMPTY = b"\xfd7zXZ\x00\x00"   # a truncated xz stream


def _corpora(root):
    """Bad corpus files: (case id, file name, bytes)."""
    return {"binary": ("bin.txt", b"hello\x00\x01\x02" * 50),
            "latin1": ("latin.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50),
            "blank": ("blank.txt", b"   \n\n\t  \n"),
            "empty": ("empty.txt", b""),
            "truncated_xz": ("test.jsonl.xz", XZ_EMPTY),
            "shorter_than_a_window": ("short.txt", b"Once upon a time. " * 20)}


# (overrides, text that the one-line message must contain)
RUN_CASES = [
    # unknown keys, at every level
    (["+foo=1"], "foo"), (["+foo.bar=1"], "foo"), (["+Study=x"], "Study"),
    (["model.foo=1"], "foo"), (["+model.foo=1"], "foo"), (["data.foo=1"], "foo"),
    (["+data.foo=1"], "foo"), (["eval.foo=1"], "foo"), (["+eval.foo=1"], "foo"),
    (["+method.foo=1"], "foo"), (["+calib.foo=1", "method=gptq"], "foo"),
    (["+landscape.foo=1"], "foo"), (["+paths.foo=1"], "foo"), (["+wandb.foo=1"], "foo"),
    (["+calib.data.foo=1", "method=gptq"], "foo"), (["method.fooo=1", "method=rtn"], "fooo"),
    (["+method.damp=1", "method=rtn"], "damp"), (["eval.seqln=128"], "seqln"),
    # study names
    (["study=../../x"], "study"), (["study=/abs"], "study"), (["study="], "study"),
    (["study='a b'"], "study"), (["study=.hidden"], "study"), (["study=a/b"], "study"),
    (["study=.."], "study"), (["study=é"], "study"), (["study='x;y'"], "study"),
    (["study=a*"], "study"),
    # group choices
    (["model=nope"], "model"), (["data=nope"], "data"), (["eval=nope"], "eval"),
    (["method=nope"], "method"), (["calib=nope"], "calib"), (["landscape=nope"], "landscape"),
    (["+sweep=nope"], "sweep"), (["model=stories260K"], "model"),
    # types
    (["eval.seqlen=abc"], "eval.seqlen"), (["eval.seqlen=1.5"], "eval.seqlen"),
    (["eval.max_tokens=abc"], "eval.max_tokens"), (["seed=abc"], "seed"),
    (["progress=maybe"], "progress"), (["exclusive_gpu=maybe"], "exclusive_gpu"),
    (["landscape.enabled=maybe"], "landscape.enabled"),
    (["calib.nsamples=abc", "method=gptq"], "calib.nsamples"),
    (["calib.seqlen=abc", "method=gptq"], "calib.seqlen"),
    (["model.max_seqlen=abc"], "model.max_seqlen"),
    # values
    (["eval.seqlen=100000"], "eval.seqlen"), (["eval.seqlen=513"], "eval.seqlen"),
    (["calib.seqlen=100000", "method=gptq"], "calib.seqlen"),
    (["calib.seqlen=1000", "method=gptq"], "calib.seqlen"),
    (["calib.seqlen=1", "method=gptq"], "calib.seqlen"),
    (["wandb.mode=sometimes"], "wandb.mode"), (["wandb.mode=ONLINE"], "wandb.mode"),
    (["method=rtn", "format=int9"], "format"), (["method=rtn", "format=int1"], "format"),
    (["method=rtn", "format=foo"], "format"), (["method=rtn", "format=mxfp5"], "format"),
    (["method=rtn", "format=INT8"], "format"), (["method=rtn", "format=int4_g1"], "format"),
    (["method=rtn", "format=fp8_e9m9"], "format"), (["method=rtn", "format=nf4_b1"], "format"),
    (["method=rtn", "format=int8_x"], "format"), (["method=rtn", "format="], "format"),
    (["method=gptq", "format=int9"], "format"), (["method=awq", "format=bogus"], "format"),
    (["method=rtn", "format=mxint9_b32"], "format"), (["method=rtn", "format=int4_g0"], "format"),
    # blockft's variant is a field; window and downstream must fit it; the old names are gone
    (["method=blockft", "method.variant=joint"], "method.window>=2"),
    (["method=blockft", "method.variant=triple"], "method.variant='triple'"),
    (["method=blockft", "method.window=2"], "variant=single"),
    (["method=blockft", "method.variant=downstream"], "method.downstream>=1"),
    (["method=blockft", "method.variant=joint", "method.window=2", "method.stride=3"],
     "stride"),
    (["method=blockft_joint2"], "blockft"),
    (["metrics=[nll,bogus]"], "bogus"), (["metrics=[weight_sqnr]"], "nll"),
    (["metrics=[nll,nll]"], "twice"), (["metrics=nll"], "metrics"),
    # data and files
    (["data.split=nope"], "split"), (["data.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["data.name=nope"], "nope"), (["data=gutenberg", "data.split=train2"], "split"),
    (["calib.data.path=/nonexistent/calib", "method=gptq"], "/nonexistent/calib"),
    (["calib.data.split=nope", "method=gptq"], "split"),
    (["data=wikitext2", "data.path=/nonexistent/wt"], "/nonexistent/wt"),
    (["model.path=/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["model=gutenberg-llama-200k", "model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["paths.data=/nonexistent/data"], "/nonexistent/data"),
    (["paths.zoo=/nonexistent/zoo", "model=gutenberg-llama-200k"], "/nonexistent/zoo"),
]
# the window is eval.seqlen's: a short calibration corpus is the calibration sampler's to refuse
CORPUS_CASES = list(_corpora(None))
ANALYSIS_CASES = [
    ("fit_main", ["--study", "../x"], "study"), ("fit_main", ["--study", "/abs"], "study"),
    ("fit_main", ["--study", ""], "study"), ("fit_main", ["--study", "nope"], "nope"),
    ("pareto_main", ["--study", "nope", "--budget", "1GB"], "nope"),
    ("pareto_main", ["--study", "../x", "--budget", "1GB"], "study"),
    ("predict_main", ["--study", "nope", "--format", "int8", "--method", "rtn"], "nope"),
    ("predict_main", ["--study", "a b", "--format", "int8", "--method", "rtn"], "study"),
    ("report_main", ["--study", "nope"], "nope"), ("report_main", ["--study", ".x"], "study"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    import ptqscale.models

    def refuse(*a, **k):
        raise AssertionError("a bad input reached load_model")

    monkeypatch.setattr(ptqscale.models, "load_model", refuse)


def run_in_process(argv, monkeypatch, capsys, main=app.main, prog="ptqscale-run"):
    GlobalHydra.instance().clear()
    outcomes._IN_PROCESS.clear()
    outcomes._SWEEP_EXIT.clear()
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        main()
    GlobalHydra.instance().clear()
    return stop.value.code, capsys.readouterr().err


def check(code, err, expect, results):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    assert expect.lower() in errors[0].lower(), errors[0]
    written = [p for p in results.rglob("*")] if results.exists() else []
    assert not written, written


@pytest.mark.parametrize("overrides,expect", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_run_rejects(overrides, expect, tmp_path, monkeypatch, capsys, no_model_load):
    results = tmp_path / "results"
    code, err = run_in_process([*overrides, f"paths.results={results}", "wandb.mode=disabled"]
                               if not any(o.startswith("wandb.") for o in overrides)
                               else [*overrides, f"paths.results={results}"],
                               monkeypatch, capsys)
    check(code, err, expect, results)


@pytest.mark.parametrize("case,role", [(c, r) for c in CORPUS_CASES for r in ("data", "calib")
                                       if (c, r) != ("shorter_than_a_window", "calib")])
def test_run_rejects_bad_corpus_files(case, role, tmp_path, monkeypatch, capsys, no_model_load):
    name, content = _corpora(tmp_path)[case]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / name).write_bytes(content)
    results = tmp_path / "results"
    corpus_name = "gutenberg" if name.endswith(".xz") else "tinystories"
    split = "test" if name.endswith(".xz") else "valid"
    key = "data" if role == "data" else "calib.data"
    extra = ["method=gptq"] if role == "calib" else []
    code, err = run_in_process([*extra, f"{key}.name={corpus_name}", f"{key}.split={split}",
                                f"{key}.path={corpus}", f"paths.results={results}",
                                "wandb.mode=disabled"], monkeypatch, capsys)
    check(code, err, str(corpus), results)


@pytest.mark.parametrize("entry,args,expect", ANALYSIS_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in ANALYSIS_CASES])
def test_analysis_clis_reject(entry, args, expect, tmp_path, monkeypatch, capsys):
    from ptqscale_analysis import cli

    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(sys, "argv", [entry, "--results", str(results), *args])
    code = getattr(cli, entry)([ "--results", str(results), *args])
    err = capsys.readouterr().err
    check(code, err, expect, results)


PLAN_CASES = [(["model=nope"], "model"), (["+sweep=nope"], "sweep"), (["seed=abc"], "seed"),
              (["eval.seqlen=abc"], "eval.seqlen")]


@pytest.mark.parametrize("overrides,expect", PLAN_CASES, ids=[" ".join(c[0]) for c in PLAN_CASES])
def test_plan_rejects(overrides, expect, tmp_path, capsys):
    from ptqscale.runner import plan

    results = tmp_path / "results"
    GlobalHydra.instance().clear()
    code = plan.main([*overrides, f"paths.results={results}"])
    GlobalHydra.instance().clear()
    check(code, capsys.readouterr().err, expect, results)


def test_the_end_of_a_sweep_lists_every_failure_and_busy_job():
    text, status = outcomes.report([
        {"status": "complete", "name": "a"}, {"status": "busy", "name": "b", "reason": "pid 7"},
        {"status": "failed", "name": "c", "reason": "boom"},
        {"status": "invalid", "name": "d", "reason": "format='int9'\n is bad"}])
    assert status == 1
    assert text.splitlines() == ["4 jobs: 1 complete, 1 failed, 1 invalid, 1 running elsewhere",
                                 "  RUNNING ELSEWHERE b: pid 7", "  FAILED c: boom",
                                 "  INVALID d: format='int9' is bad"]
    assert outcomes.report([{"status": "complete"}, {"status": "busy"}])[1] == 0


@pytest.mark.parametrize("overrides,expect", [(["+foo=1"], "foo"), (["study=../x"], "study"),
                                              (["eval.seqlen=abc"], "eval.seqlen")])
def test_end_to_end_exit_status_and_stderr(overrides, expect, tmp_path):
    results = tmp_path / "results"
    out = subprocess.run([sys.executable, "-m", "ptqscale.runner.app", *overrides,
                          f"paths.results={results}", "wandb.mode=disabled"],
                         capture_output=True, text=True, timeout=120)
    check(out.returncode, out.stderr, expect, results)


def test_debug_keeps_the_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ptqscale.runner.app", "--debug", "+foo=1",
                          f"paths.results={tmp_path}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "foo" in out.stderr
