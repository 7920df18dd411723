"""LibMTL's mixture-of-experts architectures (mtl_keras/models/experts.py): MMoE, CGC, PLE and DSelect-k.

Parameter counts are written out from the formulas (torchvision-layout ResNet, DeepLab head, gates), not read off
the code under test; the DSelect-k gate is checked on numbers worked out by hand."""

import math

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras import presets
from mtl_keras.export import serving_model
from mtl_keras.gradient_training import SharedPartition
from mtl_keras.models.backbones import DenseUNetEncoder, DilatedResNetBackbone
from mtl_keras.models.experts import CGC, PLE, DSelectK, DSelectKGate, ExpertMixture, MMoE, smooth_step
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import build_weighting
from tests.helpers import assert_keras_save_load, assert_model_config_round_trip, random_images

NAMES = ["mmoe", "cgc", "ple", "dselect_k"]
TASKS = ("semantic", "instance", "depth")
CHANNELS = {"semantic": 19, "instance": 2, "depth": 1}
H, W, WIDTH, HEAD = 32, 64, 4, 8  # the presets' tiny_arguments
BACKBONE = "dilated_resnet26"


def tiny(name, **overrides):
    return presets.build_from_preset(name, tiny=True, **overrides)


def trainable(variables):
    return sum(math.prod(int(d) for d in v.shape) for v in variables)


# ---------------------------------------------------------------------------------------- counts from formulas
def resnet_count(width=WIDTH, blocks=(2, 2, 2, 2)):
    """Trainable parameters of a torchvision-layout bottleneck ResNet (no conv bias; BN: gamma and beta)."""
    count = 7 * 7 * 3 * width + 2 * width  # conv1 + bn1
    inputs = width
    for stage, n in enumerate(blocks):
        p = width * 2 ** stage
        for b in range(n):
            c = inputs if b == 0 else 4 * p
            count += c * p + 2 * p + 9 * p * p + 2 * p + p * 4 * p + 8 * p  # 1x1, 3x3, 1x1 (x4) with their BNs
            if b == 0:
                count += c * 4 * p + 8 * p  # the downsample 1x1 + BN
        inputs = 4 * p
    return count


def deeplab_head_count(features, channels, outputs):
    """ASPP (1x1, three 3x3, image pooling 1x1; each conv + BN), 1x1 projection of 5C + BN, 3x3 conv + BN, biased
    1x1 output conv."""
    aspp = (features * channels + 2 * channels) * 2 + (9 * features * channels + 2 * channels) * 3
    return aspp + 5 * channels * channels + 2 * channels + 9 * channels * channels + 2 * channels + \
        channels * outputs + outputs


BACKBONE_COUNT = resnet_count()  # 56,836
HEADS_COUNT = sum(deeplab_head_count(32 * WIDTH, HEAD, c) for c in CHANNELS.values())  # 92,310
IMAGE = H * W * 3  # what MMoE/CGC/DSelect-k gates read, flattened: 6,144
# PLE's gate i reads the input of level i: the image, then the stem (stride 4, WIDTH channels), layer1 (4 WIDTH),
# layer2 (stride 8, 8 WIDTH), layer3 (stride 8 at output stride 8, 16 WIDTH).
PLE_GATE_INPUTS = [IMAGE, H // 4 * W // 4 * WIDTH, H // 4 * W // 4 * 4 * WIDTH, H // 8 * W // 8 * 8 * WIDTH,
                   H // 8 * W // 8 * 16 * WIDTH]  # 6144, 512, 2048, 1024, 2048


def test_the_formulas_reproduce_an_hps_model_of_the_same_encoder_and_heads():
    hps = tiny("hps")
    assert BACKBONE_COUNT == 56_836 and HEADS_COUNT == 92_310
    assert trainable(hps.trainable_weights) == BACKBONE_COUNT + HEADS_COUNT


EXPECTED = {
    # experts + heads + gates
    "mmoe": 2 * BACKBONE_COUNT + HEADS_COUNT + 3 * (IMAGE + 1) * 2,
    "cgc": (1 + 3) * BACKBONE_COUNT + HEADS_COUNT + 3 * (IMAGE + 1) * (1 + 1),  # MMoE's gates not allocated
    "ple": (1 + 3) * BACKBONE_COUNT + HEADS_COUNT + 3 * sum((n + 1) * (1 + 1) for n in PLE_GATE_INPUTS),
    # per task z_logits (k * ceil(log2 E) = 2 * 1 outputs) + w_logits (k = 2 outputs); MMoE's gates set to None
    "dselect_k": 2 * BACKBONE_COUNT + HEADS_COUNT + 3 * (IMAGE + 1) * (2 * 1 + 2),
}


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_trainable_parameters(name):
    model = tiny(name)
    assert model.gate_image_size == (H, W)
    out = model(random_images(2, H, W), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (2, H, W, c) for t, c in CHANNELS.items()}
    assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in out.values())
    assert trainable(model.trainable_weights) == EXPECTED[name]
    assert EXPECTED == {"mmoe": 242_852, "cgc": 356_524, "ple": 390_340, "dselect_k": 279_722}


def test_ple_gates_read_each_level_input_flattened():
    model = tiny("ple")
    for task in TASKS:
        kernels = [tuple(model.get_layer(f"{task}_gate_{level}").kernel.shape)
                   for level in ("stem", "P2", "P3", "P4", "P5")]
        assert kernels == [(n, 2) for n in PLE_GATE_INPUTS]


def test_ple_on_another_backbone_gates_its_stages_after_its_parameter_free_stem():
    """Off the dilated ResNet the levels are the backbone's stages; its stem (the input normalisation, no
    parameters, the same for every expert) runs once, ungated."""
    backbone = DenseUNetEncoder(base_filters=4, input_shape=(H, W, 3))
    model = PLE(backbone=backbone, head_channels=HEAD, tasks=("semantic", "depth"))
    assert not [layer for layer in model.layers if layer.name.endswith("_gate_stem")]
    # level Pk's gate reads the level before (P1's: the image); P1..P5: 4, 8, 16, 32 channels at strides 1..8, then
    # the last block pooled (stride 16)
    inputs = [IMAGE, H * W * 4, H // 2 * W // 2 * 8, H // 4 * W // 4 * 16, H // 8 * W // 8 * 32]
    kernels = [tuple(model.get_layer(f"depth_gate_P{i}").kernel.shape) for i in range(1, 6)]
    assert kernels == [(n, 2) for n in inputs]
    out = model(random_images(1, H, W), training=False)
    assert tuple(out["semantic"].shape) == (1, H, W, 19) and tuple(out["depth"].shape) == (1, H, W, 1)


def test_cgc_takes_a_count_of_own_experts_per_task():
    model = CGC(input_shape=(H, W, 3), backbone_depth=26, backbone_width=WIDTH, head_channels=HEAD,
                num_shared_experts=2, num_task_experts=[0, 2, 1])
    gates = {t: model.get_layer(f"{t}_gate").kernel.shape[-1] for t in TASKS}
    assert gates == {"semantic": 2, "instance": 4, "depth": 3}
    assert trainable(model.trainable_weights) == (2 + 3) * BACKBONE_COUNT + HEADS_COUNT + (IMAGE + 1) * (2 + 4 + 3)
    assert model.get_config()["num_task_experts"] == [0, 2, 1]
    with pytest.raises(ValueError, match="one count per task"):
        CGC(input_shape=(H, W, 3), backbone_depth=26, backbone_width=WIDTH, num_task_experts=[1, 1])


def test_gates_start_as_pytorch_linear_layers_and_dselect_k_as_libmtl():
    bound = 1 / math.sqrt(IMAGE)
    gate = tiny("mmoe").get_layer("semantic_gate")
    kernel, bias = (np.abs(keras.ops.convert_to_numpy(w)) for w in (gate.kernel, gate.bias))
    assert bound / 2 < kernel.max() <= bound and 0 < bias.max() <= bound  # Keras' Dense: Glorot kernel, zero bias
    dselect = tiny("dselect_k", gamma=2.0).get_layer("depth_gate")
    z = np.abs(np.concatenate([keras.ops.convert_to_numpy(dselect.z_kernel).ravel(),
                               keras.ops.convert_to_numpy(dselect.z_bias)]))
    w = np.abs(np.concatenate([keras.ops.convert_to_numpy(dselect.w_kernel).ravel(),
                               keras.ops.convert_to_numpy(dselect.w_bias)]))
    assert 0.01 < z.max() <= 2.0 / 100 and 0.025 < w.max() <= 0.05


def test_gates_read_the_image_at_the_size_they_were_built_for_and_the_models_serve_any_size():
    model = tiny("ple")
    assert model.get_config()["gate_image_size"] is None  # the default: the input size
    any_size = serving_model(model)  # input_shape (None, None, 3): gate_image_size frozen at the built size
    assert any_size.get_config()["gate_image_size"] == [H, W]
    assert any_size.gate_image_size == (H, W) and any_size.count_params() == model.count_params()
    images = random_images(2, H, W)
    for task, value in model(images, training=False).items():  # at the built size no resize is added: the same
        np.testing.assert_allclose(keras.ops.convert_to_numpy(any_size(images, training=False)[task]),
                                   keras.ops.convert_to_numpy(value), atol=1e-5, err_msg=task)
    out = any_size(random_images(1, H + 8, W - 16), training=False)
    assert all(tuple(v.shape[1:3]) == (H + 8, W - 16) for v in out.values())
    backbone = DilatedResNetBackbone(depth=26, width=WIDTH, input_shape=(None, None, 3), layout="torchvision")
    with pytest.raises(ValueError, match="fixed input_shape or give gate_image_size"):
        MMoE(backbone=backbone, input_shape=(None, None, 3), head_channels=HEAD)


# ------------------------------------------------------------------------------------- the gradient partition
def _variables(layers):
    return {id(v) for layer in layers for v in layer.trainable_variables}


def _stage_models(model, expert):
    """PLE's nested stage Models of one expert (LibMTL's split: the stem with the max-pool, layer1..layer4)."""
    return [model.get_layer(f"{expert}_{level}") for level in ("stem_pool", "P2", "P3", "P4", "P5")]


@pytest.mark.parametrize("name", NAMES)
def test_partition_shared_experts_shared_gates_and_task_experts_own(name):
    """As LibMTL's get_share_params (the shared experts: MMoE's and DSelect-k's experts_shared, CGC's inherited
    experts_shared, PLE's shared_layer): the shared experts are shared; a gate belongs to its task; a task's own
    experts (CGC, PLE: at every level they feed only that task's mixtures) belong to it."""
    model = tiny(name)
    partition = SharedPartition(model, model.tasks)
    shared = {id(v) for v in partition.shared}
    own = {t: {id(v) for v in vs} for t, vs in partition.own.items()}
    if name in ("mmoe", "dselect_k"):
        shared_experts = [model.get_layer(BACKBONE), model.get_layer(f"{BACKBONE}_expert1")]
        task_experts = {t: [] for t in TASKS}
    elif name == "cgc":
        shared_experts = [model.get_layer(BACKBONE)]
        task_experts = {t: [model.get_layer(f"{BACKBONE}_{t}_expert0")] for t in TASKS}
    else:  # PLE: the experts run as their stages (stem with the max-pool, P2..P5)
        shared_experts = _stage_models(model, BACKBONE)
        task_experts = {t: _stage_models(model, f"{BACKBONE}_{t}_expert0") for t in TASKS}
    assert shared == _variables(shared_experts)
    assert trainable(partition.shared) == (1 if name in ("cgc", "ple") else 2) * BACKBONE_COUNT
    gates = {t: [layer for layer in model.layers if layer.name.startswith(f"{t}_gate") and layer.weights]
             for t in TASKS}
    assert all(len(g) == (5 if name == "ple" else 1) for g in gates.values())
    for task in TASKS:
        head = [layer for layer in model.layers if layer.name.startswith(f"{task}_head")]
        assert own[task] == _variables(gates[task]) | _variables(task_experts[task]) | _variables(head), task
    assert sum(len(v) for v in own.values()) + len(shared) == len(model.trainable_variables)


# --------------------------------------------------------------------------------------- the gates' numbers
def test_the_mixture_is_the_gate_weighted_sum_of_the_experts():
    weights = np.array([[0.25, 0.75], [1.0, 0.0]], "float32")
    a = np.arange(2 * 2 * 3 * 1, dtype="float32").reshape(2, 2, 3, 1)
    b = -np.ones((2, 2, 3, 1), "float32")
    out = keras.ops.convert_to_numpy(ExpertMixture()([weights, a, b]))
    np.testing.assert_allclose(out[0], 0.25 * a[0] - 0.75)
    np.testing.assert_allclose(out[1], a[1])


def test_mmoe_task_features_are_its_gate_over_the_experts():
    model = tiny("mmoe")
    mixture = model.get_layer("depth_experts_mixture")
    gate, experts = mixture.input[0], mixture.input[1:]
    probe = keras.Model(model.input, [gate, *experts, mixture.output])
    g, e0, e1, mixed = [keras.ops.convert_to_numpy(t) for t in probe(random_images(2, H, W), training=False)]
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed, g[:, 0, None, None, None] * e0 + g[:, 1, None, None, None] * e1, rtol=1e-5,
                               atol=1e-6)


def test_smooth_step_at_hand_computed_points():
    # -2 t^3 + 3/2 t + 1/2 inside (-1/2, 1/2) for gamma 1: 0.25 -> -0.03125 + 0.375 + 0.5
    t = np.array([-0.6, -0.5, -0.25, 0.0, 0.1, 0.25, 0.5, 0.7], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(smooth_step(t, 1.0)),
                               [0.0, 0.0, 0.15625, 0.5, 0.648, 0.84375, 1.0, 1.0], atol=1e-6)
    # gamma 2: -2/8 t^3 + 3/4 t + 1/2, so 0.5 -> 0.84375
    np.testing.assert_allclose(keras.ops.convert_to_numpy(smooth_step(np.array([-1.0, 0.5, 1.0], "float32"), 2.0)),
                               [0.0, 0.84375, 1.0], atol=1e-6)


def _gate(num_experts, num_nonzeros, z_bias, w_bias, entropy_regularization=1e-6):
    gate = DSelectKGate(num_experts, num_nonzeros, entropy_regularization=entropy_regularization)
    gate.build((None, 3))
    gate.set_weights([np.zeros((3, len(z_bias)), "float32"), np.array(z_bias, "float32"),
                      np.zeros((3, num_nonzeros), "float32"), np.array(w_bias, "float32")])
    return gate


def test_dselect_k_selector_for_two_experts_by_hand():
    # one bit per selector: expert 0 (code 0) gets 1 - s(z), expert 1 (code 1) gets s(z); s(0.25) = 0.84375
    # selector weights softmax([ln 3, 0]) = [0.75, 0.25]
    gate = _gate(2, 2, z_bias=[0.25, -0.25], w_bias=[math.log(3.0), 0.0])
    x = np.ones((1, 3), "float32")
    out = keras.ops.convert_to_numpy(gate(x))
    expert1 = 0.75 * 0.84375 + 0.25 * 0.15625  # 0.671875
    np.testing.assert_allclose(out, [[1 - expert1, expert1]], atol=1e-6)
    assert not gate.losses  # inference: no regulariser
    gate(x, training=True)
    p = np.array([0.15625, 0.84375, 0.84375, 0.15625])  # the two selectors' outputs
    entropy = -(p * np.log(p + 1e-6)).sum()
    assert len(gate.losses) == 1
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(gate.losses[0])), 1e-6 * entropy, rtol=1e-5)


def test_dselect_k_binary_codes_most_significant_bit_first():
    # 2 bits, s = (s(0.25), s(-0.25)) = (0.84375, 0.15625); codes 00, 01, 10, 11
    s1, s2 = 0.84375, 0.15625
    out = keras.ops.convert_to_numpy(_gate(4, 1, z_bias=[0.25, -0.25], w_bias=[0.0])(np.ones((1, 3), "float32")))
    np.testing.assert_allclose(out, [[(1 - s1) * (1 - s2), (1 - s1) * s2, s1 * (1 - s2), s1 * s2]], atol=1e-6)
    # 3 experts (not a power of two): the code 11 is missing, the selector sums below 1 and is pushed to by
    # sum(1 / sum_e p); no entropy term here
    gate = _gate(3, 1, z_bias=[0.25, -0.25], w_bias=[0.0], entropy_regularization=0)
    out = keras.ops.convert_to_numpy(gate(np.ones((1, 3), "float32"), training=True))
    np.testing.assert_allclose(out, [[(1 - s1) * (1 - s2), (1 - s1) * s2, s1 * (1 - s2)]], atol=1e-6)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(gate.losses[0])), 1 / (1 - s1 * s2), rtol=1e-5)


def test_the_trainer_adds_the_dselect_k_regulariser_to_the_loss():
    """MultiTaskTrainer (a loss weighting) totals the weighted task losses and ``model.losses``: here 3 experts, so
    the regulariser's sum(1 / sum_e p) term is of order one per sample and selector."""
    model = tiny("dselect_k", num_experts=3, entropy_regularization=0)
    trainer = MultiTaskTrainer(model, build_weighting("equal", model.tasks))
    trainer.compile(optimizer="adam")
    images = random_images(2, H, W)
    targets = {"semantic": np.zeros((2, H, W), "int32"), "instance": np.zeros((2, H, W, 2), "float32"),
               "instance_mask": np.ones((2, H, W, 1), "float32"), "depth": np.ones((2, H, W, 1), "float32"),
               "depth_mask": np.ones((2, H, W, 1), "float32")}
    outputs = trainer(images, training=True)
    regulariser = sum(float(keras.ops.convert_to_numpy(v)) for v in model.losses)
    assert len(model.losses) == 3 and regulariser > 3 * 2 * 2  # 3 gates, 2 samples x 2 selectors, each sum < 1
    task_losses = sum(float(keras.ops.convert_to_numpy(trainer.task_loss(t, targets, outputs))) for t in TASKS)
    total = float(keras.ops.convert_to_numpy(trainer.compute_loss(images, targets, outputs)))
    np.testing.assert_allclose(total, task_losses + regulariser, rtol=1e-5)


# ------------------------------------------------------------------------------------------ round trips, steps
def test_registered_with_the_zoo_defaults():
    assert set(NAMES) <= set(mtl_keras.list_models())
    expected = {"mmoe": {"num_experts": 2}, "cgc": {"num_shared_experts": 1, "num_task_experts": 1},
                "ple": {"num_shared_experts": 1, "num_task_experts": 1},
                "dselect_k": {"num_experts": 2, "num_nonzeros": 2, "gamma": 1.0, "entropy_regularization": 1e-6}}
    for name in NAMES:
        preset = presets.get_preset(name)
        assert preset["architecture"] == name
        assert {k: preset["arguments"][k] for k in expected[name]} == expected[name]
    # the entry point's own defaults (no preset): LibMTL's
    config = mtl_keras.build_model("dselect_k", input_shape=(H, W, 3), backbone_depth=26, backbone_width=WIDTH,
                                   head_channels=HEAD).get_config()
    assert {k: config[k] for k in expected["dselect_k"]} == expected["dselect_k"]
    assert config["tasks"] == list(TASKS) and config["name"] == "dselect_k"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_config_and_keras_round_trips(name, tmp_path):
    model = tiny(name)
    rng = np.random.default_rng(0)  # trained-looking weights, moving statistics included
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) ** 2 for w in model.get_weights()])
    images = random_images(2, H, W, seed=1)
    assert_model_config_round_trip(model, images)
    loaded = assert_keras_save_load(model, images, str(tmp_path))
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_training_steps_move_the_gates(name):
    keras.utils.set_random_seed(0)
    model = tiny(name)
    trainer = MultiTaskTrainer(model, build_weighting("uncertainty", model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=keras.config.backend() == "tensorflow")
    rng = np.random.default_rng(1)
    images = random_images(2, H, W)
    targets = {"semantic": rng.integers(0, 19, (2, H, W)).astype("int32"),
               "instance": rng.normal(0, 5, (2, H, W, 2)).astype("float32"),
               "instance_mask": np.ones((2, H, W, 1), "float32"),
               "depth": rng.uniform(1, 5, (2, H, W, 1)).astype("float32"),
               "depth_mask": np.ones((2, H, W, 1), "float32")}
    gate = model.get_layer("semantic_gate_P5" if name == "ple" else "semantic_gate")
    before = [keras.ops.convert_to_numpy(w) for w in gate.trainable_weights]
    history = trainer.fit(images, targets, batch_size=1, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    after = [keras.ops.convert_to_numpy(w) for w in gate.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(after, before))
