"""Training images/s of registered models on random data (no input pipeline), printed as a table.

    python benchmarks/train_speed.py --models kendall_deeplabv3_resnet101,mt_unet --image_size 128,256 --batch_size 8
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from common import random_batch  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["kendall_deeplabv3_resnet26_slim", "kendall_deeplabv3_resnet101"], "Registered models.")
flags.DEFINE_list("image_size", ["128", "256"], "height,width")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_boolean("jit_compile", False, "XLA.")


def measure(name, height, width, batch, steps, jit_compile):
    import tensorflow as tf

    import mtl_keras
    from mtl_keras.training import MultiTaskTrainer, kendall_sgd
    from mtl_keras.weighting import UncertaintyWeightingLayer

    model = mtl_keras.build_model(name, input_shape=(height, width, 3))
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.output.keys()))
    trainer.compile(optimizer=kendall_sgd(total_steps=1000), jit_compile=jit_compile)
    x, y = random_batch(batch, height, width, tuple(model.output.keys()))
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    trainer.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    start = time.perf_counter()
    trainer.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return model.count_params(), steps * batch / seconds, seconds / steps


def main(argv):
    del argv
    height, width = (int(v) for v in FLAGS.image_size)
    print(f"| model | parameters | input | batch | XLA | train images/s | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in FLAGS.models:
        params, ips, sps = measure(name, height, width, FLAGS.batch_size, FLAGS.steps, FLAGS.jit_compile)
        print(f"| {name} | {params:,} | {height}x{width} | {FLAGS.batch_size} | {FLAGS.jit_compile} | {ips:.2f} | "
              f"{sps:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
