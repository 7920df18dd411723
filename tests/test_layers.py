"""The dilated-convolution paths of AtrousConv2D: oneDNN's native kernels and the tap-by-tap gradients used where
TensorFlow runs without oneDNN (every AVX2-only CPU unless TF_ENABLE_ONEDNN_OPTS=1)."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from mtl_keras.layers import AtrousConv2D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def direct_dilated_conv(x, kernel, rate):
    """'same' stride-1 dilated convolution by its definition, in float64 numpy (an independent reference)."""
    k_h, k_w, _, c_out = kernel.shape
    pad_h, pad_w = (k_h - 1) * rate[0] // 2, (k_w - 1) * rate[1] // 2
    padded = np.pad(x, [(0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)])
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, c_out))
    for i in range(k_h):
        for j in range(k_w):
            out += padded[:, i * rate[0]:i * rate[0] + h, j * rate[1]:j * rate[1] + w, :] @ kernel[i, j]
    return out


@pytest.mark.tf_only
@pytest.mark.parametrize("shape,kernel_size,rate", [((2, 9, 13, 3), 3, (2, 2)), ((1, 16, 32, 4), 3, (12, 12)),
                                                     ((2, 7, 7, 3), 3, (1, 3)), ((1, 10, 11, 2), 5, (2, 2))])
def test_tap_gradients_match_the_definition_of_the_dilated_convolution(shape, kernel_size, rate):
    import tensorflow as tf

    from mtl_keras.layers import dilated_conv2d_tap_gradients

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    kernel = rng.normal(size=(kernel_size, kernel_size, shape[-1], 4))
    upstream = rng.normal(size=shape[:3] + (4,))
    x_t, k_t = tf.constant(x), tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch([x_t, k_t])
        y = dilated_conv2d_tap_gradients(x_t, k_t, rate)
        objective = tf.reduce_sum(y * upstream)  # d objective / d y = upstream
    dx, dk = tape.gradient(objective, [x_t, k_t])
    np.testing.assert_allclose(y.numpy(), direct_dilated_conv(x, kernel, rate), atol=1e-10)
    # The objective is linear in x and in the kernel: its gradients are the objective of unit perturbations,
    # computed here with the reference convolution.
    for index in [(0, 1, 2, 0), (0, shape[1] - 1, shape[2] - 1, shape[3] - 1)]:
        unit = np.zeros(shape)
        unit[index] = 1.0
        expected = float(np.sum(direct_dilated_conv(unit, kernel, rate) * upstream))
        assert dx.numpy()[index] == pytest.approx(expected, abs=1e-9)
    for index in [(0, 0, 0, 0), (kernel_size - 1, kernel_size // 2, shape[-1] - 1, 3)]:
        unit = np.zeros(kernel.shape)
        unit[index] = 1.0
        expected = float(np.sum(direct_dilated_conv(x, unit, rate) * upstream))
        assert dk.numpy()[index] == pytest.approx(expected, abs=1e-9)


ONEDNN_OFF_SCRIPT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    import numpy as np, keras, tensorflow as tf
    import mtl_keras
    from mtl_keras import platform
    from mtl_keras.layers import AtrousConv2D
    assert not platform.onednn_enabled(), "oneDNN should be off"
    assert not platform.native_dilated_conv_gradients()
    assert not platform.native_dilated_conv_gradients()  # probed once: one warning
    layer = AtrousConv2D(4, 3, padding="same", dilation_rate=3)
    plain = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=3)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype("float32"))
    layer.build(x.shape); plain.build(x.shape); plain.set_weights(layer.get_weights())
    def grads(l):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(l(x)))
        return tape.gradient(loss, l.trainable_variables)
    ours, theirs = grads(layer), grads(plain)  # Keras' path: space-to-batch, differentiable everywhere
    worst = max(float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b))) for a, b in zip(ours, theirs))
    assert worst < 1e-5, worst
    print("OK", worst)
""")


@pytest.mark.tf_only
@pytest.mark.subprocess
def test_with_onednn_off_dilated_convs_train_with_one_warning():
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", ONEDNN_OFF_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout
    assert proc.stderr.count("TensorFlow runs without its oneDNN kernels") == 1, proc.stderr[-3000:]
    assert "TF_ENABLE_ONEDNN_OPTS=0" in proc.stderr  # names the cause


@pytest.mark.tf_only
@pytest.mark.subprocess
def test_import_mtl_keras_turns_onednn_on_unless_the_user_chose():
    script = ("import os, mtl_keras\nfrom mtl_keras import platform\n"
              "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), platform.onednn_enabled(), "
              "platform.native_dilated_conv_gradients())")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "True", "True"]
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"  # the user's choice stands
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "False", "False"]


def test_atrous_conv_equals_keras_conv_on_this_backend():
    """Same weights, same outputs as keras.layers.Conv2D (whatever path this backend and process take)."""
    x = np.random.default_rng(1).normal(size=(2, 16, 20, 3)).astype("float32")
    ours = AtrousConv2D(5, 3, padding="same", dilation_rate=12)
    plain = keras.layers.Conv2D(5, 3, padding="same", dilation_rate=12)
    ours.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(ours.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(plain(x)),
                               atol=1e-4)
