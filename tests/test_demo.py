"""`python -m fastbn demo` runs, reports both costs and writes a PNG."""

import re

import numpy as np
import pytest

from fastbn.__main__ import main


def _table(out):
    """{step: (without BN, with BN, BN full-data stats)} from the demo's final table."""
    rows = re.findall(r"^\s+(\d+) \|(.*)$", out, flags=re.M)
    return {int(step): tuple(c.strip() for c in rest.split("|")) for step, rest in rows}


def test_demo_writes_png_and_reports_both_costs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    assert main(["demo", "--steps", "10", "--seed", "3", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000                    # a real figure, not an empty canvas
    final = re.search(r"final cost after 10 steps: without BN (\S+), with BN (\S+)", out)
    assert final, out
    for value in final.groups():
        assert value == "diverged" or float(value) > 0
    table = _table(out)
    assert sorted(table) == [0, 10]
    assert all(len(row) == 3 for row in table.values())
    assert f"figure written to {png}" in out


def test_demo_is_seeded(capsys):
    """Same seed, same numbers (progress lines carry timings and are left out)."""
    runs = []
    for _ in range(2):
        assert main(["demo", "--steps", "10", "--seed", "5", "--no-plot"]) == 0
        runs.append(_table(capsys.readouterr().out))
    assert runs[0] == runs[1] and sorted(runs[0]) == [0, 10]


def test_demo_mlp_is_the_default(capsys):
    tables = []
    for argv in (["demo"], ["demo", "mlp"]):
        assert main(argv + ["--steps", "5", "--seed", "2", "--no-plot"]) == 0
        tables.append(_table(capsys.readouterr().out))
    assert tables[0] == tables[1] and sorted(tables[0]) == [0, 5]


def test_diverging_net_is_recorded_every_step_up_to_divergence_and_drawn():
    """Seed 1: the net without BN diverges at step 2.  Its costs at steps 0 and 1
    are recorded (finite, or +inf where float32 overflowed), NaN from then on; the
    figure draws it as a curve (>= 2 points) up to divergence and marks the step."""
    pytest.importorskip("matplotlib")
    from fastbn import demo
    cols, plain, bn_net, x, y = demo.train_mlp(6, 1, log=lambda *a: None)
    assert cols["step"] == list(range(7))
    k = plain.diverged_at
    assert k is not None and 1 <= k <= 6
    before, after = np.array(cols["without BN"][:k]), np.array(cols["without BN"][k:])
    assert np.all(np.isfinite(before) | np.isposinf(before)) and np.isfinite(before[0])
    assert np.all(np.isnan(after))
    assert bn_net.diverged_at is None and np.all(np.isfinite(cols["with BN"]))

    from matplotlib.figure import Figure
    ax = Figure().subplots()
    steps = np.array(cols["step"])
    demo._cost_curves(ax, steps, cols, plain, bn_net)
    demo._mark_divergence(ax, cols, plain, bn_net)
    red = [ln for ln in ax.get_lines() if ln.get_color() == "#d62728"]
    drawn = {float(s) for ln in red for s, c in zip(ln.get_xdata(), ln.get_ydata())
             if np.isfinite(float(c)) and float(s) < k}
    assert drawn == set(range(k)), drawn            # every step before divergence is on the curve
    assert any(list(ln.get_xdata()) == [k, k] for ln in red)      # the vertical mark at step k
    assert any(f"diverged at step {k}" in t.get_text() for t in ax.texts)


def test_histogram_rows_say_what_they_show(tmp_path):
    """Without BN the panels show x and z; with BN, BN(x) and BN(z): the titles say so."""
    pytest.importorskip("matplotlib")
    from fastbn import demo
    cols, plain, bn_net, x, y = demo.train_mlp(3, 4, log=lambda *a: None)
    fig = demo._plot(str(tmp_path / "m.png"), cols, plain, bn_net, x, y, 4)
    titles = [a.get_title().split("\n")[0] for sub in fig.subfigs[1:] for a in sub.axes]
    n = demo.N_LAYERS + 1
    assert titles[0] == "input x" and titles[n] == "BN(input x)"
    assert titles[1] == "layer 1: pre-activation z" and titles[n + 1] == "layer 1: BN(z)"
