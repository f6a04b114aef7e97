#!/usr/bin/env bash
# The GPU check of the CUDA backend in one command, for a session with a GPU:
#
#     tools/gpu_check.sh [results-dir]      (PYTHON=... to pick the interpreter)
#
# 1. what fastbn sees (backends(), the device), 2. registers per kernel for
# this device's compute capability (bar: <= 64), 3. the GPU tests
# (tests/test_cuda_gpu.py: launches per call, the caller's stream and device,
# torch tensors, every block size, 256 MB), 4. the simulator suite, 5. the GPU
# benchmark (python -m fastbn bench --gpu).  Everything is also written under
# the results directory (default gpu-check-results/); the benchmark's table
# belongs in the README's speed section.  Exit status: the first failing step's.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-gpu-check-results}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, tee the output to $OUT/NAME.txt, keep the first failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

step env "$PY" -c "
import fastbn, numba
from numba import cuda
print('fastbn', fastbn.__version__, 'numba', numba.__version__)
print('backends', fastbn.backends())
d = cuda.get_current_device()
print('device', d.name, 'cc', d.compute_capability, 'SMs', d.MULTIPROCESSOR_COUNT)
"
CC=$("$PY" -c "from numba import cuda; print('%d.%d' % cuda.get_current_device().compute_capability)" 2>/dev/null || echo 9.0)
step registers "$PY" -m fastbn.tools.cuda_registers --cc "$CC"
step gpu-tests "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m "" tests/test_cuda_gpu.py
step sim-tests env NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda_sim.py
step bench "$PY" -m fastbn bench --gpu --no-cpu --json "$OUT/bench-gpu.json"
echo "results in $OUT/ (exit $status)"
exit "$status"
