"""Cross-stitch networks and NDDR-CNN (mtl_keras/models/cross_stitch.py): one backbone copy per task, units between
the stages. Parameter counts are written from the architectures' definitions (a torchvision-layout ResNet, LibMTL's
DeepLab head, the units), not read off the code under test."""

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras import presets
from mtl_keras.gradient_training import SharedPartition
from mtl_keras.models.cross_stitch import CrossStitchNetwork, CrossStitchUnits, NDDRCNN, nddr_unit
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer
from tests.helpers import assert_keras_save_load, assert_model_config_round_trip, random_images

TASKS = ("semantic", "instance", "depth")
OUT_CHANNELS = {"semantic": 19, "instance": 2, "depth": 1}
TINY = dict(input_shape=(32, 64, 3), backbone_depth=26, backbone_width=4, head_channels=8)
COPIES = ["dilated_resnet26", "dilated_resnet26_instance", "dilated_resnet26_depth"]  # the first task's is the backbone


# --------------------------------------------------------------------------------- counts from the definitions
def resnet_trainable(width, blocks=(2, 2, 2, 2)):
    """Trainable parameters of a torchvision-layout bottleneck ResNet (convs without bias; BN gamma and beta):
    7x7 stem, then per block 1x1 (in -> p), 3x3 (p -> p), 1x1 (p -> 4p), the first block of a stage with a 1x1
    projection shortcut (in -> 4p)."""
    total, cin = 7 * 7 * 3 * width + 2 * width, width
    for stage, num_blocks in enumerate(blocks):
        p = width * 2 ** stage
        for b in range(num_blocks):
            total += cin * p + 2 * p + 9 * p * p + 2 * p + p * 4 * p + 2 * 4 * p
            if b == 0:
                total += cin * 4 * p + 2 * 4 * p
            cin = 4 * p
    return total


def deeplab_trainable(cin, c, k, num_rates=3):
    """LibMTL's DeepLabHead: ASPP (1x1, one 3x3 per rate, pooling 1x1; conv + BN each), projection 5c -> c + BN,
    3x3 conv + BN, biased 1x1 to k channels."""
    return (cin * c + 2 * c) * 2 + num_rates * (9 * cin * c + 2 * c) + (5 * c * c + 2 * c) + (9 * c * c + 2 * c) \
        + c * k + k


ENCODER = resnet_trainable(4)  # 56,836 for ResNet-26 at width 4
HEADS = sum(deeplab_trainable(128, 8, k) for k in OUT_CHANNELS.values())  # P5 has 32 * 4 = 128 channels: 92,310
LEVEL_CHANNELS = {"stem": 4, "P2": 16, "P3": 32, "P4": 64, "P5": 128}


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


@pytest.fixture(scope="module")
def cross_stitch_model():
    return CrossStitchNetwork(**TINY)


@pytest.fixture(scope="module")
def nddr_model():
    return NDDRCNN(**TINY)


# ----------------------------------------------------------------------------------------------------- cross-stitch
def test_counts_agree_with_the_hand_formulas():
    assert ENCODER == 56_836 and HEADS == 92_310
    hps = mtl_keras.build_model("hps", **TINY)  # another code path: one encoder, the same heads
    assert trainable_count(hps) == ENCODER + HEADS


def test_cross_stitch_shapes_and_parameters(cross_stitch_model):
    model = cross_stitch_model
    out = model(random_images(2, 32, 64), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (2, 32, 64, c) for t, c in OUT_CHANNELS.items()}
    # Three encoders, LibMTL's (4, T, T) cross_unit (one unit unused), three heads.
    assert trainable_count(model) == 3 * ENCODER + 4 * 3 * 3 + HEADS == 262_854
    assert tuple(model.get_layer("cross_stitch").alpha.shape) == (4, 3, 3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("cross_stitch").alpha), 1.0)  # LibMTL
    # The copies have their own weights (not started from the first: no pretrained encoder).
    kernels = [keras.ops.convert_to_numpy(model.get_layer(f"{name}_P5").weights[0]) for name in COPIES]
    assert kernels[0].shape == kernels[1].shape and not np.array_equal(kernels[0], kernels[1])


def test_cross_stitch_units_sit_after_layer1_to_layer3(cross_stitch_model):
    unit = cross_stitch_model.get_layer("cross_stitch")
    nodes = unit._inbound_nodes
    assert [node.arguments.kwargs["index"] for node in nodes] == [0, 1, 2]
    assert [[int(t.shape[-1]) for t in node.input_tensors] for node in nodes] == [[16] * 3, [32] * 3, [64] * 3]
    assert [node.input_tensors[0]._keras_history.operation.name for node in nodes] == \
        ["dilated_resnet26_P2", "dilated_resnet26_P3", "dilated_resnet26_P4"]


def test_a_cross_stitch_unit_mixes_the_tasks_with_its_row():
    unit = CrossStitchUnits(num_tasks=2, num_units=4)
    x0 = np.array([[[[1.0, 2.0]]]], "float32")
    x1 = np.array([[[[10.0, 20.0]]]], "float32")
    start = unit([x0, x1], index=1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(start[0]), [[[[11.0, 22.0]]]])  # all ones: the sum
    alpha = np.ones((4, 2, 2), "float32")
    alpha[1] = [[0.9, 0.1], [0.3, 0.7]]
    unit.set_weights([alpha])
    out = [keras.ops.convert_to_numpy(y) for y in unit([x0, x1], index=1)]
    np.testing.assert_allclose(out[0], [[[[1.9, 3.8]]]], rtol=1e-6)
    np.testing.assert_allclose(out[1], [[[[7.3, 14.6]]]], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unit([x0, x1], index=0)[1]), [[[[11.0, 22.0]]]])


def _variable_ids(layers):
    return {id(v) for layer in layers for v in layer.trainable_variables}


def test_cross_stitch_partition_shares_all_but_the_deepest_stage_of_each_copy(cross_stitch_model):
    """Stems and layer1..layer3 of every copy reach every task through the units (shared); a copy's layer4 feeds its
    own task only, so it is that task's (LibMTL's get_share_params lists the whole encoder)."""
    model = cross_stitch_model
    partition = SharedPartition(model, TASKS)
    shared_layers = [model.get_layer(f"{name}_{part}") for name in COPIES for part in ("stem_pool", "P2", "P3", "P4")]
    assert {id(v) for v in partition.shared} == _variable_ids(shared_layers + [model.get_layer("cross_stitch")])
    for task, name in zip(TASKS, COPIES):
        own = {id(v) for v in partition.own[task]}
        head = [layer for layer in model.layers if layer.name.startswith(f"{task}_head")]
        assert own == _variable_ids([model.get_layer(f"{name}_P5")] + head), task


@pytest.mark.slow
def test_cross_stitch_round_trips_and_trains_a_step(cross_stitch_model, tmp_path):
    model = cross_stitch_model
    images = random_images(2, 32, 64)
    assert_model_config_round_trip(model, images)
    assert_keras_save_load(model, images, str(tmp_path))
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=keras.backend.backend() == "tensorflow")
    rng = np.random.default_rng(1)
    targets = {"semantic": rng.integers(0, 19, (2, 32, 64)).astype("int32"),
               "instance": rng.normal(0, 3, (2, 32, 64, 2)).astype("float32"),
               "depth": rng.uniform(1, 5, (2, 32, 64, 1)).astype("float32")}
    before = keras.ops.convert_to_numpy(model.get_layer("cross_stitch").alpha)
    history = trainer.fit(images, targets, batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    after = keras.ops.convert_to_numpy(model.get_layer("cross_stitch").alpha)
    assert not np.allclose(after[:3], before[:3]) and np.array_equal(after[3], before[3])  # unit 4: never used


def test_cross_stitch_preset_and_entry_point():
    preset = presets.get_preset("cross_stitch")
    assert preset["architecture"] == "cross_stitch" and preset["parameters"] == 119_076_218
    model = presets.build_from_preset("cross_stitch", tiny=True)
    assert isinstance(model, CrossStitchNetwork) and model.name == "cross_stitch"
    assert trainable_count(model) == 262_854


# --------------------------------------------------------------------------------------------------------- NDDR-CNN
def test_nddr_shapes_and_parameters(nddr_model):
    model = nddr_model
    out = model(random_images(2, 32, 64), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (2, 32, 64, c) for t, c in OUT_CHANNELS.items()}
    # Vandenhende et al.'s stages: the stem and every stage; per unit and task a 1x1 conv (3C -> C, no bias) + BN.
    units = sum(3 * (3 * c * c + 2 * c) for c in LEVEL_CHANNELS.values())
    assert trainable_count(model) == 3 * ENCODER + units + HEADS == 460_266
    names = {layer.name for layer in model.layers}
    assert {f"nddr_{s}_{t}_conv" for s in LEVEL_CHANNELS for t in TASKS} <= names


def test_nddr_starts_as_alpha_identity_on_its_task_and_beta_on_the_others(nddr_model):
    kernel = keras.ops.convert_to_numpy(nddr_model.get_layer("nddr_P3_instance_conv").kernel)
    assert kernel.shape == (1, 1, 96, 32)
    expected = np.concatenate([0.1 * np.eye(32), 0.9 * np.eye(32), 0.1 * np.eye(32)], axis=0)[None, None]
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)


def test_an_nddr_unit_on_a_fixed_two_task_example():
    a = keras.Input((1, 2, 2))
    b = keras.Input((1, 2, 2))
    unit = keras.Model([a, b], nddr_unit([a, b], ("semantic", "depth"), "test", alpha=0.8, beta=0.05))
    xa = np.array([[[[1.0, -2.0], [3.0, 4.0]]]], "float32")
    xb = np.array([[[[10.0, 20.0], [-30.0, 40.0]]]], "float32")
    # Inference BN at the start: mean 0, variance 1, gamma 1, beta 0 -> divides by sqrt(1 + 1e-5); then ReLU.
    scale = 1 / np.sqrt(1 + 1e-5)
    expected = [np.array([[[[1.3, 0.0], [0.9, 5.2]]]]) * scale, np.array([[[[8.05, 15.9], [0.0, 32.2]]]]) * scale]
    for y, e in zip(unit([xa, xb], training=False), expected):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(y), e, rtol=1e-5, atol=1e-6)


def test_nddr_partition_shares_the_whole_encoder(nddr_model):
    """With a unit after the deepest stage every copy reaches every task; that unit's per-task branch is the task's."""
    model = nddr_model
    partition = SharedPartition(model, TASKS)
    encoder = [model.get_layer(f"{name}_{part}") for name in COPIES for part in ("stem_pool", "P2", "P3", "P4", "P5")]
    units = [layer for layer in model.layers if layer.name.startswith("nddr_") and "_P5_" not in layer.name]
    assert {id(v) for v in partition.shared} == _variable_ids(encoder + units)
    for task in TASKS:
        own = [layer for layer in model.layers if layer.name.startswith((f"{task}_head", f"nddr_P5_{task}_"))]
        assert {id(v) for v in partition.own[task]} == _variable_ids(own), task


def test_nddr_stages_can_be_chosen_and_are_checked():
    model = NDDRCNN(tasks=("semantic", "depth"), nddr_stages=["P3", "P5"], nddr_alpha=0.8, nddr_beta=0.05, **TINY)
    assert sorted({layer.name.split("_")[1] for layer in model.layers if layer.name.startswith("nddr_")}) == \
        ["P3", "P5"]
    kernel = keras.ops.convert_to_numpy(model.get_layer("nddr_P5_depth_conv").kernel)[0, 0]
    np.testing.assert_allclose(kernel[:128], 0.05 * np.eye(128), rtol=1e-6)
    np.testing.assert_allclose(kernel[128:], 0.8 * np.eye(128), rtol=1e-6)
    config = model.get_config()
    assert config["nddr_stages"] == ["P3", "P5"] and config["nddr_alpha"] == 0.8
    with pytest.raises(ValueError, match="not stages"):
        NDDRCNN(nddr_stages=["P1"], **TINY)


@pytest.mark.slow
def test_nddr_round_trips_and_trains_a_step(nddr_model, tmp_path):
    model = nddr_model
    images = random_images(2, 32, 64)
    assert_model_config_round_trip(model, images)
    assert_keras_save_load(model, images, str(tmp_path))
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=keras.backend.backend() == "tensorflow")
    rng = np.random.default_rng(1)
    targets = {"semantic": rng.integers(0, 19, (2, 32, 64)).astype("int32"),
               "instance": rng.normal(0, 3, (2, 32, 64, 2)).astype("float32"),
               "depth": rng.uniform(1, 5, (2, 32, 64, 1)).astype("float32")}
    before = keras.ops.convert_to_numpy(model.get_layer("nddr_P2_depth_conv").kernel)
    history = trainer.fit(images, targets, batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert not np.allclose(keras.ops.convert_to_numpy(model.get_layer("nddr_P2_depth_conv").kernel), before)


def test_nddr_preset_and_entry_point():
    preset = presets.get_preset("nddr_cnn")
    assert preset["architecture"] == "nddr_cnn" and preset["parameters"] == 169_294_934
    model = presets.build_from_preset("nddr_cnn", tiny=True)
    assert isinstance(model, NDDRCNN) and model.name == "nddr_cnn"
    assert trainable_count(model) == 460_266
