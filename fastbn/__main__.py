"""Command line: ``python -m fastbn demo`` (the main job) and ``python -m fastbn bench``."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, demo
    demo.add_arguments(sub.add_parser("demo", help="BN tutorial experiment: MLP with / without BatchNorm"))
    bench.add_arguments(sub.add_parser("bench", help="speed vs. the bandwidth roofline and peers"))
    args = parser.parse_args(argv)
    return {"demo": demo.run, "bench": bench.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
