"""Smoke test of the asv suite (``asv_bench/``): every benchmark's ``setup`` and
body run once, with tiny arrays, and none fails.

What runs is the documented smoke command (asv_bench/README.md, "Running")::

    cd asv_bench
    FASTBN_ASV_SMOKE=1 asv run --python=same --quick --show-stderr --launch-method forkserver

``FASTBN_ASV_SMOKE=1`` keeps every parameter grid but shrinks the S/M/L arrays
(``benchmarks/_common.py``); ``forkserver`` imports numpy/Numba/fastbn once
instead of once per parameter combination (~130 of them).  Together: ~40 s on
2 cores, against ~5 min for the plain ``--quick`` run.

Nothing is written into the repository: asv gets a copy of
``asv_bench/asv.conf.json`` in a temporary directory with its results, env and
html directories there, a temporary ``HOME`` (asv keeps its machine file in
``~/.asv-machine.json``) and ``PYTHONDONTWRITEBYTECODE``.  Only
``benchmark_dir`` points into the repo.  The benchmarks import the *installed*
fastbn (environment ``existing``): the benchmark processes run in the
temporary directory with ``PYTHONSAFEPATH``, so the repo root is never on
``sys.path`` (asv imports ``benchmarks`` from ``asv_bench/`` by path).

``asv run --quick`` with an existing environment saves no results, so the
check reads asv's console output: exit status 0, every benchmark asv
discovered (``benchmarks.json``) reported, and for each one exactly one value
per parameter combination, none ``failed`` (an exception) or ``n/a``
(skipped).  The parser is pinned by :func:`test_parser_flags_failed_and_skipped_cells`
on real output of a broken run.
"""

import json
import math
import os
import re
import site
import sys
import tempfile
from pathlib import Path

import pytest

import background

asv = pytest.importorskip("asv")
from asv import util as asv_util  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASV_DIR = ROOT / "asv_bench"
BENCH_DIR = ASV_DIR / "benchmarks"

pytestmark = pytest.mark.skipif(not (ASV_DIR / "asv.conf.json").is_file(),
                                reason="asv_bench/ not in this checkout")
pytestmark = [pytestmark, pytest.mark.integration]

#: Generous: ~40 s on the 2-core development VM.
RUN_TIMEOUT = 600

# "[ 33.33%] ··· name     status": the line asv prints per benchmark; a
# parameterised benchmark's table follows on lines with the same prefix
# ("··· ====") or indented to it.
_LINE = re.compile(r"^(\[\s*\d+(?:\.\d+)?%\] ··· )(.*)$")
# One reported value: a time (20.9±0μs, 1.88±0ms), a size (120M), a number
# (0.0129, 4.5e-05).  Parameter values (float32, NCHW, 16x4) never match.
_VALUE = re.compile(r"^-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?:±[\d.eE+-]+)?[a-zA-Zμ]{0,2}$")
_BAD = ("failed", "n/a")


def parse_run_output(text, names):
    """The values asv printed for each benchmark in ``names``.

    Returns ``{name: [cell, ...]}``: for a benchmark without parameters the
    status on its line; for a parameterised one every cell of its result table
    that is a value, ``failed`` or ``n/a`` (parameter-value cells dropped).
    A benchmark missing from the output is missing from the result.
    """
    lines = text.splitlines()
    found = {}
    i = 0
    while i < len(lines):
        m = _LINE.match(lines[i])
        i += 1
        if not m:
            continue
        prefix, rest = m.groups()
        parts = rest.split(None, 1)
        if not parts or parts[0] not in names:
            continue
        name, status = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        if status != "ok":                   # no parameters, or every combination failed
            found[name] = [status]
            continue
        # The table, re-indented to the prefix's width.  Between "===" rules:
        # a header ("name ... / ---- rule / data rows") or, with a first line
        # "--", a two-level header ended by a "===" rule, then the data rows.
        # Columns are the runs of "=" in the top rule.  --show-stderr output
        # may follow the bottom rule directly.
        table = []
        while i < len(lines) and lines[i].strip():
            t = _LINE.match(lines[i])
            table.append(" " * len(prefix) + t.group(2) if t else lines[i])
            i += 1
        eq = [k for k, row in enumerate(table) if row.strip() and set(row.strip()) <= {"=", " "}]
        if len(eq) < 2 or eq[0] != 0:
            found[name] = ["<no table>"]
            continue
        if table[1].strip().startswith("--"):
            if len(eq) < 3:
                found[name] = ["<no table>"]
                continue
            rows = table[eq[1] + 1:eq[2]]
        else:
            dash = [k for k in range(1, eq[1]) if set(table[k].strip()) <= {"-", " "}]
            rows = table[dash[0] + 1:eq[1]] if dash else []
        spans = [mm.span() for mm in re.finditer(r"=+", table[0])]
        cells = []
        for row in rows:
            for a, b in spans:
                cell = row[a:b].strip()
                if cell in _BAD or _VALUE.match(cell):
                    cells.append(cell)
        found[name] = cells
    return found


def _expected_count(bench):
    return math.prod(len(p) for p in bench["params"]) if bench["params"] else 1


def problems(text, discovered):
    """Human-readable problems in asv's output; empty when every benchmark ran.

    ``discovered``: asv's ``benchmarks.json`` (name -> description).
    """
    found = parse_run_output(text, set(discovered))
    out = []
    for name, bench in sorted(discovered.items()):
        cells = found.get(name)
        if cells is None:
            out.append(f"{name}: not reported")
            continue
        bad = [c for c in cells if c in _BAD or not _VALUE.match(c)]
        if bad:
            out.append(f"{name}: {len(bad)} of {len(cells)} results {sorted(set(bad))}")
        elif len(cells) != _expected_count(bench):
            out.append(f"{name}: {len(cells)} results, expected {_expected_count(bench)}")
    return out


def _env(home):
    env = dict(os.environ)
    # Keep the caches and user site the tests' process uses; only asv's
    # machine file (~/.asv-machine.json) goes to the temporary HOME.
    env.setdefault("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    env.setdefault("PYTHONUSERBASE", site.getuserbase())
    env.update(HOME=str(home), FASTBN_ASV_SMOKE="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONSAFEPATH="1", PYTHONIOENCODING="utf-8", COLUMNS="200")
    return env


def _asv(args, cwd, env, timeout):
    proc = background.run([sys.executable, "-m", "asv", *args], cwd=cwd, env=env, timeout=timeout,
                          encoding="utf-8", errors="replace")
    return proc.returncode, proc.stdout + proc.stderr


def _snapshot(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def run_smoke():
    """Run ``asv machine``, ``asv check`` and the smoke ``asv run`` once, in a
    temporary directory removed afterwards; what the tests check."""
    with tempfile.TemporaryDirectory(prefix="fastbn-asv-") as tmp:
        tmp = Path(tmp)
        conf = asv_util.load_json(str(ASV_DIR / "asv.conf.json"), js_comments=True)
        conf.update(repo=str(tmp), benchmark_dir=str(BENCH_DIR), env_dir=str(tmp / "env"),
                    results_dir=str(tmp / "results"), html_dir=str(tmp / "html"))
        (tmp / "asv.conf.json").write_text(json.dumps(conf, indent=1))
        env = _env(tmp / "home")
        (tmp / "home").mkdir()
        before = _snapshot(ASV_DIR)
        cfg = ["--config", str(tmp / "asv.conf.json")]
        machine = _asv(["machine", "--yes", "--machine", "ci", *cfg], tmp, env, 120)
        check = _asv(["check", "--python=same", *cfg], tmp, env, 300)
        # forkserver needs fork(); elsewhere the configured method (spawn) runs, slower.
        launch = ["--launch-method", "forkserver"] if hasattr(os, "fork") else []
        run = _asv(["run", "--python=same", "--quick", "--show-stderr", *launch, "--machine", "ci",
                    *cfg], tmp, env, RUN_TIMEOUT)
        discovered_file = tmp / "results" / "benchmarks.json"
        discovered = json.loads(discovered_file.read_text()) if discovered_file.is_file() else {}
        discovered.pop("version", None)
        return {"machine": machine, "check": check, "run": run, "discovered": discovered,
                "before": before, "after": _snapshot(ASV_DIR)}


# started when collection ends (tests/background.py), awaited by the fixture
BACKGROUND = {"asv-smoke": run_smoke} if (ASV_DIR / "asv.conf.json").is_file() else {}


@pytest.fixture(scope="module")
def smoke():
    result = background.result("asv-smoke", run_smoke)
    rc, out = result["machine"]
    assert rc == 0, out
    return result


def test_asv_check_passes(smoke):
    rc, out = smoke["check"]
    assert rc == 0, out
    assert "No problems found" in out, out


def test_every_benchmark_module_is_discovered(smoke):
    out = smoke["run"][1]
    modules = {name.split(".")[0] for name in smoke["discovered"]}
    files = {p.stem for p in BENCH_DIR.glob("bench_*.py")}
    assert files and files <= modules, f"modules without benchmarks: {sorted(files - modules)}\n{out}"


def test_quick_run_runs_every_benchmark_without_failure(smoke):
    rc, out = smoke["run"]
    assert smoke["discovered"], out
    bad = problems(out, smoke["discovered"])
    assert not bad and rc == 0, "\n".join(bad + [f"asv exit status {rc}"]) + "\n\n" + out


def test_writes_nothing_into_the_repo(smoke):
    assert smoke["after"] == smoke["before"]


# Real output of ``asv run --quick`` (asv 0.6.6) with benchmarks broken on
# purpose -- Train raising for layout NC, LayerStep raising in every call,
# Moments raising NotImplementedError (asv: skipped) for size L -- trimmed
# (padding, tracebacks): a narrow (COLUMNS=80) and a wide (COLUMNS=200) table,
# one-level and two-level headers, stderr right after a table.
_BROKEN = """\
[ 9.26%] ··· bench_bandwidth.Copy.track_bandwidth_gbps                 ok
[10.00%] ··· ========= ===================== ==================== ====================
             --                                      size
             --------- ---------------------------------------------------------------
               dtype             S                    M                    L
             ========= ===================== ==================== ====================
              float32   0.02003908339168612   0.2760757647762943   4.5523471126096595
             ========= ===================== ==================== ====================

[16.67%] ··· bench_memory.PeakMem.peakmem_train_out                          ok
[16.67%] ··· ======== ====== ======
             --            size
             -------- -------------
              layout    M      L
             ======== ====== ======
               NCHW    120M   126M
               NHWC    121M   126M
             ======== ====== ======

[33.33%] ··· bench_moments.Moments.time_moments                              ok
[33.33%] ··· ========= ======== ========== ========== =====
             --                             size
             ------------------ ---------------------------
               dtype    layout      S          M        L
             ========= ======== ========== ========== =====
              float32    NCHW    116±0μs    119±0μs    n/a
              float32    NHWC    97.1±0μs   98.7±0μs   n/a
              float32     NC     83.6±0μs   90.5±0μs   n/a
             ========= ======== ========== ========== =====

[20.00%] ···· For parameters: 'float32', 'NCHW', 'L'
              asv: skipped: NotImplementedError('deliberately skipped')

[50.00%] ··· bench_train.Train.time_train_out                        3/9 failed
[50.00%] ··· ========= ======== ========== ========== ==========
             --                               size
             ------------------ --------------------------------
               dtype    layout      S          M          L
             ========= ======== ========== ========== ==========
              float32    NCHW    22.1±0μs   31.1±0μs   1.84±0ms
              float32    NHWC    40.3±0μs   43.8±0μs   2.04±0ms
              float32     NC      failed     failed     failed
             ========= ======== ========== ========== ==========
             For parameters: 'float32', 'NC', 'S'
             Traceback (most recent call last):
               File "/work/main/asv_bench/benchmarks/bench_train.py", line 22, in time_train_out
                 raise RuntimeError("deliberately broken")
             RuntimeError: deliberately broken

[40.00%] ··· Setting up bench_small:75                                       ok
[40.00%] ··· bench_small.LayerStep.time_layer_train_step                 failed
[40.00%] ···· Traceback (most recent call last):
                File "/work/main/asv_bench/benchmarks/bench_small.py", line 84, in time_layer_train_step
                  raise RuntimeError("deliberately broken")
              RuntimeError: deliberately broken
              asv: benchmark failed (exit status 1)

[50.00%] ··· Setting up bench_small:36                                       ok
[50.00%] ··· bench_small.SmallCalls.time_train_fresh                         ok
[50.00%] ··· ============== ==========
                 shape
             -------------- ----------
                  16x4       28.6±0μs
                2500x30      56.1±0μs
              NCHW 4x3x7x5   21.5±0μs
             ============== ==========
"""


def test_parser_flags_failed_and_skipped_cells():
    grid = [["float32"], ["NCHW", "NHWC", "NC"], ["S", "M", "L"]]
    discovered = {
        "bench_bandwidth.Copy.track_bandwidth_gbps": {"params": [["float32"], ["S", "M", "L"]]},
        "bench_memory.PeakMem.peakmem_train_out": {"params": [["NCHW", "NHWC"], ["M", "L"]]},
        "bench_moments.Moments.time_moments": {"params": grid},
        "bench_train.Train.time_train_out": {"params": grid},
        "bench_small.LayerStep.time_layer_train_step": {"params": []},
        "bench_small.SmallCalls.time_train_fresh": {"params": [["16x4", "2500x30", "NCHW 4x3x7x5"]]},
        "bench_infer.Infer.time_infer_out": {"params": grid},
    }
    found = parse_run_output(_BROKEN, set(discovered))
    assert found["bench_bandwidth.Copy.track_bandwidth_gbps"] == [
        "0.02003908339168612", "0.2760757647762943", "4.5523471126096595"]
    assert found["bench_memory.PeakMem.peakmem_train_out"] == ["120M", "126M", "121M", "126M"]
    assert found["bench_moments.Moments.time_moments"].count("n/a") == 3
    assert len(found["bench_moments.Moments.time_moments"]) == 9
    assert found["bench_train.Train.time_train_out"] == ["3/9 failed"]
    assert found["bench_small.LayerStep.time_layer_train_step"] == ["failed"]
    assert found["bench_small.SmallCalls.time_train_fresh"] == ["28.6±0μs", "56.1±0μs", "21.5±0μs"]
    bad = problems(_BROKEN, discovered)
    assert sorted(b.split(":")[0] for b in bad) == [
        "bench_infer.Infer.time_infer_out",                 # not reported
        "bench_moments.Moments.time_moments",               # n/a (skipped)
        "bench_small.LayerStep.time_layer_train_step",      # failed
        "bench_train.Train.time_train_out",                 # 3/9 failed
    ]
    # A missing table row is caught by the count; a clean run has no problems.
    short = _BROKEN.replace("               NHWC    121M   126M\n", "")
    assert "bench_memory.PeakMem.peakmem_train_out: 2 results, expected 4" in problems(short, discovered)
    ok = {k: v for k, v in discovered.items() if k.startswith(("bench_bandwidth", "bench_memory", "bench_small.Small"))}
    assert problems(_BROKEN, ok) == []
