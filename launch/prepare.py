"""Decode an image folder once into a memory-mapped cache that `launch.train --data` reads fast.

    python -m launch.prepare SRC --out CACHE [--image-size 256] [--workers N] [--strict]

SRC holds train/<class>/<images> and val/<class>/<images> (or the flat ILSVRC-2012 val folder with
its label files: see dualgpu_alexnet/prepare.py). Unreadable files are skipped and listed in
CACHE/report.json (--strict: stop at the first, exit 2). A non-empty CACHE that is not a cache of
SRC is refused.
"""

from __future__ import annotations

import argparse
import sys

from dualgpu_alexnet.prepare import prepare_cache

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="image folder with train/ and val/")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--image-size", type=int, default=256,
                        help="side S of the stored images (default 256; must match "
                        "data.image_size of the runs that read the cache)")
    parser.add_argument("--workers", type=int, default=0,
                        help="decode processes (default 0 = one per core)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable file instead of skipping it")
    parser.add_argument("--val-labels", help="flat ILSVRC val only: LOC_val_solution.csv or "
                        "ILSVRC2012_validation_ground_truth.txt (default: found by name)")
    parser.add_argument("--synsets", help="flat ILSVRC val only: synset mapping in ILSVRC2012_ID "
                        "order (meta.mat, map_clsloc.txt, synsets.txt; default: found by name)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = prepare_cache(args.src, args.out, args.image_size, args.workers, args.strict,
                               args.val_labels, args.synsets, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    counts, skipped = result["counts"], result["skipped_files"]
    print(f"prepared {counts['train']} train + {counts['val']} val images of "
          f"{result['num_classes']} classes at {args.image_size}x{args.image_size} in {args.out}; "
          f"skipped {len(skipped)} unreadable files" + (f" (listed in {args.out}/report.json)"
                                                        if skipped else ""))
    for item in skipped[:5]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
