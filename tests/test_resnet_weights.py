"""ImageNet weights (mtl_keras.models.resnet): keras.applications.ResNet50/101 load into the dilated ResNet."""

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras.layers import image_normalization
from mtl_keras.models import resnet
from mtl_keras.models.resnet import dilated_resnet


def application_weights_file(depth, path, seed=0):
    """keras.applications.ResNet{depth} with random weights (and random batch-norm statistics), saved."""
    app = resnet.resnet_application(depth, weights=None)
    rng = np.random.default_rng(seed)
    for layer in app.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    app.save_weights(path)
    return app


def encoder(depth, output_stride, normalize=False, name_prefix=""):
    images = keras.Input((None, None, 3))
    x = image_normalization()(images) if normalize else images
    return keras.Model(images, dilated_resnet(x, depth=depth, output_stride=output_stride, name_prefix=name_prefix))


@pytest.mark.slow
def test_resnet101_weights_give_the_same_features_at_stride_32_and_load_at_stride_8(tmp_path):
    path = str(tmp_path / "resnet101.weights.h5")
    app = application_weights_file(101, path)
    x = np.random.default_rng(1).normal(0, 1, (2, 64, 96, 3)).astype("float32")
    expected = np.asarray(app(x, training=False))

    ours = encoder(101, 32, name_prefix="backbone_")
    loaded = resnet.load_resnet_weights(ours, path, name_prefix="backbone_", fold_preprocessing=False)
    assert len(loaded) == sum(1 for layer in app.layers if layer.weights)
    np.testing.assert_allclose(np.asarray(ours(x, training=False)), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())

    # The paper's model at output stride 8: the same weights load and the model runs.
    model = mtl_keras.build_model("kendall_deeplabv3_resnet101", input_shape=(32, 32, 3))
    resnet.load_resnet_weights(model, app)
    for name in ("conv2_block1_0_conv", "conv4_block23_2_conv", "conv5_block3_3_bn"):
        for ours_w, theirs_w in zip(model.get_layer(name).get_weights(), app.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours_w, theirs_w)
    assert tuple(model.get_layer("conv5_block3_2_conv").dilation_rate) == (4, 4)
    out = model(np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32"), training=False)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_resnet50_weights_through_load_model_see_raw_images_as_the_application_sees_its_inputs(tmp_path):
    """load_model(..., backbone_weights=file) folds the caffe preprocessing into conv1: raw RGB images give the
    application's features on preprocess_input(images)."""
    path = str(tmp_path / "resnet50.weights.h5")
    app = application_weights_file(50, path)
    images = np.random.default_rng(3).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    expected = np.asarray(app(keras.applications.resnet.preprocess_input(images.copy()), training=False))

    model = mtl_keras.load_model("kendall_deeplabv3_resnet50", backbone_weights=path, input_shape=(64, 96, 3),
                                 output_stride=32, aspp_channels=8, decoder_channels=8)
    features = keras.Model(model.input, model.get_layer("conv5_block3_out").output)
    got = np.asarray(features(images, training=False))
    # Equal but for conv1's zero padding (the two conventions pad with colours < 0.5 grey levels apart).
    assert np.abs(got - expected).max() < 5e-3 * np.abs(expected).max()
    assert np.abs(got - expected).mean() < 2e-3 * np.abs(expected).mean()

    narrow = mtl_keras.build_model("kendall_deeplabv3_resnet50", input_shape=(32, 32, 3), backbone_width=8,
                                   aspp_channels=8, decoder_channels=8)
    with pytest.raises(ValueError, match="backbone_width=64"):
        resnet.load_resnet_weights(narrow, app)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        resnet.load_resnet_weights(narrow, path, sha256="0" * 64)


def test_depth_without_an_application_is_a_clear_error():
    slim = mtl_keras.build_model("kendall_deeplabv3_resnet26_slim", input_shape=(32, 32, 3), backbone_width=8,
                                 aspp_channels=8, decoder_channels=8)
    with pytest.raises(ValueError, match="depth"):
        resnet.load_resnet_weights(slim, "imagenet")


def test_imagenet_without_network_or_cache_says_where_to_put_the_file(monkeypatch):
    from keras.src.applications import resnet as keras_resnet

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras_resnet.file_utils, "get_file", no_network)
    with pytest.raises(RuntimeError, match=r"resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5.*\.keras/models"):
        resnet.resnet_application(50, weights="imagenet")


def test_caffe_folding_is_exact_on_a_single_pixel():
    """conv1 on (rgb - mean) / std with folded weights == conv1 on caffe inputs (no padding involved)."""
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(size=(7, 7, 3, 4)), rng.normal(size=4)
    patch = rng.uniform(0, 255, (7, 7, 3))  # RGB
    caffe = patch[..., ::-1] - np.asarray(resnet.CAFFE_MEAN_BGR)
    standard = (patch - np.asarray(mtl_keras.layers.IMAGENET_MEAN_RGB)) / np.asarray(mtl_keras.layers.IMAGENET_STD_RGB)
    new_kernel, new_bias = resnet.fold_caffe_preprocessing(kernel, bias)
    np.testing.assert_allclose(np.einsum("hwc,hwco->o", standard, new_kernel) + new_bias,
                               np.einsum("hwc,hwco->o", caffe, kernel) + bias, rtol=1e-4, atol=1e-3)
