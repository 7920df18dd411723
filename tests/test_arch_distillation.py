"""PAD-Net and MTI-Net (multi-modal distillation, as Vandenhende et al.'s code): structure, a hand-counted PAD-Net,
the distillation mixing tasks (and nothing else doing so), the FPM gate, the gradient partition, round trips and a
training step."""

import keras
import numpy as np
import pytest

from mtl_keras.gradient_training import SharedPartition
from mtl_keras.models import DenseUNetEncoder
from mtl_keras.models.distillation import MTINet, PADNet, TaskSoftmaxGate
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer
from tests.helpers import assert_config_round_trip, assert_keras_save_load, assert_model_config_round_trip, \
    random_images

TASKS = ("semantic", "depth", "normals")
COMMON = dict(tasks=TASKS, num_classes=3, input_shape=(32, 64, 3), backbone_depth=26, backbone_width=4,
              head_channels=8)
EXPECTED = {"semantic": (2, 32, 64, 3), "depth": (2, 32, 64, 1), "normals": (2, 32, 64, 3)}


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def names(model):
    return {layer.name for layer in model.layers}


@pytest.fixture(scope="module")
def pad():
    return PADNet(**COMMON)


@pytest.fixture(scope="module")
def mti():
    return MTINet(task_channels=8, **COMMON)


# ---------------------------------------------------------------------------------------------------------- PAD-Net
def bottleneck_params(cin, planes, downsample):  # torchvision Bottleneck(cin, planes), BN: weight + bias
    return (cin * 4 * planes + 2 * 4 * planes if downsample else 0) + (cin * planes + 2 * planes) + \
        (9 * planes * planes + 2 * planes) + (planes * 4 * planes + 2 * 4 * planes)


def test_pad_net_shapes_structure_and_hand_counted_parameters(pad):
    assert {k: tuple(v.shape) for k, v in pad(random_images(2, 32, 64), training=False).items()} == EXPECTED
    # One SABlock per ordered pair of tasks: 3 x 2, each two bias-free 3x3 convs of 8 -> 8 channels.
    sa = sorted(n[:-len("_attention")] for n in names(pad) if n.endswith("_attention"))
    assert sa == sorted(f"distillation_{t}_from_{a}" for t in TASKS for a in TASKS if a != t)
    # Hand count (head_channels C = 8, the deepest level P5 has 128 channels at width 4):
    # initial: Bottleneck(128, 2, downsample) = 1040 + 260 + 40 + 32 = 1372, Bottleneck(8, 2) = 20 + 40 + 32 = 92;
    # distillation: 6 x 2 x 9 x 8 x 8 = 6912; final: 2 x 92 and the 1x1 output conv (8 K + K) per task.
    assert bottleneck_params(128, 2, True) == 1372 and bottleneck_params(8, 2, False) == 92
    outputs = (8 * 3 + 3) + (8 * 1 + 1) + (8 * 3 + 3)
    assert trainable(pad) == trainable(pad.backbone) + 3 * (1372 + 92) + 6912 + 3 * 2 * 92 + outputs


def test_pad_net_distillation_is_what_mixes_the_tasks(pad):
    """Perturbing depth's initial features changes the semantic output, through the SABlocks only: with the
    distillation convs at zero (no messages) the same perturbation leaves it unchanged."""
    images = random_images(2, 32, 64, seed=4)
    model = PADNet(**COMMON)
    model.set_weights(pad.get_weights())

    def semantic_change(model):
        before = numpy(model(images, training=False)["semantic"])
        layer = model.get_layer("depth_initial_block2_3_conv")
        saved = layer.get_weights()
        layer.set_weights([w + np.random.default_rng(0).normal(0, 1, w.shape).astype(w.dtype) for w in saved])
        after = numpy(model(images, training=False)["semantic"])
        layer.set_weights(saved)
        return np.abs(after - before).max()

    assert semantic_change(model) > 1e-4
    for layer in model.layers:
        if "_from_" in layer.name and layer.name.endswith("_conv"):
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    assert semantic_change(model) == 0.0


def test_pad_net_partition_and_round_trips(pad, tmp_path):
    partition = SharedPartition(pad, TASKS)
    shared, own = {id(v) for v in partition.shared}, {t: {id(v) for v in vs} for t, vs in partition.own.items()}
    assert {id(v) for v in pad.backbone.trainable_variables} <= shared
    # The initial features feed every task through the distillation: shared; a message and a final head: own.
    assert {id(v) for v in pad.get_layer("depth_initial_block1_1_conv").trainable_variables} <= shared
    assert {id(v) for v in pad.get_layer("distillation_semantic_from_depth_conv").trainable_variables} <= \
        own["semantic"]
    assert {id(v) for v in pad.get_layer("depth_head_block2_3_conv").trainable_variables} <= own["depth"]
    images = random_images(2, 32, 64, seed=1)
    assert "head" not in pad.get_config() and pad.get_config()["head_channels"] == 8
    assert_model_config_round_trip(pad, images)
    assert_keras_save_load(pad, images, str(tmp_path))


def test_pad_net_refuses_zoo_head_arguments():
    with pytest.raises(ValueError, match="its own"):
        PADNet(head="aspp", **COMMON)
    with pytest.raises(ValueError, match="multiple of 4"):
        PADNet(**{**COMMON, "head_channels": 6})


# ---------------------------------------------------------------------------------------------------------- MTI-Net
def test_mti_net_shapes_and_structure(mti):
    assert {k: tuple(v.shape) for k, v in mti(random_images(2, 32, 64), training=False).items()} == EXPECTED
    layers = names(mti)
    # The dilated ResNet's levels of stride >= 4: P2 (4), P3..P5 (8); task features of 8 channels each.
    assert mti.levels == ["P2", "P3", "P4", "P5"] and mti.task_channels == [8, 8, 8, 8]
    for level in mti.levels:
        sa = sorted(n[:-len("_attention")] for n in layers if n.startswith(f"{level}_distillation")
                    and n.endswith("_attention"))
        assert sa == sorted(f"{level}_distillation_{t}_from_{a}" for t in TASKS for a in TASKS if a != t), level
    # Feature propagation from every level but the finest, one SE block per task in each.
    assert sorted(n for n in layers if n.endswith("_fpm_gate")) == ["P3_fpm_gate", "P4_fpm_gate", "P5_fpm_gate"]
    assert len([n for n in layers if "_fpm_" in n and n.endswith("_se_fc1")]) == 3 * 3
    # Propagation resizes only from stride 8 to stride 4 (P3 -> P2); aggregation likewise P3..P5 -> P2.
    assert sorted(n for n in layers if n.endswith("_propagated_resize")) == [f"P2_{t}_propagated_resize" for t in
                                                                             sorted(TASKS)]
    assert len([n for n in layers if n.endswith("_aggregation_resize")]) == 3 * 3
    # The head reads the 4 x 8 aggregated channels; the coarsest level's first block has a projection shortcut
    # (128 -> 8), the others see 8 + 8 (level + propagated) channels.
    assert mti.get_layer("semantic_aggregation").output.shape[-1] == 32
    assert mti.get_layer("P5_depth_initial_block1_0_conv").kernel.shape == (1, 1, 128, 8)
    assert mti.get_layer("P4_depth_initial_block1_1_conv").kernel.shape == (3, 3, 64 + 8, 8)


def test_mti_net_distillation_is_what_mixes_the_tasks_at_the_finest_level(mti):
    """P2 (the finest level) propagates nowhere: perturbing depth's features there changes the semantic output
    through P2's SABlocks only."""
    images = random_images(2, 32, 64, seed=5)
    model = MTINet(task_channels=8, **COMMON)
    model.set_weights(mti.get_weights())

    def semantic_change(model):
        before = numpy(model(images, training=False)["semantic"])
        layer = model.get_layer("P2_depth_initial_block2_2_conv")
        saved = layer.get_weights()
        layer.set_weights([w + np.random.default_rng(0).normal(0, 1, w.shape).astype(w.dtype) for w in saved])
        after = numpy(model(images, training=False)["semantic"])
        layer.set_weights(saved)
        return np.abs(after - before).max()

    assert semantic_change(model) > 1e-4
    for layer in model.layers:
        if layer.name.startswith("P2_distillation") and layer.name.endswith("_conv"):
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    assert semantic_change(model) == 0.0


def test_the_fpm_gate_on_a_fixed_example():
    """Channels in groups of N = 2 consecutive ones (their view(B, C // N, N, H, W)): softmax([0, ln 3]) = [1/4, 3/4]
    and softmax([0, 0]) = [1/2, 1/2], times the features [4, 4, 2, 6]."""
    logits = np.array([0.0, np.log(3.0), 0.0, 0.0], "float32").reshape(1, 1, 1, 4)
    features = np.array([4.0, 4.0, 2.0, 6.0], "float32").reshape(1, 1, 1, 4)
    gate = TaskSoftmaxGate(2)
    np.testing.assert_allclose(numpy(gate([logits, features])).ravel(), [1.0, 3.0, 1.0, 3.0], rtol=1e-6)
    assert assert_config_round_trip(gate).groups == 2


def test_mti_net_partition(mti):
    partition = SharedPartition(mti, TASKS)
    shared, own = {id(v) for v in partition.shared}, {t: {id(v) for v in vs} for t, vs in partition.own.items()}
    assert {id(v) for v in mti.backbone.trainable_variables} <= shared
    assert {id(v) for v in mti.get_layer("P4_fpm_nonlinear1_1_conv").trainable_variables} <= shared
    assert {id(v) for v in mti.get_layer("P2_depth_initial_block1_1_conv").trainable_variables} <= shared
    assert {id(v) for v in mti.get_layer("P5_distillation_normals_from_semantic_conv").trainable_variables} <= \
        own["normals"]


@pytest.mark.slow
def test_mti_net_round_trips(mti, tmp_path):
    images = random_images(2, 32, 64, seed=1)
    assert mti.get_config()["task_channels"] == 8 and mti.task_channels == [8, 8, 8, 8]  # the argument as given
    assert_model_config_round_trip(mti, images)
    assert_keras_save_load(mti, images, str(tmp_path))


def test_mti_net_default_widths_and_another_backbone():
    """task_channels None: each level's channels // 8; DenseUNetEncoder's levels of stride >= 4 are P3..P5."""
    model = MTINet(tasks=("semantic", "depth"), num_classes=3, head_channels=8,
                   backbone=DenseUNetEncoder(base_filters=8, input_shape=(32, 64, 3)))
    assert model.levels == ["P3", "P4", "P5"] and model.task_channels == [4, 8, 8]  # 32, 64, 64 channels
    out = model(random_images(1, 32, 64), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (1, 32, 64, 3), "depth": (1, 32, 64, 1)}
    pad = PADNet(tasks=("semantic", "depth"), num_classes=3, head_channels=8,
                 backbone=DenseUNetEncoder(base_filters=8, input_shape=(32, 64, 3)))
    assert tuple(pad(random_images(1, 32, 64), training=False)["depth"].shape) == (1, 32, 64, 1)


# --------------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("cls", [PADNet, MTINet], ids=["pad_net", "mti_net"])
def test_a_training_step(cls):
    kwargs = dict(COMMON, tasks=("semantic", "depth"))
    model = cls(task_channels=8, **kwargs) if cls is MTINet else cls(**kwargs)
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=keras.backend.backend() == "tensorflow")
    images = random_images(2, 32, 64)
    targets = {"semantic": np.random.default_rng(1).integers(0, 3, (2, 32, 64)).astype("int32"),
               "depth": np.random.default_rng(2).uniform(1, 5, (2, 32, 64, 1)).astype("float32")}
    prefix = "P3_" if cls is MTINet else ""
    watched = model.get_layer(f"{prefix}distillation_semantic_from_depth_conv").kernel
    before = numpy(watched)
    history = trainer.fit(images, targets, batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert not np.allclose(numpy(watched), before)
