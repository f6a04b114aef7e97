"""Array families: how arrays of each kind are checked, allocated, viewed and returned.

A *family* is where an array lives and what the caller gets back:

``"numpy"`` (:mod:`.host`)
    host memory: ``numpy.ndarray`` and anything ``np.asarray`` takes.
``"cuda"`` (:mod:`.cuda`)
    device memory: CuPy arrays, Numba device arrays, anything with
    ``__cuda_array_interface__``.
``"dask"``
    lazy chunked ``dask.array.Array``; the Dask backend
    (``fastbn.kernels.dask_chunks``) implements the public functions itself.

A family module offers the same small set of functions (``asarray``,
``vector``, ``check_running``, ``check_out``, ``as3``, ``affine``, ``result``,
``assign``, ``overlaps``), so the public functions run one path for every
family.  Compute backends (``fastbn.kernels``) only run primitives on the
canonical views a family hands them.
"""

import importlib
import sys

_MODULES = {"numpy": "fastbn.families.host", "cuda": "fastbn.families.cuda"}
_loaded = {}


def family_of(x):
    """``"numpy"``, ``"cuda"`` or ``"dask"``: where the array ``x`` lives."""
    t = type(x)
    mod = t.__module__.split(".", 1)[0]
    if mod == "numpy":
        return "numpy"
    if mod == "dask":
        return "dask"
    if mod == "cupy" or hasattr(x, "__cuda_array_interface__"):
        return "cuda"
    # The CUDA simulator's device arrays have no __cuda_array_interface__.
    if "numba.cuda" in sys.modules:
        try:
            from numba import cuda
            # Name first: the simulator's numba.cuda has no is_cuda_array.
            if t.__name__ in ("DeviceNDArray", "FakeCUDAArray") or cuda.is_cuda_array(x):
                return "cuda"
        except Exception:  # noqa: BLE001 - a numba.cuda that cannot answer: not a device array
            pass
    return "numpy"


def module(name):
    """The family module for family ``name`` (``"numpy"`` or ``"cuda"``)."""
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(_MODULES[name])
    return mod
