"""Run the CUDA simulator suite in its own process from the main test run.

``NUMBA_ENABLE_CUDASIM`` is read once, when numba.cuda is imported, so the
simulator tests cannot share this process.  This test starts
``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_sim.py`` and fails
with its output if any simulator test fails, so the README's single test
command covers the GPU kernels too.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.integration


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"),
                    reason="already inside the simulator run")
def test_cuda_simulator_suite_passes():
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
         "-o", "addopts=", os.path.join(HERE, "test_cuda_sim.py")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"simulator suite failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout, tail
