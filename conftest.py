"""Make the test suite import the *installed* fastbn, never the source tree.

``python -m pytest`` puts the current directory on ``sys.path``; from the repo
root, ``import fastbn`` would then find ``./fastbn``, which lacks
``fastbn.kernels`` (``./kernels`` is mapped to ``fastbn.kernels`` only by the
install).  Drop the repo root from ``sys.path`` before anything imports
fastbn; an editable install (``pip install -e .``) still resolves to these
sources through its import hook.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
# Subprocesses the tests start (``python -c``, ``python -m fastbn``) would put
# their working directory -- often this root -- first on sys.path too;
# PYTHONSAFEPATH (Python >= 3.11) stops that for every child.
os.environ["PYTHONSAFEPATH"] = "1"

_stale = sys.modules.get("fastbn")
if _stale is not None and not hasattr(_stale, "kernels") and "fastbn.kernels" not in sys.modules:
    for name in [m for m in sys.modules if m == "fastbn" or m.startswith("fastbn.")]:
        del sys.modules[name]

try:
    import fastbn.kernels  # noqa: F401,E402
except ImportError as exc:  # pragma: no cover - environment problem, not a test failure
    raise SystemExit(f"fastbn is not installed ({exc}); run: pip install '.[test]'") from exc
