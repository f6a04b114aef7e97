"""Do two asv runs of the same code agree?  ``python agree.py A.json B.json [--tol 0.10]``

A and B are asv result files (``.asv/results/<machine>/<hash>-existing-*.json``;
copy the first aside before the second run overwrites it).  Prints, for every
benchmark and parameter combination, B/A of asv's result (the median for
``time_``) and, with ``--record-samples``, of the fastest sample; exits 1 if
any result moved by more than ``--tol``.
"""

import argparse
import itertools
import json
import sys


def load(path):
    d = json.load(open(path))
    cols = d["result_columns"]
    out = {}
    for name, row in d["results"].items():
        r = dict(zip(cols, row))
        if not r.get("result"):
            continue
        combos = list(itertools.product(*r["params"])) if r["params"] else [()]
        samples = r.get("samples") or [None] * len(combos)
        for i, combo in enumerate(combos):
            val = r["result"][i]
            if val is None:
                continue
            best = min(samples[i]) if samples[i] else None
            out[(name, ", ".join(p.strip("'") for p in combo))] = (val, best)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tol", type=float, default=0.10)
    args = ap.parse_args(argv)
    a, b = load(args.a), load(args.b)
    worst = worst_min = 0.0
    for key in sorted(set(a) & set(b)):
        (va, ma), (vb, mb) = a[key], b[key]
        if not va:
            continue
        change = vb / va - 1
        worst = max(worst, abs(change))
        line = f"{key[0]:55s} {key[1]:28s} {va:10.4g} -> {vb:10.4g} {change:+7.1%}"
        if ma and mb:
            worst_min = max(worst_min, abs(mb / ma - 1))
            line += f"   fastest sample {mb / ma - 1:+7.1%}"
        print(line)
    print(f"\nworst change: result {worst:.1%}" + (f", fastest sample {worst_min:.1%}" if worst_min else "")
          + f" (tolerance {args.tol:.0%})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
