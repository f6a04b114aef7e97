"""Smoke tests of ``python -m fastbn bench`` (the measurement harness, not the speed).

Tiny sizes (``--quick``) and the NumPy backend keep them fast; what they check
is that every column is printed, that the roofline arithmetic is the one
documented, that runners are interleaved, and that the options work.
"""

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import fastbn as fbn
from fastbn.tools import bench


def _args(*argv):
    return bench.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


COLUMNS = ["case", "runner", "threads", "unit", "min", "median", "peer/fastbn (min / med)",
           "roofline fraction (min / med)", "copy GB/s (case / best)"]


def _table_rows(text):
    """Rows of the first markdown table in ``text`` as lists of cells."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("| case | runner"):
            started = True
            header = [c.strip() for c in line.strip("|").split("|")]
            continue
        if started:
            if not line.startswith("|"):
                break
            if line.startswith("|---"):
                continue
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


def test_quick_prints_every_column_and_target(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    rc = bench.run(_args("--quick", "--backend", "numpy", "--repeat", "2", "--settle", "0",
                         "--cases", "train NCHW (128|(16,4)|import", "--json", str(out_json)))
    assert rc == 0
    text = capsys.readouterr().out
    header, rows = _table_rows(text)
    assert header == COLUMNS
    cases = {r[0] for r in rows}
    assert any(c.startswith("train NCHW (4,8,12,12)") for c in cases)      # quick shape shown
    assert any(c.startswith("train (16,4)") for c in cases)
    assert any(c.startswith("import + first train call") for c in cases)
    fb = [r for r in rows if r[1] == "fastbn" and r[0].startswith("train NCHW")]
    assert len(fb) == 1
    tmin, tmed = float(fb[0][4]), float(fb[0][5])
    assert 0 < tmin <= tmed
    fmin, fmed = (float(v) for v in fb[0][7].split("/"))
    assert fmin > 0 and fmin >= fmed
    case_bw, best_bw = (float(v) for v in fb[0][8].split("/"))           # copy GB/s
    assert 0 < case_bw <= best_bw
    peers = [r for r in rows if r[0] == fb[0][0] and r[1] != "fastbn"]
    assert any(r[1] == "numpy naive" for r in peers)
    for r in peers:                                                     # ratio column filled
        assert re.fullmatch(r"[\d.]+ / [\d.]+", r[6]), r
    assert "### Targets" in text
    assert ">= 0.8 of the 3B roofline" in text and "<= 5 us" in text and "<= 0.5 s" in text
    data = json.loads(out_json.read_text())
    assert data["quick"] is True and len(data["results"]) == 3


def test_roofline_fraction_is_bytes_over_bandwidth_over_time():
    case = next(c for c in bench.CASES if c.mode == "backward")
    args = _args("--quick", "--backend", "numpy", "--no-torch", "--repeat", "2", "--settle", "0")
    res = bench.run_case(case, args, bench.Env(threads=args.threads, torch=False), "numpy", 2)
    assert res["roofline_bytes"] == 5 * res["bytes"]
    copies = [r for r in res["runners"] if r["role"] == "copy"]
    assert copies
    bw = max(2 * res["bytes"] / r["min_s"] for r in copies)
    assert res["bandwidth_gbps"] == pytest.approx(bw / 1e9)
    fb = next(r for r in res["runners"] if r["role"] == "fastbn")
    assert fb["frac_min"] == pytest.approx(5 * res["bytes"] / bw / fb["min_s"])
    assert fb["frac_median"] == pytest.approx(5 * res["bytes"] / bw / fb["median_s"])


def test_measure_interleaves_and_alternates_order():
    calls = []
    runners = [bench.Runner(name, (lambda n=name: calls.append(n)), "peer") for name in "abc"]
    bench.measure(runners, repeat=3, warmup=1, min_batch=0.0)
    assert all(len(r.times) == 3 and r.number == 1 for r in runners)
    timed = calls[3 * 2:]        # after calibration: first call + 1 warm-up each
    assert timed == list("abc") + list("cba") + list("abc")


def test_targets_cover_issue_5_table():
    names = " | ".join(c.name for c in bench.CASES)
    for needle in ["train NCHW (128,64,56,56)", "train NHWC (128,56,56,64)",
                   "infer NCHW (128,64,56,56)", "infer NHWC (128,56,56,64)",
                   "backward NCHW (128,64,56,56)", "backward NHWC (128,56,56,64)",
                   "train NCHW (32,64,56,56)", "train NHWC (32,56,56,64)", "(4096,1024)",
                   "(2500,30)", "(16,4)", "fresh out", "float64 NCHW (32,64,56,56)", "import"]:
        assert needle in names, needle
    goals = {(c.mode, t.kind, t.goal) for c in bench.CASES for t in c.targets}
    assert {("train", "frac", 0.8), ("infer", "frac", 0.85), ("backward", "frac", 0.75),
            ("train", "time", 15.0), ("train", "time", 5.0), ("import", "time", 0.5),
            ("train", "frac", 0.7), ("fresh", "ratio", 1.0)} <= goals


def test_case_filter():
    assert [c.name for c in bench.select(bench.CASES, "nhwc (128")] == [
        "train NHWC (128,56,56,64)", "infer NHWC (128,56,56,64)", "backward NHWC (128,56,56,64)",
        "fresh out NHWC (128,56,56,64)"]
    assert bench.select(bench.CASES, "no such case") == []


def test_evaluate_verdicts():
    case = bench.Case("train NCHW", "train", (2, 2), (2, 2), targets=(bench.Target("frac", 0.8, "t"),
                                                                     bench.Target("ratio", 2.0, "t")))
    res = {"case": "c", "runners": [
        {"label": "fastbn", "role": "fastbn", "min_s": 1.0, "median_s": 2.0, "frac_min": 0.9,
         "frac_median": 0.5},
        {"label": "torch native_batch_norm.out", "role": "peer", "min_s": 3.0, "median_s": 3.0}]}
    v = bench.evaluate(res, case)
    assert [x["met"] for x in v] == ["min only", "min only"]      # 0.9/0.5 vs 0.8; 3.0/1.5 vs 2


@pytest.mark.integration
def test_cli_entry_point():
    res = subprocess.run([sys.executable, "-m", "fastbn", "bench", "--quick", "--backend", "numpy",
                          "--no-torch", "--repeat", "1", "--settle", "0", "--cases", "(16,4)"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    header, rows = _table_rows(res.stdout)
    assert header == COLUMNS and rows and rows[0][0].startswith("train (16,4)")


def test_fractions_use_the_best_copy_of_the_same_size():
    def res(name, copy_gbps, nbytes=1000):
        r = {"case": name, "bytes": nbytes, "roofline_bytes": 3 * nbytes, "runners": [
            {"label": "fastbn", "role": "fastbn", "min_s": 1e-7, "median_s": 2e-7},
            {"label": "copy x", "role": "copy", "gbps_min": copy_gbps, "min_s": 2 * nbytes / copy_gbps / 1e9}]}
        bench.set_bandwidth(r, copy_gbps, "copy x")
        return r
    results = [res("a", 10.0), res("b", 40.0), res("c", 5.0, nbytes=500)]
    best = bench.use_best_bandwidth(results)
    assert best[1000][0] == 40.0 and best[500][0] == 5.0
    assert results[0]["bandwidth_gbps"] == 40.0
    assert results[0]["runners"][0]["frac_min"] == pytest.approx(3000 / 40e9 / 1e-7)   # 0.75
    assert results[2]["runners"][0]["frac_median"] == pytest.approx(1500 / 5e9 / 2e-7)


def test_numba_copy_kernel_copies_every_block():
    pytest.importorskip("numba")
    from fastbn.tools import harness
    pcopy = harness.make_numba_copy()
    assert pcopy
    for n in (1, 7, 1000, 4099):
        src = np.arange(n, dtype=np.float32) + 1
        for blocks in (1, 2, 3, 8):
            dst = np.zeros_like(src)
            pcopy(src, dst, blocks)
            np.testing.assert_array_equal(dst, src)


@pytest.mark.skipif(fbn.backends()["numba"] != "available", reason="needs numba")
def test_calls_table_has_every_function(capsys):
    """``bench --calls``: a row per public function (and layer call) per input,
    numbers in every cell (no timing is judged here)."""
    from fastbn.tools import calls
    args = argparse.Namespace(repeat=1, quick=True)
    assert calls.run(args) == 0
    table = [r.strip("|").split("|") for r in capsys.readouterr().out.splitlines()
             if r.startswith("| ") and "---" not in r and not r.startswith("| input ")]
    rows = [r for r in table if len(r) == 5]
    # with torch, a second table: one module-step row per input, 4 cells
    modules = [r for r in table if len(r) == 4]
    names = {r[1].strip() for r in rows}
    assert {"batch_norm_train", "batch_norm_infer", "batch_norm_backward",
            "batch_norm_infer_backward", "moments", "batch_normalization",
            "BatchNorm backward (eval)"} <= names
    import importlib.util
    tensors = {"batch_norm_train, tensors", "batch_norm_infer, tensors",
               "batch_norm_backward, tensors"}
    has_torch = importlib.util.find_spec("torch") is not None
    assert (tensors <= names) == has_torch
    assert len(rows) == len(names) * len(calls.SHAPES)
    for r in rows:
        whole, kern = (float(c.split("/")[0]) for c in r[2:4])
        assert whole > 0 and kern > 0
    assert len(modules) == (len(calls.SHAPES) if has_torch else 0)
    for r in modules:
        ours, theirs, ratio = (float(c.split("/")[0]) for c in r[1:4])
        assert ours > 0 and theirs > 0 and ratio == pytest.approx(theirs / ours, rel=0.02, abs=0.01)


def test_backend_option_times_the_calls_a_user_of_that_backend_makes(monkeypatch):
    """``--backend B`` makes B the default (``use_backend``) and calls without
    ``backend=``: an explicit argument would skip the small-call fast lane and
    time ~20 us of general-path checks that B's users never pay."""
    from fastbn import dispatch
    from fastbn.tools import harness, sweep

    seen = []
    real = {name: getattr(fbn, name) for name in
            ("batch_norm_train", "batch_norm_infer", "batch_norm_backward")}

    def spy(name):
        def call(*args, **kwargs):
            seen.append((name, "backend" in kwargs, dispatch.numpy_default().NAME))
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(fbn, name, spy(name))
    d = sweep.Data((4, 3, 5, 2), "NCHW", "float32")
    case = next(c for c in bench.CASES if c.mode == "train")
    bd = bench.Data((4, 3, 5, 2), case.channel_axis, case.dtype, False)
    runners = [sweep.fastbn_runner(op, d)[0] for op in sweep.OPS] + [bench.fastbn_runner(case, bd)]
    with harness.default_backend("numpy"):
        for r in runners:
            r.fn()
    for r in runners:
        r.fn()
    default = dispatch.numpy_default().NAME
    assert [s[1:] for s in seen] == [(False, "numpy")] * 4 + [(False, default)] * 4
    assert {s[0] for s in seen} == set(real)
