"""The trainer's gradient-weighting step (mtl_keras.gradient_training) on the current backend.

Independent expectations: the equal-weights gradient method must reproduce the ordinary trainer with
``EqualWeighting`` (one backward pass of the summed loss); with ``rep_grad`` the pulled-back direction must equal the
parameter gradients by the chain rule; the partition must match the model's layer names.
"""

import keras
import numpy as np
import pytest
from keras import ops

from mtl_keras.gradient_methods.base import GRADIENT_METHODS, GradientMethod, register_gradient_method
from mtl_keras.gradient_training import SharedPartition
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import EqualWeighting, GradientWeighting

TASKS = ("semantic", "instance", "depth")

if keras.config.backend() not in ("tensorflow", "jax"):
    pytest.skip("gradient weightings run on TensorFlow and JAX", allow_module_level=True)


class _RowSum(GradientMethod):
    """sum_k g_k, computed from the (K, P) matrix: the gradient of the summed loss."""

    name = "_test_row_sum"

    def aggregate(self, gradients, losses, state, step, seed):
        return ops.sum(gradients, axis=0), ops.ones((self.num_tasks,)), state


class _FirstTask(GradientMethod):
    """Only task 0's gradient for the shared parameters (a direction no loss weighting of the sum would give)."""

    name = "_test_first_task"
    defaults = {"scale": 1.0}

    def initial_state(self, num_params):
        return {"calls": np.zeros((), "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        return gradients[0] * self.scale, None, {"calls": state["calls"] + 1.0}


for _cls in (_RowSum, _FirstTask):
    if _cls.name not in GRADIENT_METHODS:
        register_gradient_method(_cls)


def small_model(size=16, seed=0):
    from mtl_keras.layers import conv_bn_relu, image_normalization
    from mtl_keras.models.heads import task_output

    keras.utils.set_random_seed(seed)
    image = keras.Input((size, size, 3))
    x = image_normalization()(image)
    x = conv_bn_relu(x, 8, 3, name="c1")
    x = keras.layers.MaxPooling2D(2)(x)
    x = conv_bn_relu(x, 8, 3, dilation_rate=2, name="c2")
    outputs = {t: task_output(keras.layers.Conv2D(8, 1, name=f"{t}_own")(x), t, 3, image, name=f"{t}_head")
               for t in TASKS}
    return keras.Model(image, outputs)


def batch(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    semantic = rng.integers(0, 3, (n, size, size)).astype("int32")
    semantic[:, :2] = 255
    targets = {"semantic": semantic, "instance": rng.normal(size=(n, size, size, 2)).astype("float32") * 3,
               "instance_mask": (rng.uniform(size=(n, size, size, 1)) > 0.5).astype("float32"),
               "depth": rng.uniform(0, 4, (n, size, size, 1)).astype("float32"),
               "depth_mask": np.ones((n, size, size, 1), "float32")}
    return images, targets


def trained_weights(weighting, steps=2, model_seed=0, jit_compile=False, jacobian_mode="loop"):
    model = small_model(seed=model_seed)
    trainer = MultiTaskTrainer(model, weighting, jacobian_mode=jacobian_mode)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit_compile)
    images, targets = batch()
    history = trainer.fit(images, targets, batch_size=4, epochs=steps, verbose=0, shuffle=False)
    return [ops.convert_to_numpy(v) for v in model.trainable_variables], history.history, trainer


def test_partition_follows_the_graph():
    model = small_model()
    partition = SharedPartition(model, TASKS)
    shared_names = {v.path.split("/")[0] for v in partition.shared}
    assert shared_names == {"c1_conv", "c1_bn", "c2_conv", "c2_bn"}
    for t in TASKS:
        assert {v.path.split("/")[0] for v in partition.own[t]} >= {f"{t}_own"}
        assert all(v.path.startswith(t) for v in partition.own[t])
    assert len(partition.shared) + sum(len(v) for v in partition.own.values()) == len(model.trainable_variables)
    assert partition.num_shared == sum(int(np.prod(v.shape)) for v in partition.shared)
    # the representation is c2's output (read by every task's own conv); the image reaches the heads for its size
    assert len(partition.representation) == 1 and tuple(partition.representation[0].shape[1:]) == (8, 8, 8)
    assert len(partition.passthrough) == 1


@pytest.mark.parametrize("jacobian_mode", ["loop", "batched"])
def test_row_sum_of_task_gradients_equals_the_equal_weighting_trainer(jacobian_mode):
    if jacobian_mode == "batched" and keras.config.backend() != "jax":
        pytest.skip("batched Jacobians: JAX")
    expected, expected_history, _ = trained_weights(EqualWeighting(TASKS))
    got, history, _ = trained_weights(GradientWeighting(TASKS, method="_test_row_sum"), jacobian_mode=jacobian_mode)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(history["loss"], expected_history["loss"], rtol=1e-4)
    for t in TASKS:
        np.testing.assert_allclose(history[f"{t}_loss"], expected_history[f"{t}_loss"], rtol=1e-4)


def test_representation_gradients_pull_back_to_the_parameter_gradients():
    """sum_k J^T (dL_k/drep) = sum_k dL_k/dtheta: rep_grad with the row sum is the ordinary step again."""
    expected, _, _ = trained_weights(EqualWeighting(TASKS))
    got, _, _ = trained_weights(GradientWeighting(TASKS, method="_test_row_sum", rep_grad=True))
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)


def test_shared_parameters_follow_the_direction_and_own_parameters_their_task():
    """The shared parameters move along task 0's gradient only; each decoder still learns its own task; the
    method's state advances once per step."""
    model_before = small_model(seed=0)
    before = {v.path: ops.convert_to_numpy(v) for v in model_before.trainable_variables}
    weighting = GradientWeighting(TASKS, method="_test_first_task")
    after, history, trainer = trained_weights(weighting, steps=1)
    after = dict(zip([v.path for v in trainer.inference_model.trainable_variables], after))
    # Reference: one SGD step (momentum 0.9 starts at zero: the step is lr * grad) with a semantic-only loss for the
    # shared parameters and every task's own loss for its decoder.
    reference_model = small_model(seed=0)
    images, targets = batch()
    grads = {}
    for t in TASKS:
        grads[t] = _gradients(reference_model, images, targets, t)
    partition = SharedPartition(reference_model, TASKS)
    shared = {v.path for v in partition.shared}
    for path, value in before.items():
        if path in shared:
            expected = value - 0.05 * grads["semantic"][path]
        else:
            task = path.split("_")[0]
            expected = value - 0.05 * grads[task][path]
        np.testing.assert_allclose(after[path], expected, rtol=1e-4, atol=1e-6, err_msg=path)
    assert float(ops.convert_to_numpy(weighting.state_variables["calls"])) == 1.0
    assert int(ops.convert_to_numpy(weighting.step)) == 1


def _gradients(model, images, targets, task):
    """{variable path: d task_loss / d variable}: the backend's autodiff (TF tape or JAX grad) on the plain loss of
    one task, without the trainer."""
    from mtl_keras.losses import task_loss

    backend = keras.config.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = task_loss(task, targets, model(images, training=True))
        grads = tape.gradient(loss, variables)
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def f(values):
            outputs, _ = model.stateless_call(values, non_trainable, images, training=True)
            return task_loss(task, targets, outputs)

        grads = jax.grad(f)([v.value for v in variables])
    else:
        pytest.skip("gradient weightings: TF and JAX")
    return {v.path: (np.zeros(v.shape, "float32") if g is None else ops.convert_to_numpy(g))
            for v, g in zip(variables, grads)}


@pytest.mark.parametrize("rep_grad", [False, True])
def test_mixed_precision_unscales_each_task_gradient_before_the_method(rep_grad):
    """mixed_float16: Keras wraps the optimiser in a LossScaleOptimizer (scale 2^15); the per-task gradients are
    unscaled before the method and the direction rescaled for the optimiser, so the step equals the ordinary
    trainer's under the same policy (a missed or doubled scale would be off by 2^15)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        expected, _, reference = trained_weights(EqualWeighting(TASKS), steps=1)
        got, _, trainer = trained_weights(GradientWeighting(TASKS, method="_test_row_sum", rep_grad=rep_grad),
                                          steps=1)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert type(trainer.optimizer).__name__ == "LossScaleOptimizer"
    assert float(ops.convert_to_numpy(trainer.optimizer.dynamic_scale)) > 1000
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, trained_weights(EqualWeighting(TASKS),
                                                                                        steps=0)[0]))
    assert moved > 1e-3
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-3)


# One method of each kind through the real trainer: random (pcgrad), stateful + random (gradvac), three gradient
# samples (modo), losses after the step (famo), loss only (gls), an on-device solver (nash_mtl), representation
# gradients (graddrop). The float64 two-replica test (tests/test_distribution.py) runs every method on TensorFlow.
@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "modo", "famo", "gls", "nash_mtl", "graddrop:rep"])
def test_methods_of_every_kind_train_and_lower_every_task_loss(name):
    method, _, mode = name.partition(":")
    weighting = GradientWeighting(TASKS, method=method, rep_grad=mode == "rep")
    state_before = {k: ops.convert_to_numpy(v).copy() for k, v in weighting.state_variables.items()}
    model = small_model(seed=1)
    trainer = MultiTaskTrainer(model, weighting)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                    jit_compile=keras.config.backend() == "jax")
    images, targets = batch(n=6)
    history = trainer.fit(images, targets, batch_size=6, epochs=6, verbose=0, shuffle=False).history
    for t in TASKS:
        losses = history[f"{t}_loss"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (t, losses)
    assert int(ops.convert_to_numpy(weighting.step)) == 6
    for key, before in state_before.items():  # the method's state moved and was written back to its variables
        assert not np.array_equal(ops.convert_to_numpy(weighting.state_variables[key]), before), key


def test_a_non_finite_step_leaves_the_method_state_alone_and_reaches_the_optimiser_as_non_finite():
    """A float16 overflow (inf in a task gradient) must not poison the method's state, weights or step counter:
    the LossScaleOptimizer skips that step, and the next one starts from the old state."""
    weighting = GradientWeighting(TASKS, method="gradvac")
    weighting.build_state(4)
    rng = np.random.default_rng(0)
    good = rng.normal(size=(3, 4)).astype("float32")
    weighting.direction(good, np.ones(3, "float32"))
    before = {k: ops.convert_to_numpy(v).copy() for k, v in weighting.state_variables.items()}
    weights_before = ops.convert_to_numpy(weighting.last_weights).copy()
    bad = good.copy()
    bad[1, 2] = np.inf
    direction = ops.convert_to_numpy(weighting.direction(bad, np.ones(3, "float32")))
    assert not np.all(np.isfinite(direction))
    assert int(ops.convert_to_numpy(weighting.step)) == 1
    np.testing.assert_array_equal(ops.convert_to_numpy(weighting.last_weights), weights_before)
    for key, value in before.items():
        np.testing.assert_array_equal(ops.convert_to_numpy(weighting.state_variables[key]), value)
    assert np.all(np.isfinite(ops.convert_to_numpy(weighting.direction(good, np.ones(3, "float32")))))
    assert int(ops.convert_to_numpy(weighting.step)) == 2
