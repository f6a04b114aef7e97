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
``"torch"`` (:mod:`.torch_cpu`)
    CPU ``torch.Tensor``: the whole call runs the ``"numpy"`` path on
    zero-copy views and hands tensors back (CUDA tensors are ``"cuda"``).

A family module offers the same small set of functions (``asarray``,
``vector``, ``check_running``, ``check_out``, ``as3``, ``affine``, ``result``,
``assign``, ``overlaps``), so the public functions run one path for every
family.  Compute backends (``fastbn.kernels``) only run primitives on the
canonical views a family hands them.
"""

import importlib
import sys

_MODULES = {"numpy": "fastbn.families.host", "cuda": "fastbn.families.cuda",
            "torch": "fastbn.families.torch_cpu"}
_loaded: dict = {}


def family_of(x):
    """``"numpy"``, ``"cuda"``, ``"dask"`` or ``"torch"``: where the array ``x`` lives."""
    t = type(x)
    mod = t.__module__.split(".", 1)[0]
    if mod == "numpy":
        return "numpy"
    if mod == "dask":
        return "dask"
    if mod == "torch" or (mod != "cupy" and _is_tensor(x)):
        # Asked before __cuda_array_interface__, which a CUDA tensor that
        # requires grad answers with a RuntimeError.
        if getattr(x, "is_cpu", False) is True:   # (x.device builds a torch.device: ~1 us)
            return "torch"
        device = getattr(getattr(x, "device", None), "type", None)
        if device == "cuda":
            return "cuda"
        if device is not None:
            return "torch"   # CPU (other devices are refused by the torch family)
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


def _is_tensor(x):
    """True for a ``torch.Tensor`` (subclasses such as ``nn.Parameter`` included),
    without importing torch: only a caller that imported it can hold one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def holds_tensor(v):
    """True if ``v`` is a CPU-or-other ``torch.Tensor`` or a tuple holding one
    (``Moments``/``GradSums`` of tensors): such calls go to the torch family."""
    if isinstance(v, tuple):
        return any(holds_tensor(e) for e in v)
    return _is_tensor(v) and family_of(v) == "torch"


def module(name):
    """The family module for family ``name`` (``"numpy"``, ``"cuda"`` or ``"torch"``)."""
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(_MODULES[name])
    return mod
