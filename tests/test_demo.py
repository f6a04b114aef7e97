"""`python -m fastbn demo` runs, reports both costs and writes a PNG."""

import re

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
