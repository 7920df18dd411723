"""Learning to Branch (mtl_keras/models/ltb.py): per-task backbone copies and a learned choice, before each stage, of
which task's previous-level features each task continues from (LibMTL's LTB)."""

import math

import keras
import numpy as np
import pytest

from mtl_keras import presets
from mtl_keras.gradient_training import SharedPartition
from mtl_keras.models.ltb import LearningToBranch, LTBBranching, LTBSchedule
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer
from tests.helpers import assert_keras_save_load, assert_model_config_round_trip, random_images
from tests.test_arch_cross_stitch import COPIES, ENCODER, HEADS, OUT_CHANNELS, TASKS, TINY, trainable_count

LEVELS = ["P2", "P3", "P4", "P5"]  # the outputs of layer1..layer4 (LTB's levels 1..4; level 0: the stems)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def state(layer):
    return float(numpy(layer.warmup)), float(numpy(layer.temperature))


@pytest.fixture(scope="module")
def ltb_model():
    return LearningToBranch(gumbel_seed=3, **TINY)


def fresh_branching(num_tasks=3, seed=0):
    layer = LTBBranching(num_tasks, num_rows=6, seed=seed)
    layer.build([(None, 1, 1, 2)] * num_tasks)
    return layer


# ------------------------------------------------------------------------------------------------------- structure
def test_ltb_shapes_and_parameters(ltb_model):
    model = ltb_model
    out = model(random_images(2, 32, 64), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (2, 32, 64, c) for t, c in OUT_CHANNELS.items()}
    # Three encoders, LibMTL's (6, T, T) alpha (rows 0 and 5 unused), three heads.
    assert trainable_count(model) == 3 * ENCODER + 6 * 3 * 3 + HEADS == 262_872
    branching = model.get_layer("ltb_branching")
    assert tuple(branching.alpha.shape) == (6, 3, 3) and [v.name for v in branching.non_trainable_weights] == \
        ["warmup", "temperature"]
    assert [node.arguments.kwargs["level"] for node in branching._inbound_nodes] == [1, 2, 3, 4]


def test_ltb_partition_shares_all_but_the_deepest_stage_of_each_copy(ltb_model):
    """Every copy's stem and layer1..layer3 can feed every task (shared); a copy's layer4 feeds its own task only
    (as in LibMTL, where ss_rep[4][t] = layer4_t(...) goes to task t's decoder)."""
    model = ltb_model
    partition = SharedPartition(model, TASKS)
    shared = [model.get_layer(f"{name}_{part}") for name in COPIES for part in ("stem_pool", "P2", "P3", "P4")]
    assert {id(v) for v in partition.shared} == {id(v) for layer in shared + [model.get_layer("ltb_branching")]
                                                 for v in layer.trainable_variables}
    for task, name in zip(TASKS, COPIES):
        own = [model.get_layer(f"{name}_P5")] + [layer for layer in model.layers if layer.name.startswith(
            f"{task}_head")]
        assert {id(v) for v in partition.own[task]} == {id(v) for layer in own for v in layer.trainable_variables}


# --------------------------------------------------------------------------------------------------------- the layer
def test_without_the_schedule_every_path_is_summed():
    layer = fresh_branching()
    assert state(layer) == (1.0, 1.0)  # warm-up by default
    xs = [np.full((1, 1, 1, 2), 10.0 ** j, "float32") for j in range(3)]
    for training in (True, False):
        for level in (1, 4):
            for y in layer(xs, level=level, training=training):
                np.testing.assert_allclose(numpy(y), 111.0)


def test_inference_selects_the_argmax_of_alpha():
    layer = fresh_branching()
    alpha = np.zeros((6, 3, 3), "float32")
    alpha[2] = [[0.1, 0.5, 0.2], [2.0, -1.0, 1.9], [0.0, 0.0, 0.3]]
    layer.set_weights([alpha, np.float32(0.0), np.float32(1.0)])
    np.testing.assert_array_equal(numpy(layer.selection(2)), [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    xs = [np.full((1, 1, 1, 2), 10.0 ** j, "float32") for j in range(3)]
    assert [float(numpy(y)[0, 0, 0, 0]) for y in layer(xs, level=2, training=False)] == [10.0, 1.0, 100.0]


def test_the_gumbel_sample_in_training_is_one_hot_and_follows_alpha():
    layer = fresh_branching(seed=7)
    alpha = np.zeros((6, 3, 3), "float32")
    alpha[3, 0] = [0.0, 8.0, 0.0]  # task 0 before stage 3: almost surely copy 1
    layer.set_weights([alpha, np.float32(0.0), np.float32(1.0)])
    choices = []
    for _ in range(40):
        sample = numpy(layer.selection(3, training=True))
        np.testing.assert_allclose(sample.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.sort(sample, axis=-1), [[0, 0, 1]] * 3, atol=1e-6)
        choices.append(sample.argmax(-1))
    choices = np.array(choices)
    assert (choices[:, 0] == 1).mean() > 0.9
    assert len(set(choices[:, 1])) > 1 and len(set(choices[:, 2])) > 1  # uniform rows: the noise decides
    xs = [np.full((1, 1, 1, 2), 10.0 ** j, "float32") for j in range(3)]
    for y in layer(xs, level=3, training=True):  # each task continues from exactly one copy
        assert float(numpy(y)[0, 0, 0, 0]) in (pytest.approx(1.0), pytest.approx(10.0), pytest.approx(100.0))


def test_the_schedule_is_libmtls():
    layer = fresh_branching()
    schedule = LTBSchedule(200, layers=[layer])
    schedule.on_epoch_begin(0)
    assert state(layer) == (1.0, pytest.approx(10.0))  # epoch < 200 / 100: warm-up
    schedule.on_epoch_begin(1)
    assert state(layer)[0] == 1.0
    schedule.on_epoch_begin(2)
    assert state(layer) == (0.0, pytest.approx(200 / 20 / math.sqrt(3)))
    schedule.on_epoch_begin(99)
    assert state(layer) == (0.0, pytest.approx(1.0))


def test_the_models_callback_finds_its_layer_through_the_trainer(ltb_model):
    model = ltb_model
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    branching = model.get_layer("ltb_branching")
    try:
        (callback,) = model.training_callbacks(40)
        callback.set_model(trainer)
        callback.on_epoch_begin(15)
        assert state(branching) == (0.0, pytest.approx(40 / 20 / 4))
        found = LTBSchedule(100)  # no layers given: searched in the trainer
        found.set_model(trainer)
        found.on_epoch_begin(0)
        assert state(branching) == (1.0, pytest.approx(5.0))
    finally:
        branching.set_schedule(True, 1.0)


# ---------------------------------------------------------------------------------------------------------- model
def _features_model(model):
    """images -> {task: the features its head reads} (the input of the head's first ASPP conv)."""
    return keras.Model(model.input, {t: model.get_layer(f"{t}_head_aspp_1x1_conv").input for t in model.tasks})


def _features_by_hand(model, images, picks):
    """Composes the copies' own stems and stages: before stage i task t continues from copy picks[i][t]."""
    reps = [model.get_layer(f"{name}_stem_pool")(images, training=False) for name in COPIES]
    for i, level in enumerate(LEVELS):
        reps = [model.get_layer(f"{name}_{level}")(reps[picks[i][t]], training=False) for t, name in enumerate(COPIES)]
    return dict(zip(TASKS, reps))


def _set_picks(model, picks):
    alpha = np.zeros((6, 3, 3), "float32")
    for i, row in enumerate(picks, start=1):
        alpha[i, np.arange(3), row] = 1.0
    branching = model.get_layer("ltb_branching")
    branching.set_weights([alpha, np.float32(0.0), np.float32(1.0)])


def test_at_inference_each_task_follows_the_copies_alpha_selects():
    model = LearningToBranch(**TINY)
    images = random_images(1, 32, 64)
    features = _features_model(model)
    picks = [[0, 0, 0], [1, 2, 0], [2, 1, 0], [2, 2, 1]]
    _set_picks(model, picks)
    got = {k: numpy(v) for k, v in features(images, training=False).items()}
    for task, value in _features_by_hand(model, images, picks).items():
        np.testing.assert_allclose(got[task], numpy(value), rtol=1e-5, atol=1e-5, err_msg=task)
    identity = [[0, 1, 2]] * 4
    _set_picks(model, identity)
    separate = {k: numpy(v) for k, v in features(images, training=False).items()}
    for task, value in _features_by_hand(model, images, identity).items():
        np.testing.assert_allclose(separate[task], numpy(value), rtol=1e-5, atol=1e-5, err_msg=task)
        assert not np.allclose(separate[task], got[task]), task  # the choice matters
    model.get_layer("ltb_branching").set_schedule(True, 1.0)  # warm-up: neither
    summed = {k: numpy(v) for k, v in features(images, training=False).items()}
    assert not any(np.allclose(summed[t], got[t]) or np.allclose(summed[t], separate[t]) for t in TASKS)


@pytest.mark.slow
def test_ltb_round_trips_with_its_branching_and_trains_a_step(tmp_path):
    model = LearningToBranch(gumbel_seed=1, **TINY)
    _set_picks(model, [[0, 0, 0], [1, 2, 0], [2, 1, 0], [2, 2, 1]])
    images = random_images(2, 32, 64)
    assert_model_config_round_trip(model, images)
    loaded = assert_keras_save_load(model, images, str(tmp_path))
    assert state(loaded.get_layer("ltb_branching")) == (0.0, 1.0)
    assert model.get_config()["gumbel_seed"] == 1

    branching = model.get_layer("ltb_branching")
    branching.set_weights([np.ones((6, 3, 3), "float32"), np.float32(1.0), np.float32(1.0)])  # LibMTL's start
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=keras.backend.backend() == "tensorflow")
    rng = np.random.default_rng(1)
    targets = {"semantic": rng.integers(0, 19, (2, 32, 64)).astype("int32"),
               "instance": rng.normal(0, 3, (2, 32, 64, 2)).astype("float32"),
               "depth": rng.uniform(1, 5, (2, 32, 64, 1)).astype("float32")}
    # Epoch 1 of a 100-epoch run: past the warm-up, tau = 100 / 20 / sqrt(2).
    history = trainer.fit(images, targets, batch_size=2, epochs=2, initial_epoch=1, verbose=0,
                          callbacks=model.training_callbacks(100)).history
    assert np.isfinite(history["loss"]).all()
    assert state(branching) == (0.0, pytest.approx(100 / 20 / math.sqrt(2)))
    alpha = numpy(branching.alpha)
    assert not np.allclose(alpha[1:5], 1.0)  # the straight-through gradient reaches the used rows
    np.testing.assert_array_equal(alpha[[0, 5]], 1.0)  # LibMTL's unused rows


def test_ltb_preset_and_entry_point():
    preset = presets.get_preset("ltb")
    assert preset["architecture"] == "ltb" and preset["parameters"] == 119_076_238
    model = presets.build_from_preset("ltb", tiny=True)
    assert isinstance(model, LearningToBranch) and model.name == "ltb"
    assert trainable_count(model) == 262_872
    assert [type(c) for c in model.training_callbacks(200)] == [LTBSchedule]
