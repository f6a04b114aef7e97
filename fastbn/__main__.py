"""Command line of fastbn: ``python -m fastbn demo`` and ``python -m fastbn bench``."""

import argparse
import os
import sys

DESCRIPTION = """\
fastbn: fast, accurate batch normalization for NumPy arrays.

commands:
  demo    the batch-norm tutorial experiment (training with and without BatchNorm)
  bench   speed against PyTorch and the memory-bandwidth roofline
          (bench --sweep: every op, layout and size against PyTorch)

Run "python -m fastbn COMMAND --help" for a command's options."""


def build_parser(prog=None):
    """The argument parser of the command line (subcommands ``demo`` and ``bench``)."""
    import fastbn
    from fastbn import demo
    from fastbn.tools import bench

    parser = argparse.ArgumentParser(prog=prog or "python -m fastbn", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastbn {fastbn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_arguments(sub.add_parser(
        "demo", help="batch-norm tutorial experiment: training with and without BatchNorm",
        description="The batch-norm tutorial experiment: the same network trained with and "
                    "without BatchNorm (fastbn's layer), costs reported, a PNG written."))
    bench.add_arguments(sub.add_parser(
        "bench", help="speed against PyTorch and the memory-bandwidth roofline",
        description="fastbn's speed against its peers (PyTorch when installed, NumPy) and the "
                    "memory-bandwidth roofline measured in the same run; --sweep: every op x "
                    "layout x size against PyTorch."))
    return parser


def main(argv=None):
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
