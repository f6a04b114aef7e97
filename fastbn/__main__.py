"""Command line of fastbn: ``python -m fastbn demo`` and ``python -m fastbn bench``.

The help texts are plain text (no reStructuredText markup): they are what a
terminal shows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DESCRIPTION = """\
fastbn: fast, accurate batch normalization for NumPy, CuPy and Dask arrays
and CPU PyTorch tensors.

commands:
  demo    the batch-norm tutorial experiments: a network trained with and
          without BatchNorm (demo mlp, the default; demo cnn)
  bench   speed against PyTorch and the memory-bandwidth roofline
          (bench --sweep: every op, layout and size against PyTorch)

Run "python -m fastbn COMMAND --help" for a command's options."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the command line (subcommands ``demo`` and ``bench``)."""
    import fastbn
    from fastbn import demo
    from fastbn.tools import bench

    parser = argparse.ArgumentParser(prog=prog or "python -m fastbn", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastbn {fastbn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_arguments(sub.add_parser(
        "demo", help="batch-norm tutorial experiments: training with and without BatchNorm",
        description="The batch-norm tutorial experiments: the same network trained with and "
                    "without BatchNorm (fastbn's layer), costs reported, a PNG written. "
                    "mlp (the default): a deep MLP on y = x^2 - 5 + noise; cnn: a small "
                    "CNN on scikit-learn's digits."))
    bench.add_arguments(sub.add_parser(
        "bench", help="speed against PyTorch and the memory-bandwidth roofline",
        description="fastbn's speed against its peers (PyTorch when installed, NumPy) and the "
                    "memory-bandwidth roofline measured in the same run; --sweep: every op x "
                    "layout x size against PyTorch."))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    prog = "fastbn" if os.path.basename(sys.argv[0] or "") == "fastbn" else None
    args = build_parser(prog).parse_args(argv)
    if args.command == "demo":
        from fastbn import demo
        return demo.run(args)
    from fastbn.tools import bench
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
