"""A few training steps of a small Kendall model with every loss weighting, on the backend in KERAS_BACKEND.

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 python tests/scripts/backend_steps.py OUT.npz [--data_parallel]

Float64, the same initial weights (drawn with numpy from a fixed seed, by variable order) and the same batches on
every backend, so that tests/test_backends.py can compare what each backend computed: per step the total loss, each
task loss and the weighting's logged values (sigma^2, task weights); the weights after the first step (plain SGD:
w - lr * gradient, so they compare the gradients) and at the end. Epoch-adaptive weightings (DWA, MT-UNet) get
``on_epoch_end`` every two steps.

``--data_parallel``: JAX only; also trains under ``keras.distribution.DataParallel`` over every device (run with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``), from the same weights, and stores those results under
``dp/...`` keys. The two halves of each batch have different numbers of labelled pixels, so a per-device mean
would differ from the one-device step.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

keras.config.set_floatx("float64")

import mtl_keras  # noqa: E402
from mtl_keras.training import MultiTaskTrainer  # noqa: E402
from mtl_keras.weighting import WEIGHTINGS, build_weighting  # noqa: E402

WEIGHTING_NAMES = tuple(WEIGHTINGS)
STEPS, STEPS_PER_EPOCH, BATCH, SIZE = 6, 2, 4, 32
TASKS = ("semantic", "instance", "depth")


def batches():
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        semantic = rng.integers(0, 5, (BATCH, SIZE, SIZE)).astype("int32")
        semantic[:2][rng.uniform(size=(2, SIZE, SIZE)) < 0.7] = 255  # first half: few labelled pixels
        instance_mask = (rng.uniform(size=(BATCH, SIZE, SIZE, 1)) < 0.3).astype("float64")
        instance_mask[2:] = 1.0
        depth_mask = (rng.uniform(size=(BATCH, SIZE, SIZE, 1)) < 0.5).astype("float64")
        out.append((rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)),
                    {"semantic": semantic, "instance": rng.normal(size=(BATCH, SIZE, SIZE, 2)) * 3,
                     "instance_mask": instance_mask, "depth": rng.uniform(0, 2, (BATCH, SIZE, SIZE, 1)),
                     "depth_mask": depth_mask}))
    return out


def build(weighting_name):
    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=TASKS, num_classes=5,
                                  input_shape=(SIZE, SIZE, 3), backbone_depth=26, backbone_width=4, aspp_channels=8,
                                  aspp_rates=(2, 4, 6), decoder_channels=8)
    kwargs = {"task_weights": [0.5, 0.2, 0.3]} if weighting_name == "fixed" else {}
    if weighting_name == "mtunet":
        kwargs["weight_learning_rate"] = 0.05  # visible updates within a few steps
    trainer = MultiTaskTrainer(model, build_weighting(weighting_name, TASKS, **kwargs))
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
    rng = np.random.default_rng(0)
    for variable in trainer.trainable_variables:
        if "log_variance" in variable.path:
            variable.assign(np.full(variable.shape, 0.3))
        else:
            fan_in = np.prod(variable.shape[:-1]) if len(variable.shape) > 1 else 1.0
            variable.assign(rng.normal(size=variable.shape) / np.sqrt(fan_in))
    return trainer


def train(weighting_name, data):
    trainer = build(weighting_name)
    result = {"paths": np.array([v.path for v in trainer.weights])}
    losses, logged = [], []
    for step, (x, y) in enumerate(data):
        logs = trainer.train_on_batch(x, y, return_dict=True)
        losses.append([logs["loss"]] + [logs[f"{t}_loss"] for t in TASKS])
        logged.append([float(keras.ops.convert_to_numpy(v)) for v in trainer.loss_weighting.log_values().values()])
        if step == 0:
            result["weights_step1"] = np.concatenate([np.ravel(keras.ops.convert_to_numpy(v))
                                                      for v in trainer.trainable_variables])
        if (step + 1) % STEPS_PER_EPOCH == 0:
            trainer.loss_weighting.on_epoch_end()
        trainer.reset_metrics()  # logs of the next step are that step's alone
    result["losses"] = np.array(losses)
    result["logged"] = np.array(logged)
    result["weights_final"] = np.concatenate([np.ravel(keras.ops.convert_to_numpy(v)) for v in trainer.weights])
    return result


def main():
    out, data_parallel = sys.argv[1], "--data_parallel" in sys.argv[2:]
    data = batches()
    arrays = {}
    for name in WEIGHTING_NAMES:
        for key, value in train(name, data).items():
            arrays[f"{name}/{key}"] = value
    if data_parallel:
        import jax

        devices = jax.devices()
        assert len(devices) > 1, "--data_parallel needs several devices (XLA_FLAGS)"
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        for name in WEIGHTING_NAMES:
            for key, value in train(name, data).items():
                arrays[f"dp/{name}/{key}"] = value
        arrays["dp/devices"] = np.array(len(devices))
    np.savez(out, **arrays)
    print(f"wrote {out}: {len(arrays)} arrays on {keras.config.backend()}")


if __name__ == "__main__":
    main()
