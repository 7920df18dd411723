import itertools

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras.layers import AtrousConv2D, BatchNormalization, ResizeLike
from mtl_keras.models.kendall import KendallMultiTaskModel
from mtl_keras.models.resnet import stage_strides_and_dilations
from tests.helpers import (assert_config_round_trip, assert_keras_save_load, assert_model_config_round_trip,
                           random_images, tiny_kendall_kwargs)

TASK_SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(("semantic", "instance", "depth"), r)]


@pytest.mark.parametrize("tasks", TASK_SUBSETS, ids=["+".join(s) for s in TASK_SUBSETS])
def test_every_task_subset_builds_with_right_shapes(tasks):
    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=tasks, num_classes=7, input_shape=(64, 96, 3),
                                  **tiny_kendall_kwargs())
    out = model(random_images(2, 64, 96), training=False)
    expected = {"semantic": (2, 64, 96, 7), "instance": (2, 64, 96, 2), "depth": (2, 64, 96, 1)}
    assert set(out) == set(tasks)
    for task in tasks:
        assert tuple(out[task].shape) == expected[task]
        assert keras.backend.standardize_dtype(out[task].dtype) == "float32"


def test_output_stride_plan_turns_strides_into_dilation():
    # (stride, dilation of first block, dilation of later blocks) for conv2..conv5
    assert stage_strides_and_dilations(8) == [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
    assert stage_strides_and_dilations(16) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]
    assert stage_strides_and_dilations(32) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1)]
    with pytest.raises(ValueError, match="output_stride"):
        stage_strides_and_dilations(4)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_encoder_feature_map_size_follows_output_stride(output_stride):
    model = KendallMultiTaskModel(tasks=("depth",), input_shape=(64, 64, 3), output_stride=output_stride,
                                  **tiny_kendall_kwargs())
    features = model.get_layer("conv5_block2_out").output
    assert tuple(features.shape[1:3]) == (64 // output_stride, 64 // output_stride)


def test_aspp_is_four_convolutions_plus_image_pooling_concatenated_to_1280():
    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", input_shape=(64, 64, 3))
    assert model.get_layer("aspp_concat").output.shape[-1] == 1280
    assert model.get_layer("aspp_1x1_conv").kernel.shape[:2] == (1, 1)
    for i, rate in enumerate((12, 24, 36), start=1):
        layer = model.get_layer(f"aspp_atrous{i}_conv")
        assert tuple(layer.dilation_rate) == (rate, rate) and layer.kernel.shape[:2] == (3, 3)
    assert model.get_layer("aspp_pool_conv").kernel.shape == (1, 1, 2048, 256)
    assert model.get_layer("semantic_decoder_conv").kernel.shape == (1, 1, 1280, 256)


def test_full_resnet101_model_parameter_count_and_shapes_on_a_tiny_input():
    model = mtl_keras.build_model("kendall_deeplabv3_resnet101", num_classes=19, input_shape=(64, 64, 3))
    out = model(random_images(1, 64, 64), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semantic": (1, 64, 64, 19), "instance": (1, 64, 64, 2), "depth": (1, 64, 64, 1)}
    # ResNet-101 (42,658,176, as keras.applications without top) + ASPP (15,218,688) + decoders + normalisation.
    backbone = keras.applications.ResNet101(weights=None, include_top=False, input_shape=(64, 64, 3))
    encoder_params = sum(int(np.prod(w.shape)) for layer in model.layers if layer.name.startswith("conv")
                         for w in layer.weights)
    assert encoder_params == backbone.count_params() == 42_658_176
    assert model.count_params() == 58_859_414


def test_decoder_kernel_size_is_an_argument():
    model = KendallMultiTaskModel(tasks=("depth",), input_shape=(32, 32, 3), decoder_kernel_size=3,
                                  **tiny_kendall_kwargs())
    assert model.get_layer("depth_decoder_conv").kernel.shape[:2] == (3, 3)


def test_config_round_trip_and_keras_save_load(tmp_path):
    model = KendallMultiTaskModel(num_classes=5, input_shape=(32, 64, 3), output_stride=16, decoder_kernel_size=3,
                                  **tiny_kendall_kwargs())
    images = random_images(2, 32, 64)
    assert_model_config_round_trip(model, images)
    assert_keras_save_load(model, images, str(tmp_path))


def test_layer_config_round_trips():
    assert_config_round_trip(ResizeLike(interpolation="nearest", name="r"))
    assert_config_round_trip(AtrousConv2D(4, 3, dilation_rate=2, padding="same", name="c"))
    assert_config_round_trip(BatchNormalization(epsilon=1e-3, momentum=0.9, center=False, name="bn"))


@pytest.mark.parametrize("rate", [1, 2, 5])
def test_atrous_conv_equals_keras_conv(rate):
    x = random_images(2, 17, 23)
    fast = AtrousConv2D(6, 3, padding="same", dilation_rate=rate)
    reference = keras.layers.Conv2D(6, 3, padding="same", dilation_rate=rate)
    fast.build(x.shape), reference.build(x.shape)
    reference.set_weights(fast.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fast(x)), keras.ops.convert_to_numpy(reference(x)),
                               rtol=1e-4, atol=1e-3)


class _BatchNormProbe(keras.Model):
    """Training loss: a fixed weighted sum of the batch norm's output for the input held in a variable."""

    def __init__(self, layer, x, weights, training):
        super().__init__(name="batch_norm_probe", dtype=layer.dtype_policy)
        self.layer = layer
        self.x = keras.Variable(x, dtype=x.dtype, name="x")
        self.loss_weights = keras.ops.convert_to_tensor(weights)
        self.bn_training = training
        self.built = True  # its variables exist (building by a symbolic call fails on PyTorch's meta device)

    def call(self, unused, training=None):
        y = self.layer(keras.ops.convert_to_tensor(self.x), training=self.bn_training)
        return keras.ops.sum(y * self.loss_weights)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return y_pred


def _bn_step(layer, x, training):
    """Output, gradients (input, gamma, beta) of a weighted sum of the output, and the moving statistics after.

    Backend-independent: one plain SGD step with learning rate 1 through Keras' train step moves the input (held in
    a variable), gamma and beta by minus their gradients; those are put back afterwards, so only the moving
    statistics carry over to the next step, as in a forward pass."""
    weights = np.random.default_rng(12).normal(size=x.shape).astype(x.dtype)
    moving = [keras.ops.convert_to_numpy(v) for v in (layer.moving_mean, layer.moving_variance)]
    y = keras.ops.convert_to_numpy(layer(x, training=training))
    for v, value in zip((layer.moving_mean, layer.moving_variance), moving):  # the train step below updates them
        v.assign(value)
    probe = _BatchNormProbe(layer, x, weights, training)
    variables = [probe.x, layer.gamma, layer.beta]
    before = [keras.ops.convert_to_numpy(v) for v in variables]
    # Eagerly: in a TensorFlow graph (no XLA), Keras' optimizer update may run before forward reads of a variable
    # that its own gradient does not depend on (beta here), which then see the updated value (Keras 3.15, TF 2.21).
    probe.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), run_eagerly=True)
    probe.train_on_batch(np.zeros((1, 1), x.dtype))
    grads = [b - keras.ops.convert_to_numpy(v) for b, v in zip(before, variables)]
    for v, value in zip(variables, before):
        v.assign(value)
    return [np.asarray(v) for v in [y, *grads, layer.moving_mean, layer.moving_variance]]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_batch_norm_equals_keras_batch_norm(training, dtype):
    # float32 takes TensorFlow's fused kernel, float64 Keras' own code (both must agree with keras.layers'.)
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(2, 5, 7, 6))).astype(dtype)
    fused = BatchNormalization(epsilon=1.001e-5, momentum=0.9, dtype=dtype)
    reference = keras.layers.BatchNormalization(epsilon=1.001e-5, momentum=0.9, dtype=dtype)
    fused.build(x.shape), reference.build(x.shape)
    state = [rng.normal(size=6), rng.normal(size=6), rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)]
    for layer in (fused, reference):
        layer.set_weights([s.astype(dtype) for s in state])
    for _ in range(2):  # the second step starts from updated moving statistics
        got, expected = _bn_step(fused, x, training), _bn_step(reference, x, training)
        for name, a, b in zip(("output", "d/dx", "d/dgamma", "d/dbeta", "moving mean", "moving variance"), got,
                              expected):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)
    if training:  # the statistics moved towards the batch's (mean 3, variance 4)
        assert np.all(np.abs(got[4] - 3.0) < np.abs(state[2] - 3.0) + 1e-6)


@pytest.mark.tf_only  # inspects the tf.function graph for TensorFlow's fused kernel
def test_model_batch_norm_runs_tensorflows_fused_kernel_in_float32_only():
    import tensorflow as tf

    def fused_ops(layer, shape, dtype, training):
        fn = tf.function(lambda images: layer(images, training=training))
        graph = fn.get_concrete_function(tf.zeros(shape, dtype)).graph
        return sum(op.type == "FusedBatchNormV3" for op in graph.get_operations())

    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_slim", tasks=("depth",), input_shape=(32, 32, 3),
                                  **tiny_kendall_kwargs())
    num_bn = sum(isinstance(layer, BatchNormalization) for layer in model.layers)
    assert num_bn > 20
    for training in (True, False):  # every batch norm of the model, training and inference
        assert fused_ops(model, (1, 32, 32, 3), "float32", training) == num_bn
        assert fused_ops(BatchNormalization(dtype="float64"), (1, 4, 4, 3), "float64", training) == 0



@pytest.mark.tf_only  # Keras accepts synchronized=True only on the TensorFlow backend
def test_fused_batch_norm_falls_back_to_keras_for_synchronized_batch_norm():
    x = random_images(2, 4, 4)
    layer = BatchNormalization(synchronized=True)
    layer.build(x.shape)
    assert not layer._fused_available(x, None)


def test_fused_batch_norm_falls_back_to_keras_for_masked_inputs_and_other_backends():
    x = random_images(2, 4, 4)
    assert not BatchNormalization()._fused_available(x, mask=np.ones((2, 4, 4), bool))
    assert BatchNormalization()._fused_available(x, None) == (keras.config.backend() == "tensorflow")
    assert BatchNormalization()._fused_available(keras.ops.convert_to_tensor(x), None) == (
        keras.config.backend() == "tensorflow")


def test_model_accepts_other_image_sizes_when_built_without_a_fixed_size():
    model = KendallMultiTaskModel(tasks=("semantic", "depth"), num_classes=3, input_shape=(None, None, 3),
                                  **tiny_kendall_kwargs())
    for h, w in ((32, 64), (48, 40)):
        out = model(random_images(1, h, w), training=False)
        assert tuple(out["semantic"].shape) == (1, h, w, 3)
