"""Training images/s of a model on one device vs under MirroredStrategy over logical CPU replicas, as a table.

    python benchmarks/distribution_speed.py --models kendall_deeplabv3_resnet101 --image_size 128,256 --batch_size 8

Each strategy runs in its own process (a process holds one MirroredStrategy, and the logical CPU devices must be set
before TensorFlow starts). The batch is global: under ``mirrored`` with R replicas each replica takes B/R images.
Random data, no input pipeline; the loss weighting is the uncertainty layer, with synchronised batch norm under
``mirrored`` as ``experiments/train.py`` does. On a CPU, the replicas share the same cores, so expect no gain: the
point of the mirrored path is that it is correct (tests/test_distribution.py) and runs.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["kendall_deeplabv3_resnet101"], "Registered models.")
flags.DEFINE_list("strategies", ["one_device", "mirrored"], "Strategies to compare.")
flags.DEFINE_integer("cpu_replicas", 2, "Logical CPU devices for mirrored.")
flags.DEFINE_list("image_size", ["128", "256"], "height,width")
flags.DEFINE_integer("batch_size", 8, "Global batch size.")
flags.DEFINE_integer("steps", 3, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_string("worker", None, "Internal: run one measurement (JSON arguments) and print its JSON result.")


def measure(model_name, strategy_name, cpu_replicas, height, width, batch, steps):
    import keras
    import numpy as np
    import tensorflow as tf

    import mtl_keras
    from mtl_keras import distribution
    from mtl_keras.training import MultiTaskTrainer, kendall_sgd
    from mtl_keras.weighting import UncertaintyWeightingLayer

    strategy = distribution.create_strategy(strategy_name, cpu_replicas if strategy_name == "mirrored" else 0)
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = mtl_keras.build_model(model_name, input_shape=(height, width, 3))
        if replicas > 1:
            distribution.set_synchronized_batchnorm(model)
        trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.output.keys()))
        trainer.compile(optimizer=kendall_sgd(total_steps=1000))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, height, width, 3)).astype("float32")
    y = {"semantic": rng.integers(0, 19, (batch, height, width)).astype("int32"),
         "instance": rng.normal(size=(batch, height, width, 2)).astype("float32"),
         "instance_mask": np.ones((batch, height, width, 1), "float32"),
         "depth": rng.uniform(size=(batch, height, width, 1)).astype("float32"),
         "depth_mask": np.ones((batch, height, width, 1), "float32")}
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    trainer.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    start = time.perf_counter()
    trainer.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    keras.backend.clear_session()
    return {"replicas": replicas, "strategy": type(strategy).__name__, "images_per_s": steps * batch / seconds,
            "seconds_per_step": seconds / steps}


def main(argv):
    del argv
    if FLAGS.worker:
        args = json.loads(FLAGS.worker)
        print("RESULT " + json.dumps(measure(**args)), flush=True)
        return
    height, width = (int(v) for v in FLAGS.image_size)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores, load average {load:.1f} at the start\n")
    print("| model | input | global batch | strategy | replicas x per-replica batch | train images/s | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in FLAGS.models:
        for strategy in FLAGS.strategies:
            args = dict(model_name=name, strategy_name=strategy, cpu_replicas=FLAGS.cpu_replicas, height=height,
                        width=width, batch=FLAGS.batch_size, steps=FLAGS.steps)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(args)}"],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"| {name} | {height}x{width} | {FLAGS.batch_size} | {strategy} | - | failed: "
                      f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode} | - |")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            print(f"| {name} | {height}x{width} | {FLAGS.batch_size} | {r['strategy']} | "
                  f"{r['replicas']} x {FLAGS.batch_size // r['replicas']} | {r['images_per_s']:.2f} | "
                  f"{r['seconds_per_step']:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
