import math

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras.weighting import EqualWeighting, FixedWeighting, UncertaintyWeightingLayer, build_weighting
from tests.helpers import assert_config_round_trip


def _set(layer, values):
    for task, value in values.items():
        layer.log_variances[task].assign(value)


def test_uncertainty_total_uses_the_classification_and_regression_forms():
    layer = UncertaintyWeightingLayer(("semantic", "depth"))
    _set(layer, {"semantic": 0.5, "depth": -1.0})
    total = layer({"semantic": tf.constant(2.0), "depth": tf.constant(3.0)})
    expected = math.exp(-0.5) * 2.0 + 0.25 + 0.5 * math.exp(1.0) * 3.0 - 0.5
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert len(layer.losses) == 1 and float(layer.losses[0]) == pytest.approx(expected, rel=1e-6)


def test_uncertainty_gradients_match_hand_derivation():
    layer = UncertaintyWeightingLayer(("semantic", "instance", "depth"))
    s = {"semantic": 0.3, "instance": 2.0, "depth": -0.7}
    _set(layer, s)
    losses = {"semantic": tf.Variable(1.5), "instance": tf.Variable(8.0), "depth": tf.Variable(0.4)}
    with tf.GradientTape() as tape:
        total = layer({k: v.read_value() for k, v in losses.items()})
    variables = [layer.log_variances[t] for t in s] + [losses[t] for t in s]
    grads = [float(g) for g in tape.gradient(total, variables)]
    # d/ds of c exp(-s) L + s/2 is -c exp(-s) L + 1/2; d/dL is c exp(-s), c = 1 (classification) or 1/2.
    c = {"semantic": 1.0, "instance": 0.5, "depth": 0.5}
    expected_ds = [-c[t] * math.exp(-s[t]) * float(losses[t].numpy()) + 0.5 for t in s]
    expected_dl = [c[t] * math.exp(-s[t]) for t in s]
    np.testing.assert_allclose(grads, expected_ds + expected_dl, rtol=1e-5)


def test_sigma_squared_and_effective_weights_are_exposed():
    layer = UncertaintyWeightingLayer(("semantic", "depth"), initial_log_variance={"semantic": math.log(0.5)})
    sigma2 = {k: float(v) for k, v in layer.sigma_squared().items()}
    weights = {k: float(v) for k, v in layer.task_weights().items()}
    assert sigma2 == pytest.approx({"semantic": 0.5, "depth": 1.0})
    assert weights == pytest.approx({"semantic": 2.0, "depth": 0.5})
    assert set(layer.log_values()) == {"semantic_weight", "depth_weight", "semantic_sigma2", "depth_sigma2"}


def test_optimum_of_the_regression_form_is_sigma2_equal_to_the_loss():
    import keras

    layer = UncertaintyWeightingLayer(("depth",), initial_log_variance=3.0)
    opt = keras.optimizers.SGD(0.5)
    for _ in range(300):
        with tf.GradientTape() as tape:
            total = layer({"depth": tf.constant(4.0)})
        opt.apply_gradients(zip(tape.gradient(total, layer.trainable_variables), layer.trainable_variables))
    assert float(layer.sigma_squared()["depth"]) == pytest.approx(4.0, rel=1e-3)


def test_uncertainty_variables_stay_float32_under_mixed_precision():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = UncertaintyWeightingLayer(("semantic",))
        assert layer.log_variances["semantic"].dtype == "float32"
        total = layer({"semantic": tf.constant(1.0, tf.float16)})
        assert total.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fixed_and_equal_weightings():
    losses = {"semantic": tf.constant(2.0), "instance": tf.constant(10.0), "depth": tf.constant(1.0)}
    fixed = FixedWeighting(("semantic", "instance", "depth"), task_weights=[0.89, 0.01, 0.1])
    assert float(fixed(losses)) == pytest.approx(0.89 * 2 + 0.01 * 10 + 0.1 * 1)
    assert float(EqualWeighting(("semantic", "instance", "depth"))(losses)) == pytest.approx(13.0)
    with pytest.raises(ValueError, match="3 tasks"):
        FixedWeighting(("semantic", "instance", "depth"), task_weights=[1.0, 2.0])


def test_missing_task_loss_and_unknown_weighting_are_clear_errors():
    with pytest.raises(ValueError, match="missing"):
        EqualWeighting(("semantic", "depth"))({"semantic": tf.constant(1.0)})
    with pytest.raises(ValueError, match="uncertainty"):
        build_weighting("gradnorm", ("depth",))


@pytest.mark.parametrize("layer", [
    UncertaintyWeightingLayer(("semantic", "depth"), initial_log_variance={"depth": 2.0}, name="u"),
    FixedWeighting(("semantic", "instance"), task_weights={"semantic": 0.3, "instance": 0.7}),
    EqualWeighting(("instance", "depth")),
])
def test_weighting_config_round_trip(layer):
    assert_config_round_trip(layer)


def _run_epoch(layer, step_losses):
    for losses in step_losses:
        layer({t: tf.constant(v) for t, v in zip(layer.tasks, losses)}, training=True)
    layer.on_epoch_end()


def test_dwa_weights_follow_the_loss_ratio_of_the_last_two_epochs():
    from mtl_keras.weighting import DWAWeighting

    layer = DWAWeighting(("semantic", "depth"))
    _run_epoch(layer, [(2.0, 1.0), (1.0, 1.0)])  # epoch means (1.5, 1.0)
    np.testing.assert_allclose(layer.current_weights.numpy(), [1.0, 1.0])  # too early to adapt
    _run_epoch(layer, [(4.0, 1.0), (2.0, 1.0)])  # epoch means (3.0, 1.0): ratios (2, 1)
    e = np.exp(np.array([2.0, 1.0]) / 2.0)
    np.testing.assert_allclose(layer.current_weights.numpy(), 2 * e / e.sum(), rtol=1e-6)
    assert float(layer({"semantic": tf.constant(1.0), "depth": tf.constant(1.0)})) == pytest.approx(2.0)
    # A weight computed from losses not seen in training mode: evaluation does not feed the statistics.
    layer({"semantic": tf.constant(100.0), "depth": tf.constant(1.0)}, training=False)
    assert float(layer.loss_count.numpy()) == 0.0


def test_mtunet_weighting_alpha_is_the_ratio_of_windowed_loss_variances():
    from mtl_keras.weighting import MTUNetWeighting

    layer = MTUNetWeighting(("semantic", "depth"), weight_learning_rate=0.0, window=3)
    _run_epoch(layer, [(2.0, 1.0), (1.0, 1.5), (1.2, 1.1)])
    _run_epoch(layer, [(4.0, 1.0), (2.0, 1.5), (2.4, 1.1)])
    var1 = np.var([2.0, 1.0, 1.2])
    var2 = np.var([4.0, 2.0, 2.4])
    expected = ((var1 + var2) / 2 + 1e-8) / (var1 + 1e-8)  # sigma(t-1): mean of both epochs; sigma(t-2): epoch 1
    np.testing.assert_allclose(layer.alpha.numpy(), [expected, 1.0], rtol=1e-5)
    p = np.array([expected, 1.0]) / (expected + 1.0)
    total = layer({"semantic": tf.constant(3.0), "depth": tf.constant(5.0)})
    assert float(total) == pytest.approx(p[0] * 3 + p[1] * 5, rel=1e-5)


def test_mtunet_weights_take_a_gradient_step_with_their_own_rate_losses_held_fixed():
    from mtl_keras.weighting import MTUNetWeighting

    layer = MTUNetWeighting(("semantic", "depth"), weight_learning_rate=0.1)
    layer({"semantic": tf.constant(3.0), "depth": tf.constant(1.0)}, training=True)
    # p = (1/2, 1/2), L = 2: omega -= 0.1 * p * (L_i - L) = -0.1 * 0.5 * (1, -1)
    np.testing.assert_allclose(layer.log_w.numpy(), [-0.05, 0.05], rtol=1e-6)
    weights = [float(v) for v in layer.task_weights().values()]
    assert sum(weights) == pytest.approx(1.0) and weights[0] < weights[1]


@pytest.mark.parametrize("name", ["dwa", "mtunet"])
def test_epoch_weighting_config_round_trip(name):
    assert_config_round_trip(build_weighting(name, ("semantic", "depth")))
