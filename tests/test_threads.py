"""Threads: 8 Python threads calling every public function at once == serial calls.

Each CPU backend: 8 threads start together (a barrier) and each makes
ITERATIONS rounds of all five public functions on its own inputs (small ones
that run the serial kernels, large ones that run the parallel kernels, NCHW
and NHWC, float16/32/64, with and without ``out=`` and running statistics).
Every result must equal, bit for bit, the result of the same call made
serially beforehand: the work split depends on the shape only, so the thread
count and the interleaving must not change a value.  No call may raise or
crash the process.

Numba's ``workqueue`` threading layer aborts the whole process when two
threads enter a parallel region at once; fastbn serialises its parallel calls
under that layer (``kernels/_jit.py``, ``run()``).  A subprocess forcing
``NUMBA_THREADING_LAYER=workqueue`` proves it: it must survive the same storm.
"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastbn as fbn

THREADS = 8
ITERATIONS = 25

#: (shape, channel_axis, dtype): serial-size and parallel-size inputs (the Numba
#: backend goes parallel from 2^18 values, the Cython one from 2^16).
CASES = [
    ((4, 8, 10, 12), 1, np.float32),
    ((16, 16, 32, 36), 1, np.float32),      # 295k values: parallel kernels
    ((4, 10, 12, 8), -1, np.float64),
    ((8, 24, 36, 48), -1, np.float32),      # 332k values, channels-last
    ((300, 16), 1, np.float16),
    ((20000, 16), 1, np.float64),           # 320k values, (N, C)
]


def _inputs(k):
    """Inputs of call set k (distinct data for every k)."""
    shape, axis, dtype = CASES[k % len(CASES)]
    rng = np.random.default_rng(1000 + k)
    C = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype
    x = (rng.standard_normal(shape) * (1 + k) + k).astype(dtype)
    return dict(x=x, dy=rng.standard_normal(shape).astype(dtype), axis=axis,
                scale=rng.uniform(0.5, 2, C).astype(pdt), offset=rng.uniform(-1, 1, C).astype(pdt),
                mean=rng.uniform(-1, 1, C).astype(pdt), var=rng.uniform(0.5, 2, C).astype(pdt),
                rm=rng.uniform(-1, 1, C).astype(pdt), rv=rng.uniform(0.5, 2, C).astype(pdt),
                use_out=k % 2 == 1)


def _call_all(a, backend):
    """All five public functions on one input set; returns every output (copies)."""
    x, axis = a["x"], a["axis"]
    nd = x.ndim
    axes = tuple(i for i in range(nd) if i != axis % nd)
    out = np.empty_like(x) if a["use_out"] else None
    res = []
    mean, var = fbn.moments(x, axes, keepdims=True, backend=backend)
    res += [mean, var]
    kd = [1 if i in axes else x.shape[axis] for i in range(nd)]
    res.append(fbn.batch_normalization(x, mean, var, a["offset"].reshape(kd),
                                       a["scale"].reshape(kd), 1e-3, out=out,
                                       backend=backend).copy())
    rm, rv = a["rm"].copy(), a["rv"].copy()
    y, m, inv = fbn.batch_norm_train(x, a["scale"], a["offset"], channel_axis=axis, eps=1e-3,
                                     running_mean=rm, running_var=rv, out=out, backend=backend)
    res += [y.copy(), m, inv, rm, rv]
    res.append(fbn.batch_norm_infer(x, a["scale"], a["offset"], a["mean"], a["var"],
                                    channel_axis=axis, out=out, backend=backend).copy())
    dx, ds, do = fbn.batch_norm_backward(a["dy"], x, a["scale"], m, inv, channel_axis=axis,
                                         out=out, backend=backend)
    res += [dx.copy(), ds, do]
    return res


def _storm(backend, sets, expected):
    """THREADS threads x ITERATIONS rounds of _call_all; returns (calls made, failures)."""
    barrier = threading.Barrier(THREADS)
    failures, calls = [], [0] * THREADS

    def worker(t):
        try:
            barrier.wait()
            for i in range(ITERATIONS):
                k = (t * 5 + i) % len(sets)  # threads work on different sets at any moment
                got = _call_all(sets[k], backend)
                calls[t] += 5
                for j, (g, e) in enumerate(zip(got, expected[k])):
                    if not np.array_equal(g, e, equal_nan=True):
                        failures.append(f"thread {t}, round {i}, set {k}, output {j} differs "
                                        f"(max |diff| {np.max(np.abs(g - e))})")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(calls), failures


def test_threads_match_serial(backend):
    sets = [_inputs(k) for k in range(2 * len(CASES))]
    before = [(a["x"].copy(), a["dy"].copy()) for a in sets]
    expected = [_call_all(a, backend) for a in sets]  # serial, in this thread
    calls, failures = _storm(backend, sets, expected)
    assert not failures, f"{len(failures)} failures, first: {failures[:3]}"
    assert calls == THREADS * ITERATIONS * 5
    for a, (x, dy) in zip(sets, before):  # shared inputs never written
        assert np.array_equal(a["x"], x) and np.array_equal(a["dy"], dy)


@pytest.mark.skipif("available" not in (fbn.backends()["numba"], fbn.backends()["cython"]),
                    reason="only the NumPy backend runs here")
def test_use_backend_is_per_thread():
    """use_backend() in one thread does not change the backend other threads get."""
    x = np.ones((4, 3))
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def chooser():
        with fbn.use_backend("numpy"):
            seen["inside"] = fbn.backend_for(x)
            inside.set()
            done.wait(10)

    th = threading.Thread(target=chooser)
    th.start()
    inside.wait(10)
    seen["other"] = fbn.backend_for(x)
    done.set()
    th.join()
    assert seen["inside"] == "numpy"
    assert seen["other"] == fbn.backend_for(x) != "numpy"


_WORKQUEUE_SCRIPT = textwrap.dedent("""
    import sys, threading
    import numba
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_threads as tt
    import fastbn as fbn
    if {nolock!r}:  # the control: fastbn without its workqueue lock
        import contextlib
        from fastbn.kernels import _jit
        _jit._workqueue_lock = contextlib.nullcontext()
    sets = [tt._inputs(k) for k in range(2 * len(tt.CASES))]
    expected = [tt._call_all(a, "numba") for a in sets]
    layer = numba.threading_layer()
    calls, failures = tt._storm("numba", sets, expected)
    print("layer", layer, "calls", calls, "failures", len(failures))
    for f in failures[:3]:
        print(f)
    sys.exit(1 if failures or layer != "workqueue" else 0)
""")


@pytest.mark.skipif(fbn.backends()["numba"] != "available", reason="Numba backend not available")
def test_workqueue_layer_survives_concurrent_calls():
    """Under NUMBA_THREADING_LAYER=workqueue (not thread-safe), 8 threads calling the
    parallel kernels at once neither abort the process nor change a result."""
    proc, out = _run_workqueue(nolock=False)
    assert proc.returncode == 0, f"rc={proc.returncode} (< 0: killed by a signal):\n{out[-3000:]}"
    assert f"layer workqueue calls {THREADS * ITERATIONS * 5} failures 0" in out, out[-3000:]


@pytest.mark.integration
@pytest.mark.skipif(fbn.backends()["numba"] != "available", reason="Numba backend not available")
def test_workqueue_control_without_the_lock_aborts():
    """The control: the same storm with fastbn's lock taken out makes Numba abort the
    process ("Concurrent access has been detected"), so the test above can fail."""
    proc, out = _run_workqueue(nolock=True)
    if proc.returncode == 0:  # a race: the threads happened not to overlap this time
        pytest.skip("the unlocked threads did not overlap in a parallel region this time")
    assert "Concurrent access" in out or "workqueue" in out, out[-3000:]


def _run_workqueue(nolock):
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _WORKQUEUE_SCRIPT.format(tests=tests, nolock=nolock)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd="/")
    return proc, proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_after_parallel_call_does_not_hang():
    """GNU OpenMP's pool cannot be used in a child forked after a parallel
    region; fastbn must run serially there and still give right results."""
    code = r"""
import multiprocessing as mp, numpy as np, fastbn as fbn
x = np.random.default_rng(0).standard_normal((8, 64, 32, 32)).astype(np.float32)  # > SERIAL_BELOW
y, m, s = fbn.batch_norm_train(x, backend="numba")        # parent uses the thread pool
def child(q):
    y2, m2, s2 = fbn.batch_norm_train(x, backend="numba")
    q.put(float(np.abs(y2 - y).max()))
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start(); p.join(60)
assert p.exitcode == 0, p.exitcode
assert q.get(timeout=5) == 0.0
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
