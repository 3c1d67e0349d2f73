"""Run a trained AlexNet: logits of a preprocessed batch, or the top-5 classes of image files.

    python -m launch.predict --checkpoint runs/x/checkpoint.npz --input X.npy --output LOGITS.npy
    python -m launch.predict --checkpoint runs/x/checkpoint.npz photo1.jpg photo2.png
    mpirun -n 2 python -m launch.predict --checkpoint ... IMAGE...   # split over two ranks

X.npy is float32 (N, 3, I, I) NCHW already preprocessed (mean subtracted); I = 227 for the paper.
Image files get the evaluation preprocessing: RGB, shorter side to data.image_size, centre crop,
centre input_size crop, minus the training set's mean image (stored in our checkpoints).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dualgpu_alexnet import cli
from dualgpu_alexnet.inference import load_for_inference, logits_of_arrays, probabilities_of_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint in the conventional "
                        "layout (ours, or converted from Caffe/PyTorch)")
    parser.add_argument("--input", help="preprocessed float32 NCHW batch (.npy)")
    parser.add_argument("--output", help="where --input's logits go (.npy)")
    parser.add_argument("images", nargs="*", help="image files: print their top-5 classes")
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    if bool(args.input) == bool(args.images) or bool(args.input) != bool(args.output):
        parser.error("give either --input X.npy --output LOGITS.npy, or image files")

    def body(comm) -> int:
        model = load_for_inference(args.checkpoint, comm, args.config, args.overrides)
        if args.input:
            def read():
                try:
                    return np.load(args.input, allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise ValueError(f"{args.input}: cannot read a .npy array: {e}") from None

            x = comm.on_coordinator(read)
            logits = logits_of_arrays(model, comm, x)
            if comm.is_coordinator:
                np.save(args.output, logits)
                print(f"wrote {args.output}: logits {logits.shape}")
            return 0
        for path, probs in probabilities_of_files(model, comm, args.images):
            top = np.argsort(-probs, kind="stable")[:5]
            print(path + ": " + ", ".join(f"{model.classes[i]} {probs[i]:.3f}" for i in top))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
