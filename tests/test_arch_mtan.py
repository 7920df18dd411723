"""MTAN (Liu et al., CVPR 2019) as LibMTL's ``_transform_resnet_MTAN``: structure, parameter counts (by hand at tiny
size; LibMTL's own count at its NYUv2 configuration), the gradient partition, round trips and a training step."""

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras.gradient_training import SharedPartition
from mtl_keras.models import DenseUNetEncoder
from mtl_keras.models.mtan import MTAN
from mtl_keras.models.sharing import HardParameterSharing
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer
from tests.helpers import assert_keras_save_load, assert_model_config_round_trip, random_images

TASKS = ("semantic", "depth")
TINY = dict(tasks=TASKS, num_classes=3, input_shape=(32, 64, 3), backbone_depth=26, backbone_width=4,
            head_channels=8)


def trainable(model_or_layers):
    variables = model_or_layers.trainable_variables if hasattr(model_or_layers, "trainable_variables") else \
        [v for layer in model_or_layers for v in layer.trainable_variables]
    return sum(int(np.prod(v.shape)) for v in variables)


# Written out from LibMTL's modules (torch parameter counts; BN: weight + bias).
def attention_params(cin, mid, cout):  # conv1x1 (bias) + BN + conv1x1 (bias) + BN
    return cin * mid + mid + 2 * mid + mid * cout + cout + 2 * cout


def bottleneck_params(cin, planes):  # torchvision Bottleneck(cin, planes) with downsample conv1x1 + BN
    return (cin * 4 * planes + 2 * 4 * planes) + (cin * planes + 2 * planes) + (9 * planes * planes + 2 * planes) + \
        (planes * 4 * planes + 2 * 4 * planes)


def mtan_extra_params(channels, num_tasks):
    """LibMTL's encoder_att (per task) and encoder_block_att (one per stage but the last) on stages of ``channels``."""
    att = attention_params(channels[0], channels[0] // 4, channels[0]) + sum(
        attention_params(2 * c, c // 4, c) for c in channels[1:])
    blocks = sum(bottleneck_params(channels[i], channels[i + 1] // 4) for i in range(len(channels) - 1))
    return num_tasks * att + blocks


@pytest.fixture(scope="module")
def tiny_mtan():
    return MTAN(**TINY)


def test_shapes_and_the_hand_counted_parameters(tiny_mtan):
    images = random_images(2, 32, 64)
    out = tiny_mtan(images, training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (2, 32, 64, 3), "depth": (2, 32, 64, 1)}
    # Width 4: layer1..layer4 give 16, 32, 64, 128 channels. Same backbone and heads as HPS, plus MTAN's modules.
    hps = HardParameterSharing(**TINY)
    # Per task: attention modules 188 + 888 + 3312 + 12768 = 17156; shared blocks 1632 + 6208 + 24192 = 32032.
    assert mtan_extra_params([16, 32, 64, 128], 2) == 2 * 17156 + 32032
    assert trainable(tiny_mtan) == trainable(hps) + 2 * 17156 + 32032
    names = {layer.name for layer in tiny_mtan.layers}
    # Output stride 8: only layer2 is coarser than the attention before it (LibMTL's pool after stage 0).
    assert {n for n in names if n.endswith("_pool") and "encoder_att" in n} == {
        "semantic_encoder_att1_pool", "depth_encoder_att1_pool"}
    assert {n for n in names if n.startswith("encoder_block_att")} == {f"encoder_block_att{i}" for i in range(3)}
    # One attention module per task and stage: 2 x 4 sigmoid gates.
    assert len([n for n in names if n.endswith("_sigmoid") and "encoder_att" in n]) == 2 * 4


def test_output_stride_16_pools_before_layer3_too():
    model = MTAN(**{**TINY, "output_stride": 16})
    pools = sorted(layer.name for layer in model.layers if layer.name.startswith("depth_encoder_att") and
                   layer.name.endswith("_pool"))
    assert pools == ["depth_encoder_att1_pool", "depth_encoder_att2_pool"]
    out = model(random_images(1, 32, 64), training=False)
    assert tuple(out["depth"].shape) == (1, 32, 64, 1)


def test_masks_of_one_give_the_shared_features(tiny_mtan):
    """With every attention mask at 1 (the last conv's kernel 0 and bias 30; BN at its initial statistics), each
    task's features are the last stage's output: the outputs are those of HPS with the same weights."""
    model = MTAN(**TINY)
    model.set_weights(tiny_mtan.get_weights())
    for layer in model.layers:
        if layer.name.endswith("_conv2") and "encoder_att" in layer.name:
            kernel, bias = layer.get_weights()
            layer.set_weights([np.zeros_like(kernel), np.full_like(bias, 30.0)])
    hps = HardParameterSharing(**TINY)
    for layer in hps.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    images = random_images(2, 32, 64, seed=3)
    ours, theirs = model(images, training=False), hps(images, training=False)
    for task in TASKS:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours[task]), keras.ops.convert_to_numpy(theirs[task]),
                                   atol=1e-4, rtol=1e-4, err_msg=task)
    # ... and the attention changes them otherwise.
    default = tiny_mtan(images, training=False)
    assert not np.allclose(keras.ops.convert_to_numpy(default["depth"]), keras.ops.convert_to_numpy(theirs["depth"]),
                           atol=1e-4)


def test_gradient_partition(tiny_mtan):
    partition = SharedPartition(tiny_mtan, TASKS)
    shared, own = {id(v) for v in partition.shared}, {t: {id(v) for v in vs} for t, vs in partition.own.items()}
    assert {id(v) for v in tiny_mtan.backbone.trainable_variables} <= shared
    for task in TASKS:
        other = [t for t in TASKS if t != task][0]
        att = [layer for layer in tiny_mtan.layers if layer.name.startswith(f"{task}_encoder_att")]
        assert att and {id(v) for layer in att for v in layer.trainable_variables} <= own[task]
        assert not {id(v) for layer in att for v in layer.trainable_variables} & (own[other] | shared)
    # encoder_block_att: one set of layers called by every task (LibMTL's ModuleList indexed by stage): shared here.
    blocks = [tiny_mtan.get_layer(f"encoder_block_att{i}") for i in range(3)]
    assert {id(v) for block in blocks for v in block.trainable_variables} <= shared
    assert partition.num_shared == trainable(tiny_mtan.backbone) + 32032


def test_round_trips(tiny_mtan, tmp_path):
    images = random_images(2, 32, 64, seed=1)
    assert_model_config_round_trip(tiny_mtan, images)
    assert_keras_save_load(tiny_mtan, images, str(tmp_path))


def test_on_a_backbone_without_named_blocks():
    """Other backbones: the pyramid levels are the stages, each level's output both penultimate and final features
    (DenseUNetEncoder: P1..P5 at strides 1, 2, 4, 8, 16 and 4, 8, 16, 32, 32 channels)."""
    backbone = DenseUNetEncoder(base_filters=4, input_shape=(32, 64, 3))
    model = MTAN(tasks=TASKS, num_classes=3, backbone=backbone, head_channels=8)
    out = model(random_images(1, 32, 64), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (1, 32, 64, 3), "depth": (1, 32, 64, 1)}
    hps = HardParameterSharing(tasks=TASKS, num_classes=3, backbone=DenseUNetEncoder(base_filters=4,
                                                                                     input_shape=(32, 64, 3)),
                               head_channels=8)
    assert trainable(model) == trainable(hps) + mtan_extra_params([4, 8, 16, 32, 32], 2)
    pools = sorted(layer.name for layer in model.layers if layer.name.startswith("semantic_encoder_att") and
                   layer.name.endswith("_pool"))
    assert pools == [f"semantic_encoder_att{i}_pool" for i in (1, 2, 3, 4)]


@pytest.mark.slow
def test_libmtl_parameter_count_at_its_nyuv2_configuration():
    """LibMTL's MTAN on resnet_dilated('resnet50') with three DeepLabHead(2048, ·) decoders (examples/nyu: 13
    classes, depth, normals): 92,347,921 trainable parameters (counted with LibMTL's own torch modules)."""
    model = mtl_keras.build_model("mtan", tasks=("semantic", "depth", "normals"), num_classes=13,
                                  input_shape=(288, 384, 3))
    assert trainable(model) == 92_347_921
    assert trainable(model.backbone) == 23_508_032  # torchvision's ResNet-50 without fc


@pytest.mark.slow
def test_a_training_step_moves_the_attention_and_the_shared_blocks():
    model = MTAN(**TINY)
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=keras.backend.backend() == "tensorflow")
    images = random_images(2, 32, 64)
    targets = {"semantic": np.random.default_rng(1).integers(0, 3, (2, 32, 64)).astype("int32"),
               "depth": np.random.default_rng(2).uniform(1, 5, (2, 32, 64, 1)).astype("float32")}
    watched = [model.get_layer("depth_encoder_att2_conv1").kernel,
               model.get_layer("encoder_block_att1").get_layer("encoder_block_att1_2_conv").kernel]
    before = [keras.ops.convert_to_numpy(v) for v in watched]
    history = trainer.fit(images, targets, batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    for old, variable in zip(before, watched):
        assert not np.allclose(keras.ops.convert_to_numpy(variable), old), variable.path
