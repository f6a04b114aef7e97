"""Build script: maps ./kernels to fastbn.kernels and builds the Cython backend.

The Cython extension is optional: without a working compiler the package still
installs and fastbn falls back to the Numba / NumPy backends.  A failed build
prints a warning here (pip shows it with ``pip install -v``) and leaves a note
in the package (``fastbn/kernels/_cython_build_failed.txt``), so that fastbn
says why once, as a RuntimeWarning, when the Cython backend is first asked for
(``fastbn.backends()["cython"]`` gives the reason too).

Portable machine code.  The one ``.pyx`` is compiled for the baseline of the
target (plain x86-64: SSE2) and, on x86-64 with GCC or Clang, twice more:
``x86_64_v3`` (AVX2 + FMA + F16C) and ``x86_64_v4`` (AVX-512 F/CD/VL/BW/DQ).
``kernels/_isa.py`` loads the best one the CPU has at import (NumPy's run-time
CPU detection).  The variants are the same C file (one cythonize), so every
variant is the same module ``fastbn.kernels._cython_kernels``.

Environment:

``FASTBN_NATIVE=1``
    compile one extension with ``-march=native`` (fastest on the build
    machine, may crash elsewhere: never for wheels you ship).
``FASTBN_NO_EXT=1``
    build no extension (pure-Python install).
``FASTBN_REQUIRE_EXT=1``
    a failed compile fails the build instead of warning (CI).
"""

import os
import platform
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

PYX = os.path.join("kernels", "_cython_kernels.pyx")
MODULE = "fastbn.kernels._cython_kernels"
#: The fast lane's compiled argument checks (no OpenMP, one build for every CPU);
#: fastbn/fastlane.py runs its Python twins when this is missing.
LANE_PYX = os.path.join("kernels", "lane_checks.pyx")
LANE_MODULE = "fastbn.kernels.lane_checks"
#: Written next to the extension when it could not be built; read by kernels/_isa.py.
FAILED_NOTE = "_cython_build_failed.txt"

#: (suffix, extra GCC/Clang flags) of the per-ISA variants on x86-64.  The flags name
#: exactly the features kernels/_isa.py checks (no -march=x86-64-v3, which would also
#: allow BMI/LZCNT/MOVBE instructions that the check does not look for).
X86_VARIANTS = [
    ("x86_64_v3", ["-mavx2", "-mfma", "-mf16c"]),
    ("x86_64_v4", ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512cd", "-mavx512vl",
                   "-mavx512bw", "-mavx512dq"]),
]


def _flag(name):
    return os.environ.get(name, "").strip() not in ("", "0")


def _warn(msg):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """Build the extension and its ISA variants; a failed compile warns, leaves a note
    in the package and lets the rest install."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the variants compile side by side (threads)
            self.parallel = os.cpu_count() or 1
        self._add_variants()

    def _note_path(self):
        # next to where the baseline extension goes (build_lib, or ./kernels in place)
        return os.path.join(os.path.dirname(self.get_ext_fullpath(MODULE)), FAILED_NOTE)

    def _write_note(self, text):
        path = self._note_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text.strip() + "\n")

    def run(self):
        self._failed = []
        note = self._note_path()
        if os.path.exists(note):  # from an earlier failed build in place
            os.remove(note)
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._failed.append((MODULE, exc))
        base_failed = [exc for name, exc in self._failed if name == MODULE]
        if base_failed:
            why = f"{type(base_failed[0]).__name__}: {base_failed[0]}"
            why = why if len(why) < 400 else why[:200] + " ... " + why[-150:]
            self._write_note(f"the build failed when fastbn was installed ({why})")
            _warn(f"fastbn's Cython backend failed to build ({why}). fastbn still works "
                  "(Numba, else the slow NumPy reference); install a C compiler and the "
                  "Python headers and reinstall to get it.")
            if _flag("FASTBN_REQUIRE_EXT"):
                raise SystemExit(f"FASTBN_REQUIRE_EXT=1 and the Cython backend failed to build: {why}")
        lane_failed = [exc for name, exc in self._failed if name == LANE_MODULE]
        if lane_failed:
            _warn(f"fastbn: the fast lane's compiled checks were not built ({lane_failed[0]}); "
                  "its Python checks are used (same results, ~5 us more per small call)")
            if _flag("FASTBN_REQUIRE_EXT"):
                raise SystemExit(f"FASTBN_REQUIRE_EXT=1 and {LANE_MODULE} failed to build: "
                                 f"{lane_failed[0]}")
        for name, exc in [] if base_failed else self._failed:
            if name not in (MODULE, LANE_MODULE):
                _warn(f"fastbn: the {name} variant was not built ({exc}); the portable "
                      "build is used on CPUs it would have served (slower, same results)")

    def _add_variants(self):
        """Append the per-ISA copies of the extension (x86-64, GCC/Clang only)."""
        base = next((e for e in self.extensions if e.name == MODULE), None)
        if base is None or _flag("FASTBN_NATIVE") or not _x86_64() or self.compiler_type() != "unix":
            return
        c_src = base.sources[0]
        for suffix, flags in X86_VARIANTS:
            if any(e.name == f"{MODULE}_{suffix}" for e in self.extensions):
                continue  # run() again (build, then install)
            # A one-line wrapper per variant, so every variant compiles to its own
            # object file (build_ext names objects after their sources).
            wrapper = os.path.join(self.build_temp, "isa", suffix, "_cython_kernels.c")
            os.makedirs(os.path.dirname(wrapper), exist_ok=True)
            line = f'#include "{os.path.abspath(c_src)}"\n'
            if not os.path.exists(wrapper) or open(wrapper).read() != line:
                with open(wrapper, "w") as f:
                    f.write(line)
            ext = Extension(
                f"{MODULE}_{suffix}", [wrapper], depends=[c_src, *base.depends],
                include_dirs=base.include_dirs, define_macros=base.define_macros,
                extra_compile_args=base.extra_compile_args + flags,
                extra_link_args=base.extra_link_args)
            # what setuptools' finalize_options sets on each extension (editable builds read it)
            for attr in ("_links_to_dynamic", "_needs_stub"):
                if hasattr(base, attr):
                    setattr(ext, attr, getattr(base, attr))
            ext._full_name = ext.name
            if isinstance(getattr(self, "ext_map", None), dict):
                self.ext_map[ext.name] = ext
            self.extensions.append(ext)

    def compiler_type(self):
        from setuptools._distutils.ccompiler import get_default_compiler
        return self.compiler if isinstance(self.compiler, str) else (
            getattr(self.compiler, "compiler_type", None) or get_default_compiler())

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._failed.append((ext.name, exc))

    def get_export_symbols(self, ext):
        # every variant is the module _cython_kernels: its init function is PyInit__cython_kernels
        return [] if ext.name.startswith(MODULE + "_") else super().get_export_symbols(ext)


def _x86_64():
    return platform.machine().lower() in ("x86_64", "amd64")


def _compile_args():
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    arch = ["-march=native"] if _flag("FASTBN_NATIVE") else []
    # strip the symbol table (0.5 MB instead of 2.4 MB per variant); Python needs only
    # the dynamic symbols, which stripping keeps
    strip = ["-Wl,--strip-all"] if sys.platform.startswith("linux") else (
        ["-Wl,-x"] if sys.platform == "darwin" else [])
    return ["-O3", *arch, *openmp], [*openmp, *strip]


def extensions(dist_note):
    """The baseline extension (cythonized); dist_note(reason) records why there is none."""
    if not os.path.exists(PYX):
        dist_note(f"{PYX} is missing from the source")
        return []
    if _flag("FASTBN_NO_EXT"):
        dist_note("FASTBN_NO_EXT=1 at install")
        return []
    try:
        import numpy
        from Cython.Build import cythonize
    except ImportError as exc:
        dist_note(f"Cython/NumPy not importable at build time ({exc})")
        return []
    cflags, lflags = _compile_args()
    npy = dict(include_dirs=[numpy.get_include()],
               define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    ext = Extension(MODULE, [PYX], extra_compile_args=cflags, extra_link_args=lflags, **npy)
    try:
        exts = cythonize([ext], language_level=3, quiet=True)
    except Exception as exc:  # noqa: BLE001 - a Cython compile error
        dist_note(f"cythonize failed ({type(exc).__name__}: {exc})")
        return []
    lane = Extension(LANE_MODULE, [LANE_PYX], **npy,
                     extra_compile_args=[f for f in cflags if "openmp" not in f],
                     extra_link_args=[f for f in lflags if "openmp" not in f])
    try:   # apart: without it the backend still builds, and the lane checks in Python
        exts += cythonize([lane], language_level=3, quiet=True)
    except Exception as exc:  # noqa: BLE001
        _warn(f"fastbn: the fast lane's compiled checks will not be built ({exc}); its "
              "Python checks are used (same results, ~5 us more per small call)")
        if _flag("FASTBN_REQUIRE_EXT"):
            raise SystemExit(f"FASTBN_REQUIRE_EXT=1 and {LANE_PYX} failed to cythonize: {exc}")
    return exts


class BuildPy(build_py):
    """Also leaves the note saying why no extension was built, when none was."""

    def run(self):
        super().run()
        if _skipped and not self.editable_mode:
            path = os.path.join(self.build_lib, *MODULE.split(".")[:-1], FAILED_NOTE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"not built: {_skipped[0]}\n")


_skipped = []
_exts = extensions(_skipped.append)
if _skipped and not _flag("FASTBN_NO_EXT"):
    _warn(f"fastbn's Cython backend will not be built: {_skipped[0]}")
    if _flag("FASTBN_REQUIRE_EXT"):
        raise SystemExit(f"FASTBN_REQUIRE_EXT=1 and the Cython backend cannot be built: {_skipped[0]}")

setup(
    # ./fastbn and its subpackages; ./kernels (and any subpackages) as fastbn.kernels
    packages=["fastbn", *(f"fastbn.{p}" for p in find_packages("fastbn")),
              "fastbn.kernels", *(f"fastbn.kernels.{p}" for p in find_packages("kernels"))],
    package_dir={"fastbn": "fastbn", "fastbn.kernels": "kernels"},
    package_data={"fastbn": ["py.typed"]},
    # the sdist carries the .pyx (and a generated .c may lie beside it): not the wheel
    exclude_package_data={"fastbn.kernels": ["*.c", "*.pyx", "*.html", FAILED_NOTE]},
    ext_modules=_exts,
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPy},
    zip_safe=False,
)
