"""Packaging and CLI: configs in the wheel, the Python floor, the version in records,
studies that are multiruns by themselves, ptqscale-plan's Hydra flags, a fast --help.
(The installed-wheel run from an unrelated folder is .ci/wheel, run by .ci/run.)"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptqscale.runner import plan as plan_module
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.environment import ptqscale_version

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted((ROOT / "sweeps").glob("*.yaml"))
METHOD_FILES = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
# stdlib names that exist only from Python 3.11 on (requires-python says >= 3.10)
PY311_ONLY = {("datetime", "UTC"), ("enum", "StrEnum"), ("typing", "Self"),
              ("typing", "LiteralString"), ("typing", "Never"), ("typing", "assert_never")}
PY311_MODULES = {"tomllib", "wsgiref.types"}


def test_requires_python_matches_the_code():
    """Nothing 3.11-only is imported anywhere (ExceptionGroup/except* are syntax, caught by
    the 3.10 compile test below)."""
    bad = []
    for path in [*ROOT.glob("src/**/*.py"), *ROOT.glob("analysis/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                bad += [f"{path}: from {node.module} import {a.name}" for a in node.names
                        if (node.module, a.name) in PY311_ONLY]
                bad += [f"{path}: {node.module}" for _ in [0] if node.module in PY311_MODULES]
            elif isinstance(node, ast.Import):
                bad += [f"{path}: import {a.name}" for a in node.names if a.name in PY311_MODULES]
            elif isinstance(node, ast.Name) and node.id in ("ExceptionGroup", "BaseExceptionGroup"):
                bad.append(f"{path}: {node.id}")
    assert not bad, bad
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()


def _python310() -> str | None:
    """A Python 3.10 that runs: pyenv's own builds first (its shim on PATH fails unless 3.10
    is selected, and HOME may not be where pyenv lives), then python3.10 on PATH."""
    roots = {Path(os.environ.get("PYENV_ROOT", "/nonexistent")), Path.home() / ".pyenv"}
    shim = shutil.which("python3.10")
    if shim and Path(shim).parent.name == "shims":  # pyenv on PATH: its root is the shims' parent
        roots.add(Path(shim).parent.parent)
    candidates = [str(p) for root in roots for p in sorted(root.glob("versions/3.10*/bin/python3.10"))]
    candidates += [shutil.which("python3.10")] if shutil.which("python3.10") else []
    for python in candidates:
        ok = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                            capture_output=True).returncode == 0
        if ok:
            return python
    return None


def test_sources_compile_on_python310(tmp_path):
    python = _python310()
    if python is None:
        pytest.skip("no python3.10 interpreter on this machine")
    out = subprocess.run([python, "-m", "compileall", "-q", "-d", str(tmp_path),
                          str(ROOT / "src"), str(ROOT / "analysis")],
                         capture_output=True, text=True, env={"PYTHONPYCACHEPREFIX": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr


def test_records_carry_the_ptqscale_version():
    from ptqscale.runner.environment import environment

    assert environment()["ptqscale"] == ptqscale_version() == version("ptqscale")


@pytest.mark.parametrize("study", [p.stem for p in STUDIES])
def test_every_study_is_a_multirun_by_itself(study):
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={study}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert OmegaConf.select(cfg, "hydra.sweeper.params"), study


def test_plan_accepts_hydra_config_dir(tmp_path, capsys):
    """A study in the user's own folder (-cd), with ptqscale's groups still found."""
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nstudy: mine\npaths:\n  results: " + str(tmp_path / "results")
        + "\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      method: rtn\n"
        "      format: int8,int4_g32\n")
    rc = plan_module.main(["-cd", str(tmp_path), "+sweep=mine", "-m"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 jobs: 0 done, 0 failed, 2 pending" in out, out
    assert "mine/stories260k/tinystories/int4_g32/rtn" in out
    rc = plan_module.main(["--config-dir", str(tmp_path / "absent"), "+sweep=mine"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --config-dir") and "not a folder" in err[-1]


def test_help_is_fast_lists_methods_by_name_and_imports_no_torch():
    code = ("import sys; sys.argv = ['ptqscale-run', '--help']\n"
            "from ptqscale.runner.app import main; main()\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    methods = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("method "))
    assert methods.split()[1:] == [f"{m}," for m in METHOD_FILES[:-1]] + [METHOD_FILES[-1]]
    assert "ptqscale-run +sweep=quickstart" in out.stdout
    assert "_schema" not in out.stdout and "method_common" not in out.stdout
    assert "quickstart" in out.stdout.split("Studies")[1]


def test_tab_completion_lists_the_methods_not_their_schemas():
    """Hydra's completion (``eval "$(ptqscale-run -sc install=bash)"``) offers exactly the
    method files for ``method=``; the schemas are root-level configs, which it never lists."""
    def complete(line: str) -> list[str]:
        out = subprocess.run([sys.executable, "-m", "ptqscale.runner.app", "-sc", "query=bash"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "COMP_LINE": f"ptqscale-run {line}"})
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("method=") == [f"method={m}" for m in METHOD_FILES]
    assert not [w for w in complete("") if "schema" in w or "common" in w]


def test_bad_ptqscale_conf_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQSCALE_CONF", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PTQSCALE_CONF"):
        conf_dir()


@pytest.mark.slow
def test_wheel_ships_conf_and_sweeps_once(tmp_path):
    """Every file of conf/ and sweeps/ is in the wheel under ptqscale/conf, exactly once."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("ptqscale-*.whl"))).namelist()
    conf = [n for n in names if n.startswith("ptqscale/conf/")]
    expected = {f"ptqscale/conf/{p.relative_to(ROOT / 'conf')}"
                for p in (ROOT / "conf").rglob("*.yaml") if "sweep" not in p.parts}
    expected |= {f"ptqscale/conf/sweep/{p.relative_to(ROOT / 'sweeps')}"
                 for p in (ROOT / "sweeps").rglob("*.yaml")}
    assert sorted(conf) == sorted(expected)
    # the Hydra sweeper plugin, found by Hydra under the hydra_plugins namespace
    assert "hydra_plugins/ptqscale_sweeper/ptqscale_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names


def test_group_key_overrides_reach_every_job_of_a_multirun():
    """``-m method=a,b method.batch_size=4``: the key goes to each job, not to the master
    config's default method (which has no batch_size)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ptqscale.runner.cli import per_job_overrides

    groups = {"method", "model"}
    args = ["-m", "method=gptq,blockft", "method.batch_size=4", "format=int8",
            "method.lr=1e-4,1e-3", "hydra.verbose=true", "model.dtype=float32"]
    out = per_job_overrides(args, groups)
    assert out == ["-m", "method=gptq,blockft", "method.batch_size=choice(4)",
                   "format=int8", "method.lr=1e-4,1e-3", "hydra.verbose=true",
                   "model.dtype=choice(float32)"]
    assert per_job_overrides(["method.iters=50"], groups) == ["method.iters=50"]  # one run
    assert per_job_overrides(["+sweep=blockft", "method.iters=5"], groups)[1] == \
        "method.iters=choice(5)"                # a study file is a multirun by itself
    parsed = OverridesParser.create().parse_overrides(out[1:4])
    assert not any(o.is_sweep_override() is False and o.key_or_group == "method.batch_size"
                   for o in parsed)             # left out of the master composition
    jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    assert [j for j in jobs if "method.batch_size=4" in j] == jobs and len(jobs) == 2
