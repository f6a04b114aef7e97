"""Build script: maps ./kernels to fastbn.kernels and builds the Cython backend.

The Cython extension is optional at build time: without a working compiler the
package still installs and fastbn falls back to the Numba / NumPy backends.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but let a failed compile leave a pure-Python install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            print(f"WARNING: fastbn's Cython backend was not built ({exc})", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: fastbn extension {ext.name} was not built ({exc})", file=sys.stderr)


def extensions():
    pyx = [f for f in sorted(os.listdir("kernels")) if f.endswith(".pyx")]
    if not pyx or os.environ.get("FASTBN_NO_EXT"):
        return []
    try:
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError as exc:
        print(f"WARNING: Cython backend skipped ({exc})", file=sys.stderr)
        return []
    openmp = [] if sys.platform == "win32" else ["-fopenmp"]
    exts = [
        Extension(
            "fastbn.kernels." + os.path.splitext(f)[0],
            [os.path.join("kernels", f)],
            include_dirs=[numpy.get_include()],
            extra_compile_args=["-O3", "-march=native", *openmp] if sys.platform != "win32" else ["/O2", "/openmp"],
            extra_link_args=openmp,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for f in pyx
    ]
    return cythonize(exts, language_level=3, quiet=True)


setup(
    packages=["fastbn", "fastbn.kernels"],
    package_dir={"fastbn": "fastbn", "fastbn.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
