import math

import keras
import numpy as np
import pytest

from mtl_keras.weighting import EqualWeighting, FixedWeighting, UncertaintyWeightingLayer, build_weighting
from tests.helpers import assert_config_round_trip


def _set(layer, values):
    for task, value in values.items():
        layer.log_variances[task].assign(value)


def _c(value, dtype="float32"):
    """A scalar tensor of the backend in use."""
    return keras.ops.convert_to_tensor(np.asarray(value, dtype))


class LossProbe(keras.Model):
    """A model whose training loss is ``loss_fn()`` alone: plain SGD through Keras' own train step (any backend)
    then moves every trainable variable by minus learning rate times its gradient. ``layers`` and ``variables``
    are tracked, so that the JAX train step substitutes the values that ``loss_fn`` reads."""

    def __init__(self, loss_fn, layers=(), variables=()):
        super().__init__(name="loss_probe")
        self.loss_fn = loss_fn
        self.probed_layers = list(layers)
        owned = {id(v) for layer in layers for v in layer.weights}
        self.probed_variables = [v for v in variables if id(v) not in owned]

    def call(self, x, training=None):
        return self.loss_fn()

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return y_pred  # the total only, not also the add_loss term of a weighting (the same total)


def _gradients(loss_fn, variables, layers=()):
    """[d loss_fn() / d v for v in variables] (numpy), on any backend: one SGD step with learning rate 1 moves each
    variable by minus its gradient. The trainable variables are put back afterwards."""
    probe = LossProbe(loss_fn, layers, variables)
    trainable = list(probe.trainable_variables)
    assert all(any(v is w for w in trainable) for v in variables)
    saved = [keras.ops.convert_to_numpy(v) for v in trainable]
    before = [np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in variables]
    # Eagerly: in a TensorFlow graph (no XLA), Keras' optimizer update may run before forward reads of a variable
    # that its own gradient does not depend on (the loss is linear in it, like the offsets here), which then see
    # the updated value (Keras 3.15, TF 2.21).
    probe.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), run_eagerly=True)
    probe.train_on_batch(np.zeros((1, 1), "float32"))
    after = [np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in variables]
    for v, value in zip(trainable, saved):
        v.assign(value)
    return [b - a for b, a in zip(before, after)]


def test_uncertainty_total_uses_the_classification_and_regression_forms():
    layer = UncertaintyWeightingLayer(("semantic", "depth"))
    _set(layer, {"semantic": 0.5, "depth": -1.0})
    total = layer({"semantic": _c(2.0), "depth": _c(3.0)})
    expected = math.exp(-0.5) * 2.0 + 0.25 + 0.5 * math.exp(1.0) * 3.0 - 0.5
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert len(layer.losses) == 1 and float(layer.losses[0]) == pytest.approx(expected, rel=1e-6)


def test_uncertainty_gradients_match_hand_derivation():
    layer = UncertaintyWeightingLayer(("semantic", "instance", "depth"))
    s = {"semantic": 0.3, "instance": 2.0, "depth": -0.7}
    _set(layer, s)
    losses = {"semantic": 1.5, "instance": 8.0, "depth": 0.4}
    # Each loss as its value plus a variable at 0: the gradient with respect to that variable is the loss's (and
    # the SGD step moves it from exactly 0, so the step does not round the gradient to the loss's precision).
    offsets = {t: keras.Variable(0.0, dtype="float32", name=f"{t}_offset") for t in s}
    variables = [layer.log_variances[t] for t in s] + [offsets[t] for t in s]
    grads = [float(g) for g in _gradients(
        lambda: layer({t: losses[t] + keras.ops.convert_to_tensor(offsets[t]) for t in s}), variables, [layer])]
    # d/ds of c exp(-s) L + s/2 is -c exp(-s) L + 1/2; d/dL is c exp(-s), c = 1 (classification) or 1/2.
    c = {"semantic": 1.0, "instance": 0.5, "depth": 0.5}
    expected_ds = [-c[t] * math.exp(-s[t]) * losses[t] + 0.5 for t in s]
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
    layer = UncertaintyWeightingLayer(("depth",), initial_log_variance=3.0)
    probe = LossProbe(lambda: layer({"depth": _c(4.0)}), [layer])
    probe.compile(optimizer=keras.optimizers.SGD(0.5))
    probe.fit(np.zeros((300, 1), "float32"), batch_size=1, epochs=1, shuffle=False, verbose=0)  # 300 SGD steps
    assert probe.optimizer.iterations.numpy() == 300
    assert float(layer.sigma_squared()["depth"]) == pytest.approx(4.0, rel=1e-3)


def test_uncertainty_variables_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = UncertaintyWeightingLayer(("semantic",))
        assert layer.log_variances["semantic"].dtype == "float32"
        total = layer({"semantic": _c(1.0, "float16")})
        assert keras.backend.standardize_dtype(total.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fixed_and_equal_weightings():
    losses = {"semantic": _c(2.0), "instance": _c(10.0), "depth": _c(1.0)}
    fixed = FixedWeighting(("semantic", "instance", "depth"), task_weights=[0.89, 0.01, 0.1])
    assert float(fixed(losses)) == pytest.approx(0.89 * 2 + 0.01 * 10 + 0.1 * 1)
    assert float(EqualWeighting(("semantic", "instance", "depth"))(losses)) == pytest.approx(13.0)
    with pytest.raises(ValueError, match="3 tasks"):
        FixedWeighting(("semantic", "instance", "depth"), task_weights=[1.0, 2.0])


def test_missing_task_loss_and_unknown_weighting_are_clear_errors():
    with pytest.raises(ValueError, match="missing"):
        EqualWeighting(("semantic", "depth"))({"semantic": _c(1.0)})
    with pytest.raises(ValueError, match="uncertainty.*pcgrad"):  # the valid names of both kinds
        build_weighting("no_such_weighting", ("depth",))
    with pytest.raises(ValueError, match=r"'cagrad' has no option\(s\) \['cc'\]; its options: c, "):
        build_weighting("cagrad", ("semantic", "depth"), options={"cc": 0.5})
    with pytest.raises(ValueError, match="drop --rep_grad"):
        build_weighting("moco", ("semantic", "depth"), rep_grad=True)


def test_equal_weighting_has_one_name_and_libmtl_ew_points_to_it():
    from mtl_keras.gradient_methods import GRADIENT_METHODS, aggregate
    from mtl_keras.weighting import weighting_names

    assert weighting_names().count("equal") == 1 and "ew" not in weighting_names()
    assert "ew" not in GRADIENT_METHODS
    np.testing.assert_allclose(keras.ops.convert_to_numpy(aggregate("equal", np.eye(2))), [1.0, 1.0])
    with pytest.raises(ValueError, match="LibMTL's 'ew' is 'equal' here"):
        build_weighting("ew", ("semantic", "depth"))
    with pytest.raises(ValueError, match="LibMTL's 'ew' is 'equal' here"):
        aggregate("ew", np.eye(2))


@pytest.mark.parametrize("layer", [
    UncertaintyWeightingLayer(("semantic", "depth"), initial_log_variance={"depth": 2.0}, name="u"),
    FixedWeighting(("semantic", "instance"), task_weights={"semantic": 0.3, "instance": 0.7}),
    EqualWeighting(("instance", "depth")),
])
def test_weighting_config_round_trip(layer):
    assert_config_round_trip(layer)


def _run_epoch(layer, step_losses):
    for losses in step_losses:
        layer({t: _c(v) for t, v in zip(layer.tasks, losses)}, training=True)
    layer.on_epoch_end()


def test_dwa_weights_follow_the_loss_ratio_of_the_last_two_epochs():
    from mtl_keras.weighting import DWAWeighting

    layer = DWAWeighting(("semantic", "depth"))
    _run_epoch(layer, [(2.0, 1.0), (1.0, 1.0)])  # epoch means (1.5, 1.0)
    np.testing.assert_allclose(layer.current_weights.numpy(), [1.0, 1.0])  # too early to adapt
    _run_epoch(layer, [(4.0, 1.0), (2.0, 1.0)])  # epoch means (3.0, 1.0): ratios (2, 1)
    e = np.exp(np.array([2.0, 1.0]) / 2.0)
    np.testing.assert_allclose(layer.current_weights.numpy(), 2 * e / e.sum(), rtol=1e-6)
    assert float(layer({"semantic": _c(1.0), "depth": _c(1.0)})) == pytest.approx(2.0)
    # A weight computed from losses not seen in training mode: evaluation does not feed the statistics.
    layer({"semantic": _c(100.0), "depth": _c(1.0)}, training=False)
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
    total = layer({"semantic": _c(3.0), "depth": _c(5.0)})
    assert float(total) == pytest.approx(p[0] * 3 + p[1] * 5, rel=1e-5)


def test_mtunet_weights_take_a_gradient_step_with_their_own_rate_losses_held_fixed():
    from mtl_keras.weighting import MTUNetWeighting

    layer = MTUNetWeighting(("semantic", "depth"), weight_learning_rate=0.1)
    layer({"semantic": _c(3.0), "depth": _c(1.0)}, training=True)
    # p = (1/2, 1/2), L = 2: omega -= 0.1 * p * (L_i - L) = -0.1 * 0.5 * (1, -1)
    np.testing.assert_allclose(layer.log_w.numpy(), [-0.05, 0.05], rtol=1e-6)
    weights = [float(v) for v in layer.task_weights().values()]
    assert sum(weights) == pytest.approx(1.0) and weights[0] < weights[1]


@pytest.mark.parametrize("name", ["dwa", "mtunet"])
def test_epoch_weighting_config_round_trip(name):
    assert_config_round_trip(build_weighting(name, ("semantic", "depth")))


def test_gradient_weighting_config_round_trip():
    clone = assert_config_round_trip(build_weighting("cagrad", ("semantic", "depth"), rep_grad=True, seed=3,
                                                     options={"c": 0.5}))
    assert clone.method.c == 0.5 and clone.rep_grad and clone.seed == 3
