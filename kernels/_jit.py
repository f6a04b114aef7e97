"""Numba compilation knobs for fastbn's CPU kernels, in one place.

Every knob that changes machine code is read here from the environment, once:

``FASTBN_FASTMATH``
    Comma-separated LLVM fast-math flags (default ``reassoc,contract``).
    ``reassoc`` is what lets LLVM vectorise float reductions.  ``arcp`` is left
    out: it turns ``s / n`` into ``s * (1/n)``, so the mean of a constant
    channel was off by an ulp (var != 0); the kernels divide once per chunk,
    so exact division costs nothing.  ``nnan``/``ninf``
    are refused: they would let the compiler drop NaN propagation, and a NaN in
    one channel must give NaN statistics for that channel.
``FASTBN_CACHE`` (``0`` disables on-disk caching of compiled kernels; :func:`cache_enabled`)
``FASTBN_CACHE_DIR`` (where the cache goes; see :func:`cache_dir`)

Numba's on-disk cache is keyed by function name, source file and signature,
not by compile flags, so a kernel compiled with other flags (serial vs.
parallel, another fast-math set) could load stale machine code.  Each compiled
variant therefore gets its own function name carrying the flag key, which also
hashes the intrinsic modules' source (see _INTRINSIC_SOURCES).
"""

import functools
import hashlib
import os
import tempfile
import threading
import types

import numba
from numba.core import caching

from . import _fork, cache_enabled

_ALLOWED_FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_DEFAULT_FASTMATH = "reassoc,contract"


def _fastmath_flags():
    raw = os.environ.get("FASTBN_FASTMATH", _DEFAULT_FASTMATH)
    flags = {f.strip() for f in raw.split(",") if f.strip()}
    bad = flags - _ALLOWED_FASTMATH
    if bad:
        raise ValueError(
            f"FASTBN_FASTMATH: flags {sorted(bad)} are not allowed "
            f"(allowed: {sorted(_ALLOWED_FASTMATH)}; nnan/ninf would break NaN propagation)")
    return frozenset(flags)


FASTMATH = _fastmath_flags()
CACHE = cache_enabled()
_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
#: Modules whose code is compiled into the kernels as intrinsics.  Numba
#: invalidates a cached kernel when the kernel's own source file changes, not
#: when one of these does, so their source is part of the cache key.
_INTRINSIC_SOURCES = ("_stream.py", "_rowsums.py")


def _flag_key():
    h = hashlib.sha1(",".join(sorted(FASTMATH)).encode())
    for name in _INTRINSIC_SOURCES:
        try:
            with open(os.path.join(_KERNEL_DIR, name), "rb") as f:
                h.update(f.read())
        except OSError:  # not shipped: nothing of it can be compiled in either
            pass
    return h.hexdigest()[:8]


FLAG_KEY = _flag_key()


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _private_temp_dir(name):
    """``<temp dir>/name``, made 0700, or None if it is not ours alone.

    The temp dir is shared: a directory someone else made there (or one others
    can write) could hold cached machine code that would run in this process.
    """
    try:
        path = os.path.join(tempfile.gettempdir(), name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:  # no usable temp dir at all (FileNotFoundError)
        return None
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != uid or st.st_mode & 0o022:
        return None
    return path


@functools.lru_cache(maxsize=None)
def cache_dir():
    """The directory fastbn's compiled kernels are cached in, or None.

    First writable of: ``$FASTBN_CACHE_DIR``, ``$NUMBA_CACHE_DIR/fastbn``, the
    package's ``__pycache__``, ``$XDG_CACHE_HOME/fastbn`` (``~/.cache``), and a
    private (0700, ours) per-user directory under the system temp dir.  A
    read-only install with an unwritable HOME thus still caches (in /tmp)
    instead of failing at import; with nowhere to write, kernels compile uncached.
    """
    candidates = []
    if os.environ.get("FASTBN_CACHE_DIR"):
        candidates.append(os.environ["FASTBN_CACHE_DIR"])
    if os.environ.get("NUMBA_CACHE_DIR"):
        candidates.append(os.path.join(os.environ["NUMBA_CACHE_DIR"], "fastbn"))
    candidates.append(os.path.join(_KERNEL_DIR, "__pycache__"))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(os.path.join(xdg, "fastbn"))
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    candidates.append(_private_temp_dir(f"fastbn-cache-{uid}"))
    for path in candidates:
        if path is not None and _writable(path):
            return path
    return None


class _FastbnCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba cache locator for fastbn's kernel files only: puts them in cache_dir()."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(cache_dir(), self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != _KERNEL_DIR or cache_dir() is None:
            return None
        return super().from_function(py_func, py_file)


if _FastbnCacheLocator not in caching.CacheImpl._locator_classes:
    # Ours first, but it only answers for files in this directory.
    caching.CacheImpl._locator_classes.insert(0, _FastbnCacheLocator)


def _renamed(func, suffix):
    """A copy of ``func`` under a new name, so each variant caches separately."""
    clone = types.FunctionType(func.__code__, func.__globals__, func.__name__ + suffix,
                               func.__defaults__, func.__closure__)
    clone.__qualname__ = func.__qualname__ + suffix
    clone.__module__ = func.__module__
    clone.__doc__ = func.__doc__
    return clone


def _compile(func, parallel):
    suffix = f"__{'par' if parallel else 'ser'}_{FLAG_KEY}"
    py = _renamed(func, suffix)
    options = dict(nogil=True, fastmath=set(FASTMATH), parallel=parallel, error_model="numpy",
                   boundscheck=False)
    if CACHE and cache_dir() is not None:
        try:
            return numba.njit(cache=True, **options)(py)
        except RuntimeError:  # no cache locator usable: compile without caching
            pass
    return numba.njit(cache=False, **options)(py)


def helper(func):
    """An inlined serial helper called from kernels (same fast-math flags)."""
    return _compile(func, parallel=False)


class Kernel:
    """A kernel compiled twice from one Python function: ``.serial`` and ``.parallel``.

    ``prange`` loops run in parallel only in ``.parallel``.  Small inputs go to
    ``.serial`` (no thread hand-off); see :func:`run`.
    """

    def __init__(self, func):
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__
        self.serial = _compile(func, parallel=False)
        self.parallel = _compile(func, parallel=True)


def kernel(func):
    """Decorator: compile ``func`` as a serial and a parallel Numba kernel."""
    return Kernel(func)


# -- threading ---------------------------------------------------------------
# fastbn changes nothing process-wide: no threading layer is forced (that
# would choose the layer of the caller's own parallel Numba code too) and no
# OpenMP variable is set.  GOMP_SPINCOUNT=10000 was set here to keep libgomp's
# idle workers from spinning ~300k iterations between calls; measured (2 cores,
# 6.4 MB float32 moments3 then four 256^2 float32 matmuls, x10, min of 30):
# Numba 93 ms without it vs 12.4 ms with it, Cython 72 vs 16 ms; ten
# back-to-back moments3 calls 1.5 vs 2.1 ms.  A user who mixes fastbn with
# OpenBLAS/other thread pools sets OMP_WAIT_POLICY=passive or GOMP_SPINCOUNT.
# Numba's default layer is tbb, then omp, then workqueue; only workqueue is not
# thread-safe (it aborts the process when two threads enter a parallel region
# at once), so under it parallel calls take a lock.
_workqueue_lock = threading.Lock()
_layer_checked = None


def _threading_layer():
    global _layer_checked
    if _layer_checked is None:
        try:
            _layer_checked = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            return None
    return _layer_checked


def run(kern, parallel, *args):
    """Call ``kern.parallel(*args)`` if ``parallel`` else ``kern.serial(*args)``.

    Serial in a child forked from a multithreaded process (see _fork).
    Parallel calls are serialised under the workqueue layer (and the first
    one, before the layer is known).
    """
    if not parallel or _fork.serial_only():
        return kern.serial(*args)
    _fork.note_parallel()
    layer = _threading_layer()
    if layer is not None and layer != "workqueue":
        return kern.parallel(*args)
    with _workqueue_lock:
        return kern.parallel(*args)
