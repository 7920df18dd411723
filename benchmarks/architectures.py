"""What each sharing scheme costs: parameters, forward FLOPs and training images/s of every architecture of the zoo on
one backbone and size, next to the machine's float32 matmul rate measured in the same run.

    python benchmarks/architectures.py                      # 128x256, dilated ResNet-26 at width 16 (the default
                                                            # job's encoder), heads of 64 channels, batch 4
    python benchmarks/architectures.py --architectures hps,mtan --steps 3 --output /tmp/costs.md

Training is ``MultiTaskTrainer.train_on_batch`` (TensorFlow graph, no XLA; the median of ``--steps`` steps after two
warm-up steps) on random data with uncertainty weighting and Adam,
and, with ``--gradient_weighting pcgrad``, a second column with that gradient method (T backward passes per step).
FLOPs: ``benchmarks/flops.py`` (a multiply-add = 2 FLOPs; matmul FLOPs of convs and dense layers, forward, per image).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import load_average, random_batch, timed  # noqa: E402

ARCHITECTURES = ("hps", "cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "ltb", "nddr_cnn", "pad_net",
                 "mti_net")
ENCODER = {"backbone_depth": 26, "backbone_width": 16, "output_stride": 8, "head_channels": 64}


def matmul_gflops(n=1024, repeats=5):
    """Best float32 GFLOP/s of an n x n TensorFlow matmul on this machine."""
    import tensorflow as tf

    a, b = tf.random.normal((n, n), seed=1), tf.random.normal((n, n), seed=2)
    fn = tf.function(lambda a, b: tf.linalg.matmul(a, b), autograph=False)
    fn(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def training_images_per_s(model, weighting, batch, steps):
    """Images/s of the median training step: ``train_on_batch`` (the compiled train function, one call per step)
    timed ``steps`` times after 2 warm-up steps (the first traces)."""
    import keras

    from mtl_keras.training import MultiTaskTrainer
    from mtl_keras.weighting import build_weighting

    trainer = MultiTaskTrainer(model, build_weighting(weighting, model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
    height, width = model.input.shape[1:3]
    x, y = random_batch(batch, height, width, model.tasks)
    step = timed(lambda: trainer.train_on_batch(x, y, return_dict=True), steps, warmup=2)
    return batch / step["median_s"]


def measure(name, height, width, batch, steps, gradient_weighting):
    import math

    import mtl_keras
    from flops import count_flops

    model = mtl_keras.build_model(name, input_shape=(height, width, 3), **ENCODER)
    row = {"architecture": name, "parameters": model.count_params(),
           "trainable": sum(math.prod(v.shape) for v in model.trainable_weights),
           "forward_gflops": count_flops(model)["matmul"] / 1e9,
           "uncertainty_images_per_s": training_images_per_s(model, "uncertainty", batch, steps)}
    if gradient_weighting:
        row[f"{gradient_weighting}_images_per_s"] = training_images_per_s(
            mtl_keras.build_model(name, input_shape=(height, width, 3), **ENCODER), gradient_weighting, batch, steps)
    return row


def table(rows, args, gflops):
    hps = next((r for r in rows if r["architecture"] == "hps"), rows[0])
    grad = f"{args.gradient_weighting}_images_per_s" if args.gradient_weighting else None
    lines = [f"Dilated ResNet-{ENCODER['backbone_depth']} at width {ENCODER['backbone_width']} (output stride "
             f"{ENCODER['output_stride']}), heads of {ENCODER['head_channels']} channels, {args.height}x{args.width}, "
             f"batch {args.batch_size}, median of {args.steps} training steps; float32 matmul rate in the same run: "
             f"{gflops:.1f} GFLOP/s; load average {load_average():.2f}.", "",
             "| architecture | parameters | forward GFLOPs / image | x HPS | train images/s (uncertainty) | x HPS |"
             + (f" train images/s ({args.gradient_weighting}) |" if grad else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if grad else "")]
    for r in rows:
        line = (f"| {r['architecture']} | {r['parameters']:,} | {r['forward_gflops']:.2f} | "
                f"{r['forward_gflops'] / hps['forward_gflops']:.2f} | {r['uncertainty_images_per_s']:.2f} | "
                f"{r['uncertainty_images_per_s'] / hps['uncertainty_images_per_s']:.2f} |")
        if grad:
            line += f" {r[grad]:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gradient_weighting", default="", help="also time this gradient method, e.g. pcgrad")
    parser.add_argument("--output", default="", help="also write the table (Markdown) here")
    parser.add_argument("--json", default="", help="also write the rows (JSON) here")
    args = parser.parse_args()
    names = [n for n in args.architectures.split(",") if n]
    gflops = matmul_gflops()
    rows = []
    for name in names:
        rows.append(measure(name, args.height, args.width, args.batch_size, args.steps, args.gradient_weighting))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args, gflops)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": gflops, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
