"""Trains the same tiny model on the same data on one device and under MirroredStrategy over 2 logical CPUs, for
each weighting (gradient methods included, ``NAME:rep`` with representation gradients), and prints, per weighting,
the variables compared, those that differ, the largest difference between the two runs and how far training moved
each variable (run by tests/test_distribution.py in its own process, since logical devices must be configured before
TensorFlow starts). The variables of the two runs must pair up by path, or the script fails.

It runs in float64: in float32 the two runs differ by reduction-order noise that the tiny model's batch norm over
1x1 maps amplifies, which would hide a real scaling bug; in float64 a correct implementation agrees to ~1e-12.
"""

import json
import re
import sys

import numpy as np

from mtl_keras import distribution

distribution.configure_cpu_replicas(2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

keras.config.set_floatx("float64")

import mtl_keras  # noqa: E402
from mtl_keras.training import MultiTaskTrainer  # noqa: E402
from mtl_keras.weighting import WeightingEpochCallback, build_weighting  # noqa: E402

TASKS = ("semantic", "instance", "depth")


def data(n=8, h=32, w=32, batch=4):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n, h, w, 3)).astype("float32")
    semantic = rng.integers(0, 3, (n, h, w)).astype("int32")
    semantic[:, :4] = 255
    instance_mask = np.zeros((n, h, w, 1), "float32")
    for i in range(n):  # very different instance pixel counts per image, so per-replica means would differ
        instance_mask[i, : 2 + 3 * i, : 2 + 3 * i] = 1.0
    targets = {"semantic": semantic, "instance": rng.normal(size=(n, h, w, 2)).astype("float32") * 5,
               "instance_mask": instance_mask, "depth": rng.uniform(0, 4, (n, h, w, 1)).astype("float32"),
               "depth_mask": (rng.uniform(size=(n, h, w, 1)) > 0.3).astype("float32")}
    return tf.data.Dataset.from_tensor_slices((images, targets)).batch(batch).repeat()


def small_model():
    """Conv + BN + ReLU (a dilated one too) and the zoo's task heads: the parts whose scaling is under test, with
    little to trace (the full Kendall model builds from the same layers)."""
    from mtl_keras.layers import conv_bn_relu, image_normalization
    from mtl_keras.models.heads import task_output

    image = keras.Input((32, 32, 3))
    x = image_normalization()(image)
    x = conv_bn_relu(x, 8, 3, name="c1")
    x = keras.layers.MaxPooling2D(4)(x)
    x = conv_bn_relu(x, 8, 3, dilation_rate=2, name="c2")
    outputs = {t: task_output(x, t, 3, image, name=f"{t}_head") for t in TASKS}
    return keras.Model(image, outputs)


def layer_path(path):
    """``path`` without the ``_1`` Keras appends to an auto-named layer built a second time in the process."""
    head, _, rest = path.partition("/")
    return re.sub(r"_\d+$", "", head) + "/" + rest


def train(strategy, weighting_name):
    """``weighting_name``: a weighting, or ``METHOD:rep`` for a gradient method on representation gradients."""
    weighting_name, _, mode = weighting_name.partition(":")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = small_model()
        distribution.set_synchronized_batchnorm(model)
        kwargs = {"task_weights": [0.5, 0.2, 0.3]} if weighting_name == "fixed" else {}
        if weighting_name == "mtunet":
            kwargs["weight_learning_rate"] = 0.05  # large enough that a wrong update would show
        if mode == "rep":
            kwargs["rep_grad"] = True
        weighting = build_weighting(weighting_name, TASKS, **kwargs)
        trainer = MultiTaskTrainer(model, weighting)
        trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    initial = {v.path: keras.ops.convert_to_numpy(v).copy() for v in trainer.variables}
    # Methods that cut the batch into S gradient samples are replica-exact when each replica's batch divides by S.
    samples = getattr(getattr(weighting, "method", None), "gradient_samples", 1)
    dataset = data(n=12, batch=6) if samples == 3 else data()
    history = trainer.fit(dataset, epochs=3, steps_per_epoch=2, verbose=0,
                          callbacks=[WeightingEpochCallback(weighting)])
    train.history = {f"{t}_loss": [float(v) for v in history.history[f"{t}_loss"]] for t in TASKS}
    # How far training moved each variable: two runs that both left the weights where they started would "agree".
    train.updates = {v.path: float(np.max(np.abs(np.asarray(v) - initial[v.path]), initial=0.0))
                     for v in trainer.variables}
    return [(v.path, np.asarray(v)) for v in trainer.variables]


# One strategy object per process: a second MirroredStrategy reuses collective instance keys of the first.
ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")
MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = {}
for name in sys.argv[1:]:
    one = train(ONE_DEVICE, name)
    one_device_history, one_device_updates = train.history, train.updates
    two = train(MIRRORED, name)
    paths = [path for path, _ in one]
    assert [layer_path(p) for p in paths] == [layer_path(p) for p, _ in two], (name, paths, [p for p, _ in two])
    # Biases of convs followed by batch norm have a zero true gradient and move by float noise only: absolute
    # tolerance for those, relative for the rest.
    mismatched = [path for (path, a), (_, b) in zip(one, two) if not np.allclose(a, b, rtol=1e-7, atol=1e-9)]
    worst = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(one, two))
    results[name] = {"mismatched": mismatched, "max_abs_difference": worst, "num_variables": len(one),
                     "paths": paths, "updates": one_device_updates, "history": one_device_history,
                     "loss_weight_state": {path: [np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()]
                                           for (path, a), (_, b) in zip(one, two)
                                           if "weighting" in path.split("/")[0]
                                           or "weighting_layer" in path}}
print("RESULT " + json.dumps(results))
