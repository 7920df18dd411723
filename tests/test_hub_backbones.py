"""keras-hub FeaturePyramidBackbones as mtl_keras backbones (mtl_keras.models.hub): pyramid, strides, stages, config
and .keras round trips, copies, task models on them, local presets, and the errors."""

import sys

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import mtl_keras  # noqa: E402
from mtl_keras.gradient_training import SharedPartition  # noqa: E402
from mtl_keras.models.backbones import copy_backbone  # noqa: E402
from mtl_keras.models.hub import KerasHubBackbone  # noqa: E402
from tests.helpers import (assert_keras_save_load, assert_model_config_round_trip, assert_outputs_close,  # noqa
                           random_images, run_backbone_test)

IMAGENET_MEAN = [123.675, 116.28, 103.53]  # torchvision's ImageNet statistics in 0..255 units
IMAGENET_STD = [58.395, 57.12, 57.375]


def tiny_resnet(**kwargs):
    # keras-hub requires 64 filters in the first stack (and, for basic blocks, as many in the stem).
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, **kwargs)


def tiny_mit(image_shape=(64, 64, 3)):
    # SegFormer's encoder. keras-hub's MiT takes square images only (its attention reshapes the sequence of N tokens to
    # sqrt(N) x sqrt(N)) of the size it was built for; 64x64 keeps every sequence reduction above one token.
    return keras_hub.models.MiTBackbone(
        layerwise_depths=[1, 1, 1, 1], num_layers=4, hidden_dims=[4, 8, 8, 8], layerwise_num_heads=[1, 1, 1, 1],
        layerwise_sr_ratios=[8, 4, 2, 1], max_drop_path_rate=0.1, layerwise_patch_sizes=[7, 3, 3, 3],
        layerwise_strides=[4, 2, 2, 2], image_shape=image_shape)


def tiny_efficientnet():
    return keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3, 3], stackwise_num_repeats=[1, 1, 1, 1],
        stackwise_input_filters=[8, 8, 8, 8], stackwise_output_filters=[8, 8, 8, 8],
        stackwise_expansion_ratios=[1, 2, 2, 2], stackwise_squeeze_and_excite_ratios=[0, 0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 2], stackwise_block_types=["fused", "fused", "unfused", "unfused"],
        stackwise_force_input_filters=[0] * 4, stackwise_nores_option=[False] * 4, width_coefficient=1.0,
        depth_coefficient=1.0, num_features=16)


def tiny_densenet():
    return keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[1, 1, 1, 1], growth_rate=2)


def tiny_cspnet():
    return keras_hub.models.CSPNetBackbone(
        stem_filters=4, stem_kernel_size=3, stem_strides=1, stackwise_strides=2, stackwise_depth=[1, 1, 1],
        stackwise_num_filters=[4, 8, 8], down_growth=True, bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5),
        expand_ratio=(2.0, 1.0), block_type="dark_block", stage_type="csp", stem_padding="same")


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_resnet_pyramid_strides_and_round_trips(tmp_path):
    backbone = KerasHubBackbone(tiny_resnet(), input_shape=(32, 64, 3))
    # conv1 and the max-pool: stride 4 at P2 (64 channels), then one stride-2 stack of 8 channels per level.
    expected = {"P2": (8, 16, 64), "P3": (4, 8, 8), "P4": (2, 4, 8), "P5": (1, 2, 8)}
    run_backbone_test(backbone, random_images(1, 32, 64), expected, folder=str(tmp_path))
    assert backbone.pyramid_strides == {"P2": 4, "P3": 8, "P4": 16, "P5": 32}
    assert backbone.strides_from == "static shapes"
    assert backbone.pyramid_channels == {"P2": 64, "P3": 8, "P4": 8, "P5": 8}
    config = backbone.get_config()
    assert config["hub_backbone"]["class_name"] == "ResNetBackbone"
    assert config["normalization"] == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def test_mit_pyramid_is_named_from_p1_but_strides_come_from_the_shapes(tmp_path):
    backbone = KerasHubBackbone(tiny_mit())
    assert backbone.image_shape == (64, 64, 3)  # the keras-hub model's static size
    # Overlapping patch embeddings of stride 4, 2, 2, 2: levels P1..P4 at strides 4..32 (not 2**k).
    expected = {"P1": (16, 16, 4), "P2": (8, 8, 8), "P3": (4, 4, 8), "P4": (2, 2, 8)}
    run_backbone_test(backbone, random_images(1, 64, 64), expected, folder=str(tmp_path))
    assert backbone.pyramid_strides == {"P1": 4, "P2": 8, "P3": 16, "P4": 32}


def test_a_hub_model_built_for_another_size_is_rebuilt_with_its_weights():
    hub = tiny_mit((64, 64, 3))
    backbone = KerasHubBackbone(hub, input_shape=(128, 128, 3))
    assert backbone.hub_backbone is not hub and tuple(backbone.hub_backbone.input.shape[1:]) == (128, 128, 3)
    assert len(backbone.hub_backbone.weights) == len(hub.weights)
    for ours, theirs in zip(backbone.hub_backbone.weights, hub.weights):
        np.testing.assert_array_equal(numpy(ours), numpy(theirs))
    assert {k: tuple(v.shape[1:]) for k, v in backbone(random_images(1, 128, 128), training=False).items()} == \
        {"P1": (32, 32, 4), "P2": (16, 16, 8), "P3": (8, 8, 8), "P4": (4, 4, 8)}


def test_strides_without_a_static_input_size_come_from_a_probe():
    backbone = KerasHubBackbone(tiny_resnet())
    assert backbone.image_shape == (None, None, 3)
    assert backbone.strides_from == "probe"
    assert backbone.pyramid_strides == {"P2": 4, "P3": 8, "P4": 16, "P5": 32}
    out = backbone(random_images(1, 64, 96), training=False)
    assert {k: tuple(v.shape[1:3]) for k, v in out.items()} == {"P2": (16, 24), "P3": (8, 12), "P4": (4, 6),
                                                                "P5": (2, 3)}


FAMILIES = {  # (build, input shape, the pyramid levels)
    "resnet": (tiny_resnet, (32, 64, 3), ["P2", "P3", "P4", "P5"]),
    "mit": (tiny_mit, (64, 64, 3), ["P1", "P2", "P3", "P4"]),
    "efficientnet": (tiny_efficientnet, (32, 64, 3), ["P1", "P2", "P3", "P4"]),
    "densenet": (tiny_densenet, (32, 64, 3), ["P2", "P3", "P4", "P5"]),
    "cspnet": (tiny_cspnet, (32, 64, 3), ["P2", "P3", "P4"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stem_and_stages_reproduce_the_pyramid(family):
    build, shape, levels = FAMILIES[family]
    backbone = KerasHubBackbone(build(), input_shape=shape)
    num_weights = len(backbone.weights)
    images = random_images(1, shape[0], shape[1])
    pyramid = backbone(images, training=False)
    assert backbone.stage_names == list(pyramid) == levels
    # The stem is the normalisation only: (x - mean) / std with ImageNet's statistics, no weights.
    x = backbone.stem(images, training=False)
    np.testing.assert_allclose(numpy(x), (images - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-5,
                               atol=1e-5)
    assert not backbone.stem.weights
    for level, stage in zip(backbone.stage_names, backbone.stages):
        x = stage(x, training=False)
        np.testing.assert_array_equal(numpy(x), numpy(pyramid[level]), err_msg=level)
        assert tuple(x.shape[1:]) == (shape[0] // backbone.pyramid_strides[level],
                                      shape[1] // backbone.pyramid_strides[level], backbone.pyramid_channels[level])
    # The stages are views on the keras-hub model's layers: every weight in exactly one stage, none added.
    stage_weights = [id(w) for stage in backbone.stages for w in stage.weights]
    assert sorted(stage_weights) == sorted(id(w) for w in backbone.weights)
    assert len(backbone.weights) == num_weights
    hub_weights = {id(w) for w in backbone.hub_backbone.weights}
    assert set(stage_weights) <= hub_weights  # the keras-hub model's own variables, not copies


def test_copies_run_stage_by_stage_in_one_graph():
    """As a stage-wise scheme (cross-stitch, MTAN) uses them: per-task copies, their stages nested in one model."""
    first = KerasHubBackbone(tiny_resnet(), input_shape=(32, 64, 3), name="semantic_encoder")
    encoders = [first, copy_backbone(first, "depth_encoder")]
    image = keras.Input((32, 64, 3))
    features = [encoder.stem(image) for encoder in encoders]
    for i in range(len(first.stages)):
        features = [encoder.stages[i](x) for encoder, x in zip(encoders, features)]
        features = [keras.layers.Average()(features)] * 2  # a unit that mixes the tasks
    model = keras.Model(image, {"semantic": features[0], "depth": features[1]})
    assert len(model.trainable_weights) == 2 * len(first.trainable_weights)
    out = model(random_images(2, 32, 64), training=False)
    assert tuple(out["depth"].shape) == (2, 1, 2, 8)


def test_a_pyramid_not_computed_level_by_level_refuses_stages():
    # RetinaNet's FPN computes P4 from the encoder's C4 and C5, not from P3: usable whole, not split into stages.
    hub = keras_hub.models.RetinaNetBackbone(image_encoder=tiny_resnet(), min_level=3, max_level=5, use_p5=False)
    backbone = KerasHubBackbone(hub, input_shape=(32, 64, 3), name="retina")
    out = backbone(random_images(1, 32, 64), training=False)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {"P3": (4, 8, 256), "P4": (2, 4, 256),
                                                               "P5": (1, 2, 256)}
    with pytest.raises(ValueError, match=r"retina_net_backbone .*stage-wise schemes need a sequential pyramid"):
        backbone.stages


def test_copy_backbone_gives_an_independent_copy():
    backbone = KerasHubBackbone(tiny_resnet(), input_shape=(32, 64, 3))
    images = random_images(1, 32, 64)
    copy = copy_backbone(backbone, "task2_encoder")
    assert copy.name == "task2_encoder" and isinstance(copy, KerasHubBackbone)
    assert copy.get_config() == {**backbone.get_config(), "name": "task2_encoder"}
    assert not {id(w) for w in copy.weights} & {id(w) for w in backbone.weights}
    for a, b in zip(backbone(images, training=False).values(), copy(images, training=False).values()):
        np.testing.assert_array_equal(numpy(a), numpy(b))
    kernel = copy.hub_backbone.get_layer("conv1_conv").kernel
    before = numpy(backbone.hub_backbone.get_layer("conv1_conv").kernel)
    kernel.assign(numpy(kernel) + 1.0)
    np.testing.assert_array_equal(numpy(backbone.hub_backbone.get_layer("conv1_conv").kernel), before)
    fresh = copy_backbone(backbone, "task3_encoder", copy_weights=False)
    assert not np.array_equal(numpy(fresh.hub_backbone.get_layer("conv1_conv").kernel), before)


def test_hps_on_a_keras_hub_backbone(tmp_path):
    model = mtl_keras.build_model("hps", backbone=tiny_resnet(), input_shape=(32, 64, 3), head_channels=8)
    assert isinstance(model.backbone, KerasHubBackbone) and model.custom_backbone
    images = random_images(2, 32, 64)
    out = model(images, training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (2, 32, 64, 19), "instance": (2, 32, 64, 2),
                                                           "depth": (2, 32, 64, 1)}
    assert model.get_config()["backbone"]["class_name"] == "KerasHubBackbone"
    assert_model_config_round_trip(model, images)  # rebuilt from the config: no download, no keras-hub instance
    assert_keras_save_load(model, images, str(tmp_path))
    model.save_to_preset(str(tmp_path / "preset"))  # the zoo's own preset format
    assert_outputs_close(model(images, training=False),
                         mtl_keras.from_preset(str(tmp_path / "preset"))(images, training=False))


def test_the_gradient_partition_shares_every_hub_variable():
    model = mtl_keras.build_model("hps", backbone=tiny_resnet(), input_shape=(32, 64, 3), head_channels=8,
                                  tasks=("semantic", "depth"), num_classes=3)
    partition = SharedPartition(model, model.tasks)
    hub = {id(v) for v in model.backbone.hub_backbone.trainable_variables}
    assert hub and {id(v) for v in partition.shared} == hub
    for task in model.tasks:
        own = partition.own[task]
        assert own and not {id(v) for v in own} & hub
        assert all(v.path.startswith(f"{task}_head") for v in own), [v.path for v in own]


def test_a_local_preset_folder_loads_with_its_weights_and_image_converter(tmp_path):
    hub = tiny_resnet()
    folder = str(tmp_path / "tiny_resnet")
    hub.save_to_preset(folder)
    plain = KerasHubBackbone.from_hub_preset(folder, input_shape=(32, 64, 3))
    assert plain.normalization == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}  # no image converter: ImageNet's
    # keras-hub's converter computes x * scale + offset: mean = -offset / scale, std = 1 / scale.
    keras_hub.layers.ResNetImageConverter(scale=[0.02, 0.01, 0.04], offset=[-1.0, -2.0, -3.0]).save_to_preset(folder)
    model = mtl_keras.build_model("hps", backbone="keras_hub:" + folder, input_shape=(32, 64, 3), head_channels=8)
    backbone = model.backbone
    assert isinstance(backbone, KerasHubBackbone)
    assert backbone.normalization["mean"] == pytest.approx([50.0, 200.0, 75.0])
    assert backbone.normalization["std"] == pytest.approx([50.0, 100.0, 25.0])
    images = random_images(1, 32, 64)
    np.testing.assert_allclose(numpy(backbone.stem(images)), images * [0.02, 0.01, 0.04] + [-1.0, -2.0, -3.0],
                               rtol=1e-5, atol=1e-5)
    assert len(backbone.hub_backbone.weights) == len(hub.weights)
    for loaded, saved in zip(backbone.hub_backbone.weights, hub.weights):
        np.testing.assert_array_equal(numpy(loaded), numpy(saved), err_msg=saved.path)


def test_without_keras_hub_one_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hub\]"'):
        mtl_keras.build_model("hps", backbone="keras_hub:resnet_18_imagenet", input_shape=(32, 64, 3),
                              head_channels=8)


def test_bad_specs_raise_one_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="keras-hub cannot load preset"):
        mtl_keras.build_model("hps", backbone="keras_hub:" + str(tmp_path / "missing"), input_shape=(32, 64, 3))
    with pytest.raises(ValueError, match="'keras_hub:PRESET'"):
        mtl_keras.build_model("hps", backbone="resnet50", input_shape=(32, 64, 3))
    vgg = keras_hub.models.VGGBackbone(stackwise_num_repeats=[1], stackwise_num_filters=[4], image_shape=(32, 64, 3))
    with pytest.raises(ValueError, match="FeaturePyramidBackbone"):
        mtl_keras.build_model("hps", backbone=vgg, input_shape=(32, 64, 3))
    folder = str(tmp_path / "vgg")
    vgg.save_to_preset(folder)
    with pytest.raises(ValueError, match="no feature pyramid"):
        mtl_keras.build_model("hps", backbone="keras_hub:" + folder, input_shape=(32, 64, 3))
