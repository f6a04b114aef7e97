"""Say which fastbn the tests run against, and stop early if it cannot run.

From the checkout's root, ``import fastbn`` finds ``./fastbn`` first; that
package hands over to the installed fastbn (or maps ``./kernels`` in for a bare
checkout): see ``fastbn/_source_tree.py``.  So ``python -m pytest`` tests the
installed package after ``pip install ".[test]"`` and these sources after
``pip install -e ".[test]"``.  The header line of the run names which.
"""

import os

try:
    import fastbn
    import fastbn.kernels  # noqa: F401
except ImportError as exc:  # pragma: no cover - environment problem, not a test failure
    raise SystemExit(f"fastbn cannot be imported ({exc}); run: pip install '.[test]'") from exc


def _where():
    pkg = os.path.dirname(os.path.abspath(fastbn.__file__))
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(pkg) == here:
        import fastbn._source_tree as st
        kind = {"editable": "editable install of this checkout",
                "source": "this checkout, not installed"}.get(st.MODE, "this checkout")
    else:
        kind = "installed"
    return f"{pkg} ({kind})"


def pytest_report_header(config):
    try:
        from fastbn.kernels import _isa
        _isa.cython_kernels  # noqa: B018 - loads the variant for this CPU
        cython = f"cython build: {_isa.CHOSEN}"
    except ImportError as exc:
        cython = f"cython: {exc}"
    return [f"fastbn {getattr(fastbn, '__version__', '?')}: {_where()}; {cython}"]
