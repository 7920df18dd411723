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
