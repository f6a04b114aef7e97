"""The dispatcher (API.md, "Array families and the dispatcher").

Which backend serves a NumPy array by default (numba, else cython, else the
NumPy reference), and how a caller overrides it: ``backend=``,
``use_backend`` (nested, restored after an exception, local to a thread),
``FASTBN_BACKEND``.  A spy backend registered through the dispatcher's one-line
seam shows that the public functions really run on the backend chosen.
"""

import sys
import threading
import types

import numpy as np
import pytest

import reference as ref

import fastbn as fbn
from fastbn import dispatch
from fastbn.kernels import reference as numpy_kernels

ALL_NAMES = {"numba", "cython", "numpy", "cuda", "dask"}
CPU = ("numba", "cython", "numpy")


def _available(name):
    return fbn.backends()[name] == "available"


def _default_cpu():
    return next(n for n in CPU if _available(n))


# The one-time "using the slow NumPy reference" note, where no fast backend runs.
pytestmark = pytest.mark.filterwarnings("ignore:fastbn.*NumPy reference:RuntimeWarning")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """Tests start without FASTBN_BACKEND, whatever the shell says."""
    monkeypatch.delenv("FASTBN_BACKEND", raising=False)


@pytest.fixture
def spy(monkeypatch):
    """Registers backend "spy": the NumPy reference primitives, counting calls.

    Uses the seam of dispatch.py (a name -> module entry); everything it
    touches is restored after the test.
    """
    calls = []
    mod = types.ModuleType("fastbn_test_spy_backend")
    mod.NAME, mod.FAMILIES = "spy", ("numpy",)
    for prim in ("moments3", "affine3", "dy_sums3"):
        real = getattr(numpy_kernels, prim)
        setattr(mod, prim, lambda *a, _real=real, _name=prim: (calls.append(_name), _real(*a))[1])
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(dispatch._MODULES, "spy", mod.__name__)
    monkeypatch.setattr(dispatch, "_loaded", dict(dispatch._loaded))
    monkeypatch.setattr(dispatch, "_reasons", dict(dispatch._reasons))
    mod.calls = calls
    return mod


# -- backends() --------------------------------------------------------------------------

def test_backends_lists_every_name():
    status = fbn.backends()
    assert isinstance(status, dict) and set(status) == ALL_NAMES
    assert status["numpy"] == "available"  # the fallback of last resort always runs
    for name, s in status.items():
        assert isinstance(s, str) and s.strip(), name  # "available" or a reason


def test_backends_reports_a_reason(spy):
    spy.unavailable_reason = lambda: "no widget driver"
    assert fbn.backends()["spy"] == "no widget driver"
    with pytest.raises(ValueError, match="no widget driver"):
        fbn.moments(np.ones(3), backend="spy")
    with pytest.raises(ValueError, match="no widget driver"):
        with fbn.use_backend("spy"):
            pass


# -- the default -------------------------------------------------------------------------

@pytest.mark.parametrize("x", [np.ones((2, 3), np.float32), np.ones(3, np.float16), [1.0, 2.0],
                               3.0, np.float64(1.0)], ids=["f32", "f16", "list", "float", "np.float64"])
def test_backend_for_numpy_family(x):
    """numba when it runs, else cython, else the NumPy reference."""
    expect = "numba" if _available("numba") else "cython" if _available("cython") else "numpy"
    assert fbn.backend_for(x) == expect


def test_fallback_to_the_reference(spy, monkeypatch):
    """With numba and cython unavailable, calls go to the NumPy reference, with a warning."""
    monkeypatch.setitem(dispatch._MODULES, "numpy", spy.__name__)  # watch the reference run
    for name in ("numba", "cython", "numpy"):
        dispatch._loaded.pop(name, None)  # spy made these dicts throw-away copies
    dispatch._reasons.update(numba="numba switched off by the test",
                             cython="cython switched off by the test")
    monkeypatch.setattr(dispatch, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="NumPy reference"):
        assert fbn.backend_for(np.ones(3)) == "numpy"
    fbn.batch_norm_train(np.ones((4, 2)))
    assert sorted(spy.calls) == ["affine3", "moments3"]
    assert fbn.backends()["numba"] == "numba switched off by the test"


# -- backend= ---------------------------------------------------------------------------

def test_backend_keyword(backend):
    x = np.ones((4, 3), np.float32)
    assert fbn.backend_for(x, backend=backend) == backend
    assert fbn.backend_for(x, backend="numpy") == "numpy"


def test_backend_keyword_routes_every_function(spy, make_array):
    x = make_array((4, 3, 5), np.float64)
    c = np.ones(3)
    expected = {"moments": ["moments3"], "batch_normalization": ["affine3"],
                "train": ["moments3", "affine3"], "infer": ["affine3"],
                "backward": ["dy_sums3", "affine3"]}
    calls = {
        "moments": lambda: fbn.moments(x, (0, 2), backend="spy"),
        "batch_normalization": lambda: fbn.batch_normalization(x, 0.0, 1.0, None, None, 1e-5,
                                                               backend="spy"),
        "train": lambda: fbn.batch_norm_train(x, backend="spy"),
        "infer": lambda: fbn.batch_norm_infer(x, c, c, c, c, backend="spy"),
        "backward": lambda: fbn.batch_norm_backward(x, x, c, c, c, backend="spy"),
    }
    for fn, call in calls.items():
        spy.calls.clear()
        call()
        assert sorted(spy.calls) == sorted(expected[fn]), fn


def test_forced_numpy_reference_runs_it(monkeypatch, make_array):
    """backend='numpy' runs the reference even when a faster backend is the default."""
    seen = []
    real = numpy_kernels.moments3
    monkeypatch.setattr(numpy_kernels, "moments3", lambda x3: (seen.append(1), real(x3))[1])
    x = make_array((5, 3), np.float32)
    y, mean, _ = fbn.batch_norm_train(x, backend="numpy")
    assert seen
    ref.assert_close(mean, ref.f64(x).mean(axis=0), "mean")
    if fbn.backend_for(x) != "numpy":
        seen.clear()
        fbn.batch_norm_train(x)
        assert not seen


def test_backend_keyword_beats_use_backend_and_env(spy, monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "numpy")
    with fbn.use_backend("numpy"):
        assert fbn.backend_for(np.ones(2), backend="spy") == "spy"


# -- use_backend -------------------------------------------------------------------------

def test_use_backend(backend):
    x = np.ones((2, 3))
    with fbn.use_backend(backend) as name:
        assert name == backend
        assert fbn.backend_for(x) == backend
    assert fbn.backend_for(x) == _default_cpu()


def test_use_backend_routes_calls(spy):
    with fbn.use_backend("spy"):
        fbn.batch_norm_train(np.ones((4, 2)))
    assert spy.calls
    spy.calls.clear()
    fbn.batch_norm_train(np.ones((4, 2)))
    assert not spy.calls


def test_use_backend_nesting(spy):
    x = np.ones(3)
    with fbn.use_backend("spy"):
        assert fbn.backend_for(x) == "spy"
        with fbn.use_backend("numpy"):
            assert fbn.backend_for(x) == "numpy"
            with fbn.use_backend("spy"):
                assert fbn.backend_for(x) == "spy"
            assert fbn.backend_for(x) == "numpy"
        assert fbn.backend_for(x) == "spy"
    assert fbn.backend_for(x) == _default_cpu()


def test_use_backend_restored_after_exception(spy):
    x = np.ones(3)
    with pytest.raises(KeyError):
        with fbn.use_backend("spy"):
            with fbn.use_backend("numpy"):
                raise KeyError("boom")
    assert fbn.backend_for(x) == _default_cpu()
    with fbn.use_backend("spy"):
        with pytest.raises(ValueError):  # a failing fastbn call inside the block
            fbn.batch_norm_train(np.ones((1, 3)))
        assert fbn.backend_for(x) == "spy"
    assert fbn.backend_for(x) == _default_cpu()


def test_use_backend_is_local_to_its_thread(spy):
    """A thread already running when another enters the block keeps the default."""
    seen, inside, done = [], threading.Event(), threading.Event()

    def worker():
        inside.wait(10)
        seen.append(fbn.backend_for(np.ones(3)))
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    with fbn.use_backend("spy"):
        inside.set()
        done.wait(10)
        assert fbn.backend_for(np.ones(3)) == "spy"
    t.join()
    assert seen == [_default_cpu()]


def test_use_backend_beats_env(spy, monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "numpy")
    with fbn.use_backend("spy"):
        assert fbn.backend_for(np.ones(3)) == "spy"
    assert fbn.backend_for(np.ones(3)) == "numpy"


@pytest.mark.parametrize("name", ["nope", "NUMBA", ""])
def test_use_backend_unknown_name(name):
    with pytest.raises(ValueError, match="backend"):
        with fbn.use_backend(name):
            pass


def test_use_backend_unavailable():
    name = next((n for n, s in fbn.backends().items() if s != "available"), None)
    if name is None:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match=name):
        with fbn.use_backend(name):
            pass


# -- FASTBN_BACKEND ----------------------------------------------------------------------

def test_env_sets_default(backend, monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", backend)
    assert fbn.backend_for(np.ones(3)) == backend
    monkeypatch.delenv("FASTBN_BACKEND")
    assert fbn.backend_for(np.ones(3)) == _default_cpu()


def test_env_routes_calls(spy, monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "spy")
    fbn.batch_norm_infer(np.ones((2, 3)), None, None, np.zeros(3), np.ones(3))
    assert spy.calls == ["affine3"]


def test_env_empty_is_unset(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "")
    assert fbn.backend_for(np.ones(3)) == _default_cpu()


def test_env_unknown_name(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="FASTBN_BACKEND"):
        fbn.backend_for(np.ones(3))
    with pytest.raises(ValueError, match="FASTBN_BACKEND"):
        fbn.moments(np.ones(3))


# -- other families ----------------------------------------------------------------------

class _FakeCuda:
    shape, dtype, ndim, strides = (3,), np.dtype(np.float32), 1, (4,)
    __cuda_array_interface__ = {"shape": (3,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_cpu_override_leaves_gpu_arrays_alone():
    """use_backend / FASTBN_BACKEND choose the CPU backend; a GPU array still goes to 'cuda'."""
    x = _FakeCuda()
    with fbn.use_backend("numpy"):
        if _available("cuda"):
            assert fbn.backend_for(x) == "cuda"
        else:
            with pytest.raises(TypeError, match="cuda"):
                fbn.backend_for(x)
    with pytest.raises(TypeError, match="numpy"):
        fbn.backend_for(x, backend="numpy")
