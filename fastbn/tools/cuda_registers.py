"""Registers per thread of every fused CUDA kernel, compiled without a GPU.

``python -m fastbn.tools.cuda_registers [--cc 9.0]`` compiles each kernel of
the fused paths (``fastbn.kernels.cuda_numba.compile_report``: NVVM to PTX,
nvJitLink to a cubin, launch bounds of 1024 threads) for float16, float32 and
float64 data and prints a Markdown table.  The bar: at most 64 registers, so
that a 1024-thread block fits one SM's 65536 registers.  Needs the compilers
of the ``cuda`` extra (``pip install "fastbn[cuda]"``), not a GPU.
"""

import argparse
import sys


def table(cc=(9, 0)):
    """The report of ``compile_report`` as Markdown lines."""
    from ..kernels import cuda_numba
    rows = cuda_numba.compile_report(cc)
    lines = [f"| kernel | dtype | registers (sm_{cc[0]}{cc[1]}) | spill stores / loads (bytes) |",
             "|---|---|---|---|"]
    lines += [f"| `{k}` | {d} | {r} | {ss} / {sl} |" for k, d, r, ss, sl in rows]
    worst = max((r or 0) for _, _, r, _, _ in rows)
    return lines, worst


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.tools.cuda_registers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (default) or 8.0")
    args = parser.parse_args(argv)
    cc = tuple(int(p) for p in args.cc.split("."))
    lines, worst = table(cc)
    print("\n".join(lines))
    print(f"\nmost registers per thread: {worst} (bar: 64)")
    return 0 if worst <= 64 else 1


if __name__ == "__main__":
    sys.exit(main())
