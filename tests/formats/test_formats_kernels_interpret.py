"""The fused kernels checked on the CPU, where triton is installed (``pip install -e .[kernels]``;
CUDA builds of torch ship it): run by Triton's interpreter, bitwise the reference for every
covered format, dtype, layout and launch candidate on tiny tensors, and with NaN / +-inf
inputs (tests/formats/kernels_interpret_check.py); compiled for sm_90 without a GPU, with no
register spills (tests/formats/kernels_compile_check.py). Each runs in a subprocess: the
interpreter is chosen when the kernels are decorated, at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def _run(script: str, *args: str, **env) -> None:
    path = Path(__file__).with_name(script)
    out = subprocess.run([sys.executable, "-W", "ignore", str(path), *args], env=os.environ | env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_interpreted_kernels_are_bitwise_the_reference():
    _run("kernels_interpret_check.py", "finite", TRITON_INTERPRET="1")


@pytest.mark.slow
def test_interpreted_kernels_keep_non_finite_like_the_reference():
    """NaN / +-inf in every covered format and layout: kept in place, never moving a scale,
    bit for bit the reference's (docs/formats.md, "Non-finite values")."""
    _run("kernels_interpret_check.py", "non-finite", TRITON_INTERPRET="1")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills():
    _run("kernels_compile_check.py", TRITON_DEFAULT_FP_FUSION="1")
