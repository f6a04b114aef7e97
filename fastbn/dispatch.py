"""Array family -> backend.

A *family* is how an array lives (``fastbn.families``): ``"numpy"`` (host
memory), ``"cuda"`` (device memory: CuPy, Numba device arrays, anything with
``__cuda_array_interface__``) or ``"dask"``.  Each backend module in
``fastbn.kernels`` says which families it takes; the first available backend
in a family's preference list serves it unless the caller chose one
(``backend=``, :func:`use_backend`, ``FASTBN_BACKEND``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

from numpy.typing import ArrayLike

from .families import family_of

# name -> module in fastbn.kernels.  Adding a backend: one line here.
_MODULES = {
    "numba": "fastbn.kernels.cpu_numba",
    "cython": "fastbn.kernels.cpu_cython",
    "numpy": "fastbn.kernels.reference",
    "cuda": "fastbn.kernels.cuda_numba",
    "dask": "fastbn.kernels.dask_chunks",
}

# Preference order per family when nobody chose.
_DEFAULTS = {
    "numpy": ("numba", "cython", "numpy"),
    "cuda": ("cuda",),
    "dask": ("dask",),
}

_loaded: dict[str, ModuleType] = {}
_reasons: dict[str, str] = {}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastbn_backend", default=None)
_warned_fallback = False


def _load(name):
    """The backend module for ``name``, or None (reason in ``_reasons``)."""
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        return None
    if name == "numba" and os.environ.get("FASTBN_DISABLE_NUMBA", "") not in ("", "0"):
        _reasons[name] = "disabled by FASTBN_DISABLE_NUMBA"
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
        why = getattr(mod, "unavailable_reason", lambda: None)()
    except Exception as exc:  # noqa: BLE001 - report any import failure as a reason
        mod, why = None, f"{type(exc).__name__}: {exc}".strip()
    if why:
        _reasons[name] = why
        return None
    _loaded[name] = mod
    return mod


def backends() -> dict[str, str]:
    """Every backend name mapped to ``"available"`` or why it is not.

    Asking loads (imports) each backend once; a backend that fails to import
    is reported, not raised.

    Returns
    -------
    dict of str to str
        ``{"numba": ..., "cython": ..., "numpy": ..., "cuda": ..., "dask": ...}``,
        each ``"available"`` or the reason it is not (e.g. ``"no CUDA driver
        or GPU (...)"``, ``"disabled by FASTBN_DISABLE_NUMBA"``).

    Examples
    --------
    >>> import fastbn as fbn
    >>> sorted(fbn.backends())
    ['cuda', 'cython', 'dask', 'numba', 'numpy']
    >>> fbn.backends()["numpy"]                          # the reference, always there
    'available'
    """
    return {name: ("available" if _load(name) is not None else _reasons[name]) for name in _MODULES}


def _check_name(name, what):
    if not isinstance(name, str):  # a list would raise "unhashable type" below
        raise TypeError(f"{what}: a backend name must be a string, got {name!r}")
    if name not in _MODULES:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {sorted(_MODULES)}")


try:   # FASTBN_BACKEND as CPython's os.environ stores it (its setters update this dict)
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey("FASTBN_BACKEND")
    _env_decode = os.environ.decodevalue
except AttributeError:  # another os.environ: read it the ordinary way
    _ENV_DATA = None


def _env_backend():
    """``os.environ.get("FASTBN_BACKEND")``, read on every call (the fast lane's
    included) in ~0.1 us instead of ~1.1 us."""
    if _ENV_DATA is None:
        return os.environ.get("FASTBN_BACKEND")
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else _env_decode(raw)


def _env_default():
    name = _env_backend() or None
    if name is not None:
        _check_name(name, "FASTBN_BACKEND")
    return name


def choose(family: str, backend: str | None = None) -> str:
    """Name of the backend serving ``family`` (honouring ``backend=``, overrides, env)."""
    global _warned_fallback
    if family == "torch":   # CPU tensors run on their NumPy views
        family = "numpy"
    if backend is not None:
        _check_name(backend, "backend")
        mod = _load(backend)
        if mod is None:
            raise ValueError(f"backend {backend!r} is not available: {_reasons[backend]}")
        if family not in mod.FAMILIES:
            raise TypeError(f"backend {backend!r} takes {'/'.join(mod.FAMILIES)} arrays; "
                            f"x is a {family} array")
        return backend
    preferred = _override.get() or _env_default()
    if preferred is not None:
        mod = _load(preferred)
        if mod is not None and family in mod.FAMILIES:
            return preferred
    for name in _DEFAULTS[family]:
        if _load(name) is not None:
            if family == "numpy" and name == "numpy" and not _warned_fallback:
                _warned_fallback = True
                warnings.warn("fastbn: neither the Numba nor the Cython backend is available "
                              f"({_reasons.get('numba')}; {_reasons.get('cython')}); "
                              "using the slow NumPy reference", RuntimeWarning, stacklevel=3)
            return name
    raise TypeError(f"no fastbn backend is available for {family} arrays: "
                    + "; ".join(f"{n}: {_reasons.get(n)}" for n in _DEFAULTS[family]))


_numpy_defaults: dict[tuple, tuple[str, ModuleType]] = {}


def numpy_default() -> ModuleType:
    """``module(choose("numpy"))``, the default NumPy backend's module, remembered
    per ``use_backend`` override, ``FASTBN_BACKEND`` value and set of loaded
    backends (the fast lane asks on every call: ~0.3 us instead of ~2.5)."""
    key = (_override.get(), _env_backend(), id(_loaded), len(_loaded), len(_reasons))
    hit = _numpy_defaults.get(key)
    if hit is not None and _loaded.get(hit[0]) is hit[1]:
        return hit[1]
    name = choose("numpy")
    mod = module(name)
    _numpy_defaults[key] = (name, mod)
    return mod


def module(name: str) -> ModuleType:
    """The loaded backend module ``name`` (which must be available)."""
    mod = _load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not available: {_reasons[name]}")
    return mod


def module_path(name: str) -> str:
    """The import path of backend ``name``'s module (what the Dask backend's chunk
    tasks import on a worker)."""
    _check_name(name, "module_path")
    return _MODULES[name]


def backend_for(x: ArrayLike, backend: str | None = None) -> str:
    """Which backend a fastbn call on ``x`` would use.

    Parameters
    ----------
    x : array_like
        An array of any family: NumPy (or anything ``numpy.asarray`` takes),
        CuPy/CUDA, Dask or a CPU ``torch.Tensor`` (served by the CPU
        backends).  Its dtype and shape do not matter.
    backend : str, optional
        What the call would pass as ``backend=``.

    Returns
    -------
    str
        ``"numba"``, ``"cython"``, ``"numpy"``, ``"cuda"`` or ``"dask"``:
        ``backend`` if given, else the :func:`use_backend` block's, else
        ``FASTBN_BACKEND``'s (each if it takes ``x``'s family), else the
        family's first available one.

    Raises
    ------
    TypeError
        ``backend`` does not take ``x``'s family, or no backend for it is
        available (e.g. CuPy input without a GPU driver).
    ValueError
        ``backend`` (or ``FASTBN_BACKEND``) names an unknown or unavailable
        backend.

    Examples
    --------
    >>> import numpy as np
    >>> import fastbn as fbn
    >>> fbn.backend_for(np.ones(3)) in ("numba", "cython", "numpy")
    True
    >>> fbn.backend_for(np.ones(3), backend="numpy")
    'numpy'
    """
    return choose(family_of(x), backend)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: use backend ``name`` for the arrays it takes inside the block.

    Like ``FASTBN_BACKEND``, it sets the default CPU backend (``"numba"``,
    ``"cython"``, ``"numpy"``); arrays of other families keep their own.  An
    explicit ``backend=`` argument still wins.  Thread- and task-local (a
    ``contextvars`` variable); blocks nest.

    Parameters
    ----------
    name : str
        ``"numba"``, ``"cython"``, ``"numpy"``, ``"cuda"`` or ``"dask"``.

    Yields
    ------
    str
        ``name``.

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        ``name`` is unknown or not available here (raised on entering).

    Examples
    --------
    >>> import numpy as np
    >>> import fastbn as fbn
    >>> x = np.ones((4, 2), np.float32)
    >>> with fbn.use_backend("numpy"):                   # the plain NumPy reference
    ...     fbn.backend_for(x)
    'numpy'
    """
    _check_name(name, "use_backend")
    if _load(name) is None:
        raise ValueError(f"use_backend: backend {name!r} is not available: {_reasons[name]}")
    token = _override.set(name)
    try:
        yield name
    finally:
        _override.reset(token)
