"""Write a small real-image folder from scikit-learn's bundled handwritten digits; no download.

    python -m launch.make_demo_data OUT [--size 112]
    python -m launch.train --config tiny --data OUT       # or prepare a cache of it first

OUT/train/digit_<d>/<index>.png and OUT/val/digit_<d>/<index>.png: the 1,797 real 8x8 digits
that `sklearn.datasets.load_digits` ships inside the package (10 classes), upscaled to --size
with Pillow; per class a fixed 80/20 train/val split (1,442 train + 355 val images).
"""

from __future__ import annotations

import argparse
import sys

from dualgpu_alexnet.datasets import make_digits_folder

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.make_demo_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to create (must be missing or empty)")
    parser.add_argument("--size", type=int, default=112,
                        help="side of the written images (default 112 = data.image_size of tiny)")
    args = parser.parse_args(argv)
    try:
        counts = make_digits_folder(args.out, args.size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(f"wrote {sum(counts['train'].values())} train + {sum(counts['val'].values())} val "
          f"images of {len(counts['train'])} classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
