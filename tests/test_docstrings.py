"""The docstrings' examples run, and the command line's help is plain text.

Every ``Examples`` section of the public modules is a doctest, run here with
the standard library's ``doctest`` so the examples cannot rot.  Printed floats
are compared to the precision the example writes (the ``NUMBER`` option, as
pytest's): ``0.9995`` in an example matches ``0.9995004`` from a backend, so an
example holds on every CPU backend and NumPy version.
"""

import contextlib
import doctest
import importlib
import inspect
import io
import math
import re

import numpy as np
import pytest

import fastbn
from fastbn.__main__ import main

# The same flag value as pytest's NUMBER when pytest registered it already.
NUMBER = doctest.register_optionflag("NUMBER")
FLAGS = NUMBER | doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

MODULES = ("fastbn.api", "fastbn.merge", "fastbn.layer", "fastbn.dispatch")

# A float literal with a fraction or an exponent (integers compare exactly).
_FLOAT = re.compile(r"""
    (?P<number>
      (?P<mantissa>
        (?P<integer1> [+-]?\d*)\.(?P<fraction>\d+)
        |
        (?P<integer2> [+-]?\d+)\.
      )
      (?:[Ee](?P<exponent1>[+-]?\d+))?
      |
      (?P<integer3> [+-]?\d+)
      (?:[Ee](?P<exponent2>[+-]?\d+))
    )""", re.VERBOSE)


class NumberChecker(doctest.OutputChecker):
    """``doctest.OutputChecker`` with ``NUMBER``: each float written in the
    expected output matches the actual one to the written precision."""

    def check_output(self, want, got, optionflags):
        if super().check_output(want, got, optionflags):
            return True
        if not optionflags & NUMBER:
            return False
        return super().check_output(want, _rounded_like(want, got), optionflags)


def _rounded_like(want, got):
    """``got`` with each number replaced by ``want``'s where they agree to the
    precision ``want`` writes; ``got`` unchanged if the counts differ."""
    wants = list(_FLOAT.finditer(want))
    gots = list(_FLOAT.finditer(got))
    if len(wants) != len(gots):
        return got
    offset = 0
    for w, g in zip(wants, gots):
        fraction = w.group("fraction") or ""
        exponent = w.group("exponent1") or w.group("exponent2") or "0"
        tol = 10.0 ** (-len(fraction) + int(exponent))
        wv, gv = float(w.group()), float(g.group())
        if math.isclose(wv, gv, rel_tol=0.0, abs_tol=tol * 1.0000001):
            got = got[:g.start() + offset] + w.group() + got[g.end() + offset:]
            offset += len(w.group()) - (g.end() - g.start())
    return got


def _doctests(modname):
    mod = importlib.import_module(modname)
    return [t for t in doctest.DocTestFinder().find(mod, modname) if t.examples]


def _run(test):
    runner = doctest.DocTestRunner(checker=NumberChecker(), optionflags=FLAGS)
    report = io.StringIO()
    old = np.get_printoptions()
    try:
        result = runner.run(test, out=report.write)
    finally:
        np.set_printoptions(**old)
    return result, report.getvalue()


@pytest.mark.parametrize("modname", MODULES)
def test_examples(modname, backend):
    """Every example of ``modname`` passes, on each CPU backend (the ``backend`` fixture)."""
    tests = _doctests(modname)
    assert tests, f"{modname} has no examples"
    failures = []
    with fastbn.use_backend(backend):
        for test in tests:
            result, report = _run(test)
            if result.failed:
                failures.append(report)
    assert not failures, "\n".join(failures)


def test_torch_examples():
    """The examples of ``fastbn.torch`` (PyTorch modules), where PyTorch is installed."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tests = _doctests("fastbn.torch")
    names = {t.name.rsplit(".", 1)[-1] for t in tests}
    assert {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"} <= names
    failures = [report for result, report in map(_run, tests) if result.failed]
    assert not failures, "\n".join(failures)


def _sections(obj):
    """The numpydoc sections an object's docstring must have."""
    if isinstance(obj, type):
        return ("Parameters", "Examples") if "__init__" in vars(obj) else ("Attributes", "Examples")
    wanted = ["Returns", "Raises", "Examples"] if obj is not fastbn.backends else ["Returns", "Examples"]
    if inspect.signature(obj).parameters:
        wanted.insert(0, "Parameters")
    if inspect.isgeneratorfunction(inspect.unwrap(obj)):
        wanted[wanted.index("Returns")] = "Yields"
    return wanted


@pytest.mark.parametrize("name", fastbn.__all__)
def test_public_docstring_sections(name):
    """A one-line summary and numpydoc sections on every name of ``fastbn.__all__``,
    and type hints on every argument and the result."""
    obj = getattr(fastbn, name)
    doc = inspect.getdoc(obj) or ""
    first, _, rest = doc.partition("\n")
    assert first.strip() and (not rest or rest.startswith("\n")), "first line: a one-line summary"
    missing = [sec for sec in _sections(obj) if f"\n{sec}\n{'-' * len(sec)}\n" not in doc]
    assert not missing, f"{name} lacks {missing}"
    fn = obj.__init__ if isinstance(obj, type) and "__init__" in vars(obj) else obj
    if not isinstance(fn, type):
        hints = {k for k, v in inspect.signature(fn).parameters.items()
                 if v.annotation is not inspect.Parameter.empty or k == "self"}
        assert hints == set(inspect.signature(fn).parameters), f"{name}: unannotated arguments"
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty


def test_number_checker():
    checker = NumberChecker()
    assert checker.check_output("array([0.9995, 1.  ])\n", "array([0.9995004, 0.999995 ])\n", FLAGS)
    assert not checker.check_output("array([0.9995])\n", "array([0.9997])\n", FLAGS)
    assert not checker.check_output("3.5\n", "3.5 4.5\n", FLAGS)
    assert checker.check_output("1.5e-07\n", "1.5234e-07\n", FLAGS)


# -- the command line's help -----------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"]],
                         ids=["main", "demo", "bench"])
def test_help_is_plain_text(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = out.getvalue()
    assert "usage:" in text
    for bad in ("`", ":func:", ":mod:", ":class:", "issue"):
        assert bad not in text.lower(), f"{bad!r} in the help of {' '.join(argv)}:\n{text}"
