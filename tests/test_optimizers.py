"""The optimiser settings beyond the default job's: the step learning-rate schedule (torch's StepLR, per epoch) and
Adam with torch's coupled L2 weight decay (LibMTL's recipe); the defaults build exactly the optimiser they did."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from mtl_keras.config import TrainConfig
from mtl_keras.experiment import build_optimizer
from mtl_keras.training import AdamL2, StepDecay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lr_at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


# ---------------------------------------------------------------------------------------------- step schedule

def test_step_decay_values_at_the_boundaries():
    # lr 1e-4, x0.5 every 100 epochs of 99 steps (LibMTL's NYUv2: 795 images, batch 8, drop_last): 9900 steps
    schedule = StepDecay(1e-4, decay_steps=9900, gamma=0.5)
    expected = {0: 1e-4, 1: 1e-4, 9899: 1e-4, 9900: 5e-5, 9901: 5e-5, 19799: 5e-5, 19800: 2.5e-5, 29700: 1.25e-5}
    for step, value in expected.items():
        assert lr_at(schedule, step) == pytest.approx(value, rel=1e-6), step


def test_step_decay_serializes():
    schedule = StepDecay(2e-3, decay_steps=7, gamma=0.1)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, StepDecay)
    assert (restored.initial_learning_rate, restored.decay_steps, restored.gamma) == (2e-3, 7, 0.1)
    assert lr_at(restored, 14) == pytest.approx(2e-5, rel=1e-6)
    with pytest.raises(ValueError, match="decay_steps"):
        StepDecay(1e-3, decay_steps=0)


def test_build_optimizer_step_schedule_in_epochs():
    config = TrainConfig(lr_schedule="step", lr_step_epochs=3, lr_step_gamma=0.1, learning_rate=1e-2)
    optimizer = build_optimizer(config, total_steps=100, steps_per_epoch=5)
    schedule = optimizer.learning_rate if isinstance(optimizer.learning_rate, StepDecay) else optimizer._learning_rate
    assert isinstance(schedule, StepDecay) and schedule.decay_steps == 15  # 3 epochs x 5 steps
    assert [lr_at(schedule, s) for s in (14, 15, 30)] == pytest.approx([1e-2, 1e-3, 1e-4], rel=1e-6)
    sgd = build_optimizer(config.replace(optimizer="sgd"), total_steps=100, steps_per_epoch=5)
    assert isinstance(sgd._learning_rate, StepDecay) and sgd._learning_rate.decay_steps == 15
    with pytest.raises(ValueError, match="steps per epoch"):
        build_optimizer(config, total_steps=100)


# ------------------------------------------------------------------------------------------ Adam with coupled L2

def numpy_adam_l2(w, grads, lr, l2, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras' Adam update (epsilon outside the bias-corrected root) on g + l2 * w: torch.optim.Adam's weight_decay."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g + l2 * w
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        alpha = lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
        w = w - alpha * m / (np.sqrt(v) + epsilon)
    return w


def run_optimizer(optimizer, w0, grads):
    var = keras.Variable(w0, dtype="float32")
    for g in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g, dtype="float32"), var)])
    return np.asarray(keras.ops.convert_to_numpy(var), dtype=np.float64)


def test_adam_l2_matches_hand_computed_update():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(scale=1e-2, size=w0.shape).astype(np.float32) for _ in range(3)]
    # l2 large enough that the L2 term (0.5 * w, about 0.5) dominates the gradient: a decoupled decay would differ
    got = run_optimizer(AdamL2(l2=0.5, learning_rate=0.1), w0, grads)
    want = numpy_adam_l2(w0.astype(np.float64), [g.astype(np.float64) for g in grads], lr=0.1, l2=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 steps of about 0.1
    plain = numpy_adam_l2(w0.astype(np.float64), [g.astype(np.float64) for g in grads], lr=0.1, l2=0.0)
    assert np.abs(got - plain).max() > 1e-2  # the L2 term changed the update
    decoupled = run_optimizer(keras.optimizers.Adam(learning_rate=0.1, weight_decay=0.5), w0, grads)
    assert np.abs(got - decoupled).max() > 1e-2  # and it is not Keras' AdamW-style weight_decay


def test_adam_l2_zero_is_keras_adam():
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=w0.shape).astype(np.float32) for _ in range(3)]
    got = run_optimizer(AdamL2(l2=0.0, learning_rate=1e-2), w0, grads)
    want = run_optimizer(keras.optimizers.Adam(learning_rate=1e-2), w0, grads)
    np.testing.assert_array_equal(got, want)


def test_adam_l2_matches_torch_adam_weight_decay():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(6,)).astype(np.float32)
    grads = [rng.normal(scale=0.1, size=w0.shape).astype(np.float32) for _ in range(4)]
    param = torch.nn.Parameter(torch.tensor(w0))
    reference = torch.optim.Adam([param], lr=1e-2, weight_decay=0.3, eps=1e-8)
    for g in grads:
        param.grad = torch.tensor(g)
        reference.step()
    got = run_optimizer(AdamL2(l2=0.3, learning_rate=1e-2, epsilon=1e-8), w0, grads)
    # torch adds eps after the bias correction of sqrt(v), Keras before: equal up to eps-sized terms
    np.testing.assert_allclose(got, param.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_l2_serializes_with_its_config():
    optimizer = AdamL2(l2=1e-5, learning_rate=StepDecay(1e-4, 9900, 0.5), beta_1=0.8)
    config = optimizer.get_config()
    assert config["l2"] == 1e-5 and config["beta_1"] == 0.8
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert isinstance(restored, AdamL2) and restored.l2 == 1e-5 and restored.beta_1 == 0.8
    assert isinstance(restored._learning_rate, StepDecay) and restored._learning_rate.decay_steps == 9900
    with pytest.raises(ValueError, match="l2"):
        AdamL2(l2=-1.0)


def test_build_optimizer_adam_l2():
    optimizer = build_optimizer(TrainConfig(adam_l2=1e-5, learning_rate=1e-4), total_steps=50)
    assert isinstance(optimizer, AdamL2) and optimizer.l2 == 1e-5


# ------------------------------------------------------------------------------------- config and the default job

def test_defaults_keep_the_default_job():
    config = TrainConfig()
    assert (config.lr_schedule, config.adam_l2, config.lr_step_epochs, config.lr_step_gamma) == ("poly", 0.0, 100, 0.5)
    optimizer = build_optimizer(config, total_steps=800, steps_per_epoch=75)
    assert type(optimizer) is type(keras.optimizers.Adam())  # not AdamL2 (torch backend: its own Adam class)
    schedule = optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.PolynomialDecay)
    assert (schedule.initial_learning_rate, schedule.decay_steps, schedule.end_learning_rate, schedule.power) == (
        2e-3, 800, 0.0, 0.9)
    sgd = build_optimizer(config.replace(optimizer="sgd"), total_steps=800)
    assert isinstance(sgd._learning_rate, keras.optimizers.schedules.PolynomialDecay)
    assert sgd._learning_rate.decay_steps == 800 and sgd.nesterov
    # A saved run's config without the new fields (written before they existed) still equals today's defaults.
    saved = {k: v for k, v in json.loads(config.to_json()).items()
             if k not in ("lr_schedule", "lr_step_epochs", "lr_step_gamma", "adam_l2")}
    assert config.differences(saved) == []
    assert config.replace(adam_l2=1e-5).differences(saved) == ["adam_l2"]


@pytest.mark.parametrize("overrides, flag", [
    ({"lr_schedule": "cosine"}, "--lr_schedule"),
    ({"lr_step_epochs": 0}, "--lr_step_epochs"),
    ({"lr_step_epochs": 2.5}, "--lr_step_epochs"),
    ({"lr_step_gamma": 0.0}, "--lr_step_gamma"),
    ({"lr_step_gamma": float("nan")}, "--lr_step_gamma"),
    ({"adam_l2": -1e-5}, "--adam_l2"),
    ({"adam_l2": "1e-5"}, "--adam_l2"),
    ({"adam_l2": 1e-5, "optimizer": "sgd"}, "--adam_l2"),
])
def test_config_errors_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**overrides)


@pytest.mark.subprocess
def test_train_flags_set_the_new_fields():
    code = ("import sys; sys.path.insert(0, 'experiments'); import train; from absl import flags; "
            "flags.FLAGS(['t', '--lr_schedule', 'step', '--lr_step_epochs', '7', '--lr_step_gamma', '0.25', "
            "'--adam_l2', '1e-5']); c = train.config_from_flags(); "
            "print(c.lr_schedule, c.lr_step_epochs, c.lr_step_gamma, c.adam_l2)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.split("\n")[-2] == "step 7 0.25 1e-05"
