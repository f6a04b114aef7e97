"""``import fastbn`` from a source checkout: hand over to the installed package, or
map the checkout's ``kernels/`` in as ``fastbn.kernels``.

The repository keeps the package (``fastbn/``) and its kernels (``kernels/``)
side by side; ``setup.py`` installs ``kernels/`` as ``fastbn.kernels``.  Python
run in the repository root (``python -m fastbn demo``, ``python -m pytest``, a
pasted API tour) finds ``./fastbn`` first on ``sys.path``, and that folder has
no ``kernels`` subpackage.  ``fastbn/__init__.py`` calls :func:`adopt` in that
case only (a folder ``fastbn/kernels`` next to it means an installed package),
and then:

1. if an editable install of this same checkout is active, its import hook
   already maps ``fastbn.kernels`` to ``./kernels``: nothing to do;
2. else, if another ``fastbn`` is installed (a non-editable install, or an
   editable install of another checkout), that one is imported instead:
   ``sys.modules["fastbn"]`` is replaced before this import statement returns,
   so ``import fastbn`` gives the installed package, and every
   ``fastbn.*`` submodule comes from there (the rest of this checkout's
   ``fastbn/__init__.py`` then only re-imports names from it);
3. else (a bare checkout, dependencies installed but not fastbn) a meta-path
   finder maps ``fastbn.kernels`` to ``./kernels``, so the sources run as they
   are, with the Cython backend if it was built in place
   (``python setup.py build_ext --inplace``).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

#: Which of the three cases happened: "editable", "installed" or "source" (None: not called).
MODE = None


def _same(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``fastbn.kernels`` in the checkout's ``kernels/`` folder (case 3)."""

    def __init__(self, folder):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "fastbn.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.folder, "__init__.py"),
            submodule_search_locations=[self.folder])


def _installed_spec(pkg_dir):
    """The spec of a ``fastbn`` other than the one in ``pkg_dir``, or None.  Asks the
    meta-path finders after the path-based one (editable installs' hooks) first: for
    names they map, they take precedence over site-packages."""
    root = os.path.dirname(pkg_dir)
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or isinstance(finder, _KernelsFinder):
            continue
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find("fastbn", None)
        except Exception:  # noqa: BLE001 - a foreign finder's problem is not ours
            continue
        if spec is not None and spec.origin and not _same(os.path.dirname(spec.origin), pkg_dir):
            return spec
    others = [p for p in sys.path if not _same(p or os.curdir, root)]
    spec = importlib.machinery.PathFinder.find_spec("fastbn", others)
    if spec is not None and spec.origin and not _same(os.path.dirname(spec.origin), pkg_dir):
        return spec
    return None


def adopt(module_globals):
    """Make the ``fastbn`` being imported (whose globals are given) usable; see above."""
    global MODE
    pkg_dir = os.path.dirname(os.path.abspath(module_globals["__file__"]))
    kernels = os.path.join(os.path.dirname(pkg_dir), "kernels")
    try:
        spec = importlib.util.find_spec("fastbn.kernels")
    except (ImportError, ValueError):
        spec = None
    if (spec is not None and spec.origin and _same(os.path.dirname(spec.origin), kernels)
            and not any(isinstance(f, _KernelsFinder) for f in sys.meta_path)):
        MODE = "editable"  # this checkout, installed in editable mode
        return
    other = _installed_spec(pkg_dir)
    if other is not None:
        MODE = "installed"
        for name in [m for m in sys.modules if m.startswith("fastbn.")]:
            del sys.modules[name]  # this module included: everything from the installed copy
        module = importlib.util.module_from_spec(other)
        sys.modules["fastbn"] = module
        other.loader.exec_module(module)
        return
    if os.path.isfile(os.path.join(kernels, "__init__.py")):
        MODE = "source"
        if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _KernelsFinder(kernels))
