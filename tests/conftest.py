"""Shared fixtures for fastbn's tests.

``backend``
    Every CPU backend (``"numba"``, ``"cython"``, ``"numpy"``): a test taking it
    runs once per backend, and a backend that does not run here is skipped with
    the reason ``fastbn.backends()`` gives.  A new CPU backend is picked up by
    the whole suite from here, automatically.
``rng``
    A fresh ``numpy.random.Generator`` per test.  Its seed is printed, so a
    failure shows it under "Captured stdout setup"; ``FASTBN_TEST_SEED=<seed>``
    replays it.
``make_array``
    ``make_array(shape, dtype, memory="C", channel_axis=None)``: random data
    (mean 0.5, sd 2) in one of ``MEMORY`` layouts, drawn from ``rng``.

``tests/reference.py`` (the float64 oracle) is importable as ``reference``.
"""

import os
import sys

import numpy as np
import pytest

import fastbn

# --import-mode=importlib does not put tests/ on sys.path; the oracle lives here.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

CPU_BACKENDS = ("numba", "cython", "numpy")

# Hypothesis profiles for the property tests (tests/test_properties.py).
# "ci" (the default): a quick sample per test; under CI (CI set in the
# environment) the examples are derandomized, so a submission is never failed
# by a newly drawn case, while local runs draw new ones every time.
# "thorough": >= 10k cases per backend in all; ``pytest --hypothesis-profile=thorough``.
try:
    from hypothesis import HealthCheck, settings as _hsettings
except ImportError:  # hypothesis is a test extra; the property tests skip without it
    _hsettings = None
if _hsettings is not None:
    _quiet = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
              HealthCheck.data_too_large]
    _hsettings.register_profile("ci", max_examples=60, deadline=None, print_blob=True,
                                derandomize=bool(os.environ.get("CI")),
                                suppress_health_check=_quiet)
    _hsettings.register_profile("thorough", max_examples=1300, deadline=None, print_blob=True,
                                suppress_health_check=_quiet)
    _hsettings.load_profile("ci")  # --hypothesis-profile=NAME (applied after this) wins

#: Memory layouts of test data: C order, Fortran order, a strided view with gaps
#: (``base[..., 1:-1, ::2]``), and a view with every stride negative.
MEMORY = ("C", "F", "sliced", "negstride")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Name of a CPU backend available here (others are skipped with the reason)."""
    status = fastbn.backends()[request.param]
    if status != "available":
        pytest.skip(f"backend {request.param!r} is not available: {status}")
    return request.param


@pytest.fixture
def rng():
    seed = os.environ.get("FASTBN_TEST_SEED")
    seed = int(seed) if seed else np.random.SeedSequence().entropy
    print(f"random data from numpy.random.default_rng({seed}); replay with FASTBN_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def random_array(rng, shape, dtype, memory="C", channel_axis=None, loc=0.5, sd=2.0):
    """Random ``loc + sd * randn`` data of ``shape`` (a tuple, or an int for 1-D) and
    ``dtype`` laid out as ``memory``.

    With ``channel_axis``, channel c also gets ``+ c`` added, so channels have
    clearly different statistics and a mixed-up channel cannot pass.
    """
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(shape)
    ndim = len(shape)

    def values(shp):
        v = loc + sd * rng.standard_normal(shp)
        if channel_axis is not None:
            c = channel_axis % ndim
            v = v + np.arange(shp[c]).reshape([-1 if a == c else 1 for a in range(ndim)])
        return v.astype(dtype)

    if memory == "C":
        return np.ascontiguousarray(values(shape))
    if memory == "F":
        return np.asfortranarray(values(shape))
    if memory == "sliced":
        big = list(shape)
        big[-1] *= 2
        index = (Ellipsis, slice(None, None, 2))
        if ndim >= 2:
            big[-2] += 2
            index = (Ellipsis, slice(1, -1), slice(None, None, 2))
        # The gaps hold NaN: a kernel that reads outside the view gives NaN and fails.
        base = np.full(big, np.nan, dtype=dtype)
        base[index] = values(shape)
        return base[index]
    if memory == "negstride":
        # Same values, every stride negative.
        return np.ascontiguousarray(values(shape)[(slice(None, None, -1),) * ndim])[
            (slice(None, None, -1),) * ndim]
    raise ValueError(f"unknown memory layout {memory!r}")


@pytest.fixture
def make_array(rng):
    """Factory: ``make_array(shape, dtype, memory="C", channel_axis=None)``; see random_array."""
    def make(shape, dtype=np.float64, memory="C", channel_axis=None, **kw):
        return random_array(rng, shape, dtype, memory, channel_axis, **kw)
    return make


# -- slow subprocess checks started early (tests/background.py) -------------------

def pytest_collection_modifyitems(session, config, items):
    """The tests that await ``BACKGROUND`` work run last (their order otherwise kept).

    In file order they came early (test_asv_smoke, test_cuda_sim_process) and
    blocked the main run ~3 minutes while their child ran on the other core;
    last, the children have finished under the rest of the suite.
    """
    def awaits(item):
        return bool(getattr(getattr(item, "module", None), "BACKGROUND", None))
    items[:] = [i for i in items if not awaits(i)] + [i for i in items if awaits(i)]


def pytest_collection_finish(session):
    """Start the ``BACKGROUND`` work of every module with a selected test (once)."""
    import background
    started = set()
    for item in session.items:
        module = getattr(item, "module", None)
        jobs = getattr(module, "BACKGROUND", None)
        if jobs and module not in started:
            started.add(module)
            for key, function in jobs.items():
                background.submit(key, function)


def pytest_sessionfinish(session, exitstatus):
    import background
    background.stop()
