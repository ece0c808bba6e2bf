"""The Triton kernels compile for a real GPU target (sm_90, through ptxas) and keep their float32
operations as written: checked without a GPU, in a child process (see tests/merging/backends/gpu_compile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason='triton is not installed: pip install "magmax[test]" (or pip install triton)')


def test_every_kernel_compiles_for_sm90_without_fma_and_with_exact_division():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report) == 3 * (3 * 2 * 2 + 3)
    for entry in report:
        assert entry["fma"] == 0, entry  # an FMA would round differently from the CPU kernels
        assert entry["div_other"] == 0, entry
    divides = [e for e in report if e["kernel"] == "ties_merge" or (e["kernel"] == "fold_segments" and e["op"] == 1)]
    assert divides and all(e["div_rn"] > 0 for e in divides)
