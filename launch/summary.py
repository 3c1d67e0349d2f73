"""Print the per-layer, per-device table of a preset: shapes, parameters, costs, crossings.

    python -m launch.summary                 # the paper's net: 60,965,224 parameters
    python -m launch.summary --config tiny
"""

from __future__ import annotations

import argparse
import sys

from dualgpu_alexnet import cli, config
from dualgpu_alexnet.config import ConfigError
from dualgpu_alexnet.reporting import summary_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    print(summary_table(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
