import math

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras.losses import depth_l1, instance_l1, masked_l1, semantic_cross_entropy, task_loss


def test_cross_entropy_averages_over_labelled_pixels_only():
    labels = np.array([[[0, 1, 255]]], "int32")
    logits = np.array([[[[0.0, 0.0], [0.0, math.log(3.0)], [100.0, -100.0]]]], "float32")
    # pixel 1: -log(1/2); pixel 2: -log(3/4)... label 1 has logit log 3: p = 3/4; the ignored pixel is dropped.
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert float(semantic_cross_entropy(labels, logits)) == pytest.approx(expected, rel=1e-5)


def test_all_ignored_batch_gives_zero_loss_and_finite_gradient():
    labels = np.full((1, 2, 2), 255, "int32")
    logits = tf.Variable(np.random.default_rng(0).normal(size=(1, 2, 2, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = semantic_cross_entropy(labels, logits)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(tape.gradient(loss, logits).numpy()))


def test_instance_l1_is_the_l1_norm_averaged_over_instance_pixels():
    target = np.zeros((1, 1, 3, 2), "float32")
    pred = np.array([[[[1.0, -2.0], [0.5, 0.5], [50.0, 50.0]]]], "float32")
    mask = np.array([[[[1.0], [1.0], [0.0]]]], "float32")
    assert float(instance_l1(target, pred, mask)) == pytest.approx((3.0 + 1.0) / 2)


def test_empty_mask_gives_zero_not_nan():
    target = np.ones((1, 2, 2, 1), "float32")
    assert float(depth_l1(target, target * 3, np.zeros((1, 2, 2, 1), "float32"))) == 0.0


def test_invalid_depth_targets_never_reach_loss_or_gradient():
    target = np.array([[[[2.0], [np.nan]], [[np.inf], [1.0]]]], "float32")
    mask = np.array([[[[1.0], [0.0]], [[0.0], [1.0]]]], "float32")
    pred = tf.Variable(np.full((1, 2, 2, 1), 1.5, "float32"))
    with tf.GradientTape() as tape:
        loss = depth_l1(target, pred, mask)
    assert float(loss) == pytest.approx(0.5)
    grad = tape.gradient(loss, pred).numpy()
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
