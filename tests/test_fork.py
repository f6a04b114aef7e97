"""fork(): a child works whatever ran in the parent (issue 14 item 3).

The OpenMP thread pool is one per process: the Numba kernels (``omp`` layer),
the Cython kernels and the caller's own ``@njit(parallel=True)`` code all use
it, and a child forked after any of them started it hangs (libgomp) or aborts
(Numba's omp layer) the first time it enters a parallel region.  Each case is
a fresh interpreter that runs one parallel workload (a fastbn backend, or its
own parallel Numba function) and then forks a child that runs a fastbn
backend's parallel-size kernels and checks them against the parent's results.
The interpreter runs under a timeout, so a hang fails instead of stalling.

The control (a child that enters the pool directly, without fastbn's guard)
shows that the parent really left a pool the child cannot use; it is skipped
where the platform's OpenMP happens to be fork-safe.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from fastbn.kernels import cpu_cython

try:
    from fastbn.kernels import cpu_numba  # noqa: F401
    _NUMBA = True
except ImportError:
    _NUMBA = False

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

AVAILABLE = ["numba"] * _NUMBA + ["cython"] * (cpu_cython.unavailable_reason() is None)
PARENTS = ["numba", "cython", "own_njit"]

_SCRIPT = textwrap.dedent("""
    import importlib, os
    import numpy as np
    parent, child = {parent!r}, {child!r}
    rng = np.random.default_rng(5)
    # parallel-size inputs (above both backends' serial thresholds), NCHW and NHWC
    xs = [rng.standard_normal((8, 37, 33, 31)).astype(np.float32) + 3,
          rng.standard_normal((8, 31, 33, 37)).astype(np.float64)]
    dy = [rng.standard_normal(x.shape).astype(x.dtype) for x in xs]

    def work(backend):
        # the backend's primitives on (O, C, I) views: channels-first and channels-last
        bk = importlib.import_module("fastbn.kernels.cpu_" + backend)
        res = []
        for x, g in zip(xs, dy):
            x3 = x.reshape(8, 37, -1) if x.dtype == np.float32 else x.reshape(-1, 37, 1)
            g3 = g.reshape(x3.shape)
            m, m2 = bk.moments3(x3)
            q = 1.0 / np.sqrt(m2 / (x3.size // 37) + 1e-3)
            y = bk.affine3(x3, m, q, np.zeros(37), np.empty_like(x3))
            s1, s2 = bk.dy_sums3(g3, x3, m)
            res += [m, m2, y, s1, s2]
        return res

    if parent == "own_njit":
        import numba
        @numba.njit(parallel=True)
        def own(a):
            t = 0.0
            for i in numba.prange(a.size):
                t += a[i] * a[i]
            return t
        own(np.ones(1 << 20))
    else:
        work(parent)
    want = work(child)          # what the child must reproduce (same split: same bits)
    pid = os.fork()
    if pid == 0:
        try:
            got = work(child)
            ok = all(np.array_equal(a, b) for a, b in zip(got, want))
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    print("CHILD", os.waitstatus_to_exitcode(status))
""")


def _run(parent, child, timeout=150):
    code = _SCRIPT.format(parent=parent, child=child)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"parent {parent}, child {child}: hung (> {timeout} s)")
    return proc


@pytest.mark.integration
@pytest.mark.parametrize("child", ["numba", "cython"])
@pytest.mark.parametrize("parent", PARENTS)
def test_child_runs_after_any_parallel_parent(parent, child):
    need = {child} | ({parent} - {"own_njit"})
    if parent == "own_njit" and "numba" not in AVAILABLE or not need <= set(AVAILABLE):
        pytest.skip(f"needs {sorted(need)}")
    proc = _run(parent, child)
    assert proc.returncode == 0 and "CHILD 0" in proc.stdout, (
        f"parent {parent}, child {child}: rc {proc.returncode}\n{proc.stdout}{proc.stderr[-3000:]}")


_CONTROL = textwrap.dedent("""
    import os, numpy as np
    from fastbn.kernels import cpu_cython as cy
    x = np.ones((64, 8, 4096), np.float32)
    cy._ck.moments_cf(x, np.empty(8), np.empty(8), 4096, 2)     # parent: the pool starts
    pid = os.fork()
    if pid == 0:
        cy._ck.moments_cf(x, np.empty(8), np.empty(8), 4096, 2)  # no guard: hangs here
        os._exit(0)
    import time
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("FINISHED", os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("HUNG")
""")


@pytest.mark.integration
@pytest.mark.skipif("cython" not in AVAILABLE, reason="Cython extension not built")
def test_control_an_unguarded_child_hangs():
    """Without the guard, a child entering the pool its parent started hangs: the
    test above can fail (skipped where this OpenMP runtime is fork-safe)."""
    from fastbn.kernels import cpu_cython as cy
    if cy._ck.max_threads() < 2:
        pytest.skip("one OpenMP thread: no pool to inherit")
    proc = subprocess.run([sys.executable, "-c", _CONTROL], capture_output=True, text=True,
                          timeout=60)
    if "FINISHED 0" in proc.stdout:
        pytest.skip("this OpenMP runtime survives fork")
    assert "HUNG" in proc.stdout or "FINISHED" in proc.stdout, proc.stdout + proc.stderr


def test_guard_sees_native_threads():
    """The before-fork hook counts native threads (not Python threads): after a
    parallel region the pool's workers are there and a child is marked serial;
    a child of a fresh single-threaded interpreter is not (OpenBLAS's workers,
    which NumPy starts at import, are native threads too: kept to one here)."""
    code = textwrap.dedent("""
        import os, numpy as np
        from fastbn.kernels import _fork
        def child_flag():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(w, b"1" if _fork.serial_only() else b"0")
                os._exit(0)
            os.waitpid(pid, 0)
            return os.read(r, 1).decode()
        print("FRESH", child_flag(), _fork.native_threads())
        import numba
        @numba.njit(parallel=True)
        def f(a):
            for i in numba.prange(a.size):
                a[i] += 1.0
        f(np.zeros(1 << 16))
        print("AFTER", child_flag(), _fork.native_threads(), numba.get_num_threads())
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh_flag, fresh_n = lines["FRESH"].split()
    after_flag, after_n, nthreads = lines["AFTER"].split()
    if fresh_n == "None":
        pytest.skip("no /proc/self/task here")
    if int(fresh_n) == 1:
        assert fresh_flag == "0"
    if int(nthreads) > 1:
        assert int(after_n) > 1 and after_flag == "1"
