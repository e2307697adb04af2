"""The fused kernels run on the CPU through Triton's interpreter (only where triton is installed,
e.g. ``pip install -e .[kernels]``): bitwise the reference for every covered format, dtype,
layout and launch candidate, on tiny tensors (tests/formats/kernels_interpret_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_interpreted_kernels_are_bitwise_the_reference():
    env = os.environ | {"TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("kernels_interpret_check.py")
    out = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
