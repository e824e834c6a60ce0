"""The `moe-reroute` command: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, measure, reference

COMMANDS = [demo, reference, measure, bench]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-reroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parsers(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for reports
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
