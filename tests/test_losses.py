import math

import keras
import numpy as np
import pytest

from mtl_keras.losses import masked_l1, semantic_cross_entropy, task_loss


class LossProbe(keras.Model):
    """A model whose training loss is ``loss_fn()`` alone: plain SGD through Keras' own train step (any backend)
    then moves each of ``variables`` by minus learning rate times its gradient."""

    def __init__(self, loss_fn, variables):
        super().__init__(name="loss_probe")
        self.loss_fn = loss_fn
        self.probed_variables = list(variables)

    def call(self, x, training=None):
        return self.loss_fn()

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return y_pred


def loss_and_gradient(loss_fn, variable):
    """(loss_fn(), d loss_fn() / d variable) as numpy, on any backend: one SGD step with learning rate 1 moves the
    variable by minus its gradient; the variable is put back afterwards."""
    probe = LossProbe(loss_fn, [variable])
    before = np.asarray(keras.ops.convert_to_numpy(variable))
    # Eagerly: in a TensorFlow graph (no XLA), Keras' optimizer update may run before forward reads of a variable
    # that its own gradient does not depend on, which then see the updated value (Keras 3.15, TF 2.21).
    probe.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), run_eagerly=True)
    loss = probe.train_on_batch(np.zeros((1, 1), "float32"))
    after = np.asarray(keras.ops.convert_to_numpy(variable))
    variable.assign(before)
    return loss, before - after


def test_cross_entropy_averages_over_labelled_pixels_only():
    labels = np.array([[[0, 1, 255]]], "int32")
    logits = np.array([[[[0.0, 0.0], [0.0, math.log(3.0)], [100.0, -100.0]]]], "float32")
    # pixel 1: -log(1/2); pixel 2: -log(3/4)... label 1 has logit log 3: p = 3/4; the ignored pixel is dropped.
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert float(semantic_cross_entropy(labels, logits)) == pytest.approx(expected, rel=1e-5)


def test_all_ignored_batch_gives_zero_loss_and_finite_gradient():
    labels = np.full((1, 2, 2), 255, "int32")
    logits = keras.Variable(np.random.default_rng(0).normal(size=(1, 2, 2, 3)).astype("float32"))
    loss, grad = loss_and_gradient(lambda: semantic_cross_entropy(labels, keras.ops.convert_to_tensor(logits)), logits)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad))


def test_instance_l1_is_the_l1_norm_averaged_over_instance_pixels():
    target = np.zeros((1, 1, 3, 2), "float32")
    pred = np.array([[[[1.0, -2.0], [0.5, 0.5], [50.0, 50.0]]]], "float32")
    mask = np.array([[[[1.0], [1.0], [0.0]]]], "float32")
    assert float(masked_l1(target, pred, mask)) == pytest.approx((3.0 + 1.0) / 2)


def test_empty_mask_gives_zero_not_nan():
    target = np.ones((1, 2, 2, 1), "float32")
    assert float(masked_l1(target, target * 3, np.zeros((1, 2, 2, 1), "float32"))) == 0.0


def test_invalid_depth_targets_never_reach_loss_or_gradient():
    target = np.array([[[[2.0], [np.nan]], [[np.inf], [1.0]]]], "float32")
    mask = np.array([[[[1.0], [0.0]], [[0.0], [1.0]]]], "float32")
    pred = keras.Variable(np.full((1, 2, 2, 1), 1.5, "float32"))
    loss, grad = loss_and_gradient(lambda: masked_l1(target, keras.ops.convert_to_tensor(pred), mask), pred)
    assert float(loss) == pytest.approx(0.5)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[..., 0], [[[-0.5, 0.0], [0.0, 0.5]]])


def test_mask_may_drop_the_channel_axis():
    target = np.zeros((1, 2, 2, 1), "float32")
    pred = np.ones((1, 2, 2, 1), "float32")
    assert float(masked_l1(target, pred, np.array([[[1, 0], [0, 0]]], "float32"))) == 1.0


def test_task_loss_reads_masks_from_the_target_dict():
    targets = {"depth": np.zeros((1, 1, 2, 1), "float32"), "depth_mask": np.array([[[[1.0], [0.0]]]], "float32")}
    predictions = {"depth": np.array([[[[2.0], [10.0]]]], "float32")}
    assert float(task_loss("depth", targets, predictions)) == pytest.approx(2.0)
    del targets["depth_mask"]  # no mask: every pixel counts
    assert float(task_loss("depth", targets, predictions)) == pytest.approx(6.0)
