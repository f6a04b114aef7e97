"""Load the compiled Cython kernels built for the best instruction set this CPU has.

``setup.py`` compiles ``_cython_kernels.pyx`` once for the target's baseline
(plain x86-64: SSE2; elsewhere the compiler's default) and, on x86-64, twice
more: ``x86_64_v3`` (AVX2 + FMA + F16C) and ``x86_64_v4`` (AVX-512
F/CD/VL/BW/DQ).  All three are the same C code, the same module
``fastbn.kernels._cython_kernels``, with the same results; only the vector
width the compiler could use differs.  The wheel therefore runs on any x86-64
CPU, and as fast as a ``-march=native`` build on a recent one.

The CPU's features come from NumPy's run-time detection (cpuid, plus the OS
check that the wide registers are saved), so a CPU or hypervisor that hides
AVX-512 gets the AVX2 build.  ``FASTBN_CYTHON_ISA=baseline|x86_64_v3|x86_64_v4``
forces one (an ImportError if it is not built or this CPU lacks it).

``cython_kernels`` (attribute) is the loaded module; reading it raises
ImportError, with the reason, when none can be loaded.  ``CHOSEN`` names the
variant that was loaded (None before, or if none).
"""

import importlib.machinery
import importlib.util
import os
import sys
import warnings

NAME = "fastbn.kernels._cython_kernels"
_HERE = os.path.dirname(os.path.abspath(__file__))
#: Left by setup.py when the build failed or was skipped (see setup.py).
FAILED_NOTE = os.path.join(_HERE, "_cython_build_failed.txt")

#: Best first: (variant, the NumPy CPU features it needs; all must be present).
VARIANTS = (
    ("x86_64_v4", ("AVX512F", "AVX512CD", "AVX512VL", "AVX512BW", "AVX512DQ",
                   "AVX2", "FMA3", "F16C")),
    ("x86_64_v3", ("AVX2", "FMA3", "F16C")),
    ("baseline", ()),
)

CHOSEN = None
_module = None
_error = None


def cpu_features():
    """NumPy's run-time CPU feature table: ``{"AVX2": True, ...}`` ({} if unavailable)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:  # pragma: no cover - a NumPy without the table
            return {}
    return dict(__cpu_features__)


def supported():
    """The variants this CPU can run, best first (``"baseline"`` always last)."""
    feats = cpu_features()
    return [name for name, need in VARIANTS if all(feats.get(f, False) for f in need)]


def _file(variant, base_origin):
    """Path of ``variant``'s shared library beside the baseline's, or None if not built."""
    if variant == "baseline":
        return base_origin
    folder = os.path.dirname(base_origin)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, f"_cython_kernels_{variant}{suffix}")
        if os.path.isfile(path):
            return path
    return None


def _not_built_reason():
    if os.path.isfile(FAILED_NOTE):
        with open(FAILED_NOTE) as f:
            return f.read().strip()
    return "no compiled _cython_kernels module next to kernels/cpu_cython.py (build it with " \
           "`pip install .`, or `python setup.py build_ext --inplace` in a source tree)"


def _load():
    global CHOSEN
    # Through the import system first: a finder may refuse the module (a test's
    # blocker), and this finds the baseline wherever the package lives.
    spec = importlib.util.find_spec(NAME)
    if spec is None or spec.origin is None:
        reason = _not_built_reason()
        if os.path.isfile(FAILED_NOTE) and "FASTBN_NO_EXT" not in reason:
            warnings.warn(f"fastbn: the Cython backend is not available: {reason}. fastbn still "
                          "works (Numba, else the slow NumPy reference); reinstall with a C "
                          "compiler to get it.", RuntimeWarning, stacklevel=4)
        raise ImportError(reason)
    forced = os.environ.get("FASTBN_CYTHON_ISA", "").strip()
    can = supported()
    if forced:
        if forced not in [v for v, _ in VARIANTS]:
            raise ImportError(f"FASTBN_CYTHON_ISA={forced!r}: not one of "
                              f"{', '.join(v for v, _ in VARIANTS)}")
        if forced not in can:
            raise ImportError(f"FASTBN_CYTHON_ISA={forced}: this CPU lacks its instructions")
        can = [forced]
    for variant in can:
        path = _file(variant, spec.origin)
        if path is None:
            if forced:
                raise ImportError(f"FASTBN_CYTHON_ISA={forced}: that variant was not built")
            continue
        vspec = importlib.util.spec_from_file_location(NAME, path)
        module = importlib.util.module_from_spec(vspec)
        vspec.loader.exec_module(module)
        sys.modules[NAME] = module  # one module under its one name, whichever file it came from
        CHOSEN = variant
        return module
    raise ImportError("no _cython_kernels build for this CPU")  # pragma: no cover


def __getattr__(name):
    global _module, _error
    if name != "cython_kernels":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _module is None and _error is None:
        try:
            _module = _load()
        except ImportError as exc:
            _error = exc
    if _module is None:
        raise ImportError(str(_error))
    return _module
