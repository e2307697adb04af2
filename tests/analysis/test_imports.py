"""The analysis package runs without torch and reads only ptqscale.store (and the stdlib-only
file helpers the store writes with, ptqscale.files)."""

import pkgutil
import subprocess
import sys

import ptqscale_analysis


def test_no_module_imports_torch_or_more_of_ptqscale():
    modules = [f"ptqscale_analysis.{m.name}" for m in pkgutil.iter_modules(ptqscale_analysis.__path__)]
    assert {"ptqscale_analysis.cli", "ptqscale_analysis.report", "ptqscale_analysis.laws"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "ours = sorted(m for m in sys.modules if m.startswith('ptqscale.'))\n"
        "print(bad, ours)\n"
        "assert not bad, bad\n"
        "assert all(m.startswith('ptqscale.store') or m == 'ptqscale.files' for m in ours), ours\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
