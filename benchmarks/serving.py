"""Serving latency: the exported SavedModel against ``model.predict`` (and a plain ``model(x)`` call).

    python benchmarks/serving.py                                   # Kendall ResNet-101, 128x256, batch 1 and 8
    python benchmarks/serving.py --model mt_unet --batches 1,4 --repeats 5 --instances

Builds the preset's model (fresh weights: latency does not depend on their values), exports it with
``mtl_keras.export.export_saved_model`` to a temporary folder, loads it with ``tf.saved_model.load`` and times, per
batch size, after ``--warmup`` untimed calls, ``--repeats`` calls of each path taking turns:

- ``model.predict(x, batch_size=B)``: Keras' inference loop (what a Keras user calls);
- ``model(x, training=False)``: one eager call of the Keras model;
- ``serving_default``: the SavedModel's float32 signature (what TF Serving or ``tf.saved_model.load`` runs);
- ``serve_uint8``: the uint8 signature (cast inside);
- with ``--instances``, the float32 signature of a second export that also returns instance ids.

Prints a Markdown table of median and 90th-percentile milliseconds per call and images per second (median), and
the machine's load average, since other processes on the machine slow every column alike.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interleaved(runs, repeats, warmup):
    """Seconds per call of each function in ``runs``; the functions take turns (a different one first in each
    round), so a change in the machine's load hits every path alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="kendall_deeplabv3_resnet101", help="preset name (mtl_keras.list_presets())")
    parser.add_argument("--size", default="128,256", help="height,width")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--instances", action="store_true", help="also time an export with instance ids")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    import mtl_keras
    from mtl_keras.export import export_saved_model

    height, width = (int(v) for v in args.size.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    model = mtl_keras.load_model(args.model, input_shape=(height, width, 3))
    folder = tempfile.mkdtemp(prefix="mtl_keras_serving_")
    start = time.perf_counter()
    export_saved_model(model, os.path.join(folder, "dense"))
    export_seconds = time.perf_counter() - start
    served = tf.saved_model.load(os.path.join(folder, "dense"))
    paths = {}
    if args.instances:
        export_saved_model(model, os.path.join(folder, "instances"), instances=True)
        paths["serving_default + instance_ids"] = tf.saved_model.load(os.path.join(folder, "instances"))

    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32)
        images_tf = tf.constant(images)
        images_u8 = tf.constant(images.astype(np.uint8))
        runs = {
            "model.predict": lambda: model.predict(images, batch_size=batch, verbose=0),
            "model(x)": lambda: {k: v.numpy() for k, v in model(images_tf, training=False).items()},
            "SavedModel serving_default (float32)":
                lambda: {k: v.numpy() for k, v in served.signatures["serving_default"](images=images_tf).items()},
            "SavedModel serve_uint8":
                lambda: {k: v.numpy() for k, v in served.signatures["serve_uint8"](images=images_u8).items()},
        }
        for name, loaded in paths.items():
            runs[f"SavedModel {name}"] = (
                lambda loaded=loaded: {k: v.numpy()
                                       for k, v in loaded.signatures["serving_default"](images=images_tf).items()})
        times = interleaved(runs, args.repeats, args.warmup)
        for name in runs:
            ms = np.asarray(times[name]) * 1000
            median = float(np.median(ms))
            rows.append((batch, name, median, float(np.percentile(ms, 90)), batch * 1000 / median))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\n{args.model}, {height}x{width}, TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}; load average {load[0]:.1f} at the end; "
          f"{args.repeats} timed calls after {args.warmup} warm-up calls; export took {export_seconds:.1f} s.\n")
    print("| batch | path | median ms | p90 ms | images/s |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for batch, name, median, p90, rate in rows:
        print(f"| {batch} | {name} | {median:.1f} | {p90:.1f} | {rate:.2f} |")


if __name__ == "__main__":
    main()
