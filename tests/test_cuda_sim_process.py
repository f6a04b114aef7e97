"""Run the CUDA simulator suite in its own process from the main test run.

``NUMBA_ENABLE_CUDASIM`` is read once, when numba.cuda is imported, so the
simulator tests cannot share this process.  This test starts
``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_sim.py`` and fails
with its output if any simulator test fails, so the README's single test
command covers the GPU kernels too.
"""

import importlib.util
import os
import sys

import pytest

import background

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.integration

INSIDE = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def run_simulator_suite():
    """The simulator run's ``CompletedProcess``; None where it cannot run."""
    if INSIDE or importlib.util.find_spec("numba") is None \
            or importlib.util.find_spec("numba.cuda") is None:
        return None
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    return background.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
         "-o", "addopts=", os.path.join(HERE, "test_cuda_sim.py")],
        cwd=os.path.dirname(HERE), env=env, timeout=900)


# started when collection ends (tests/background.py), awaited here
BACKGROUND = {"cuda-simulator-suite": run_simulator_suite}


@pytest.mark.skipif(INSIDE, reason="already inside the simulator run")
def test_cuda_simulator_suite_passes():
    pytest.importorskip("numba.cuda")
    proc = background.result("cuda-simulator-suite", run_simulator_suite)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"simulator suite failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout, tail
