"""The task table (mtl_keras.tasks.TASKS) and the modules that read it."""

import dataclasses

import numpy as np
import pytest

from mtl_keras import tasks
from mtl_keras.tasks import TASKS, Task


def test_every_task_has_every_field_and_the_table_is_consistent():
    assert tuple(TASKS) == ("semantic", "instance", "depth", "normals")
    optional = {"channels", "mask", "example_channels", "flip_signs"}  # None has a meaning there (see Task)
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        for field in dataclasses.fields(Task):
            value = getattr(task, field.name)
            assert field.name in optional or value not in (None, "", ()), (name, field.name)
        assert task.type in tasks.TASK_KINDS and task.target_rule in tasks.TARGET_RULES
        assert task.zoom in tasks.ZOOM_RULES
    tasks.check_table()
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["depth"].channels = 2


def test_the_table_against_literal_expectations():
    assert {t: tasks.task_channels(t, 19) for t in TASKS} == {"semantic": 19, "instance": 2, "depth": 1, "normals": 3}
    assert tasks.task_channels("semantic", 7) == 7
    assert {t: TASKS[t].output_name for t in TASKS} == {
        "semantic": "semantic_logits", "instance": "instance_vectors", "depth": "depth", "normals": "normals"}
    assert tasks.TASK_TYPES == {"semantic": "classification", "instance": "regression", "depth": "regression",
                                "normals": "regression"}
    assert tasks.TASK_NAMES == ("semantic", "instance", "depth", "normals")
    assert tasks.DEFAULT_TASKS == ("semantic", "instance", "depth")
    assert tasks.IGNORE_LABEL == 255
    assert {t: TASKS[t].mask for t in TASKS} == {
        "semantic": None, "instance": "instance_mask", "depth": "depth_mask", "normals": "normals_mask"}
    assert tasks.validate_tasks("depth, semantic") == ("semantic", "depth")
    with pytest.raises(ValueError, match="Unknown task"):
        tasks.validate_tasks(["edges"])
    assert {t: TASKS[t].pad_value for t in TASKS} == {"semantic": 255, "instance": 0.0, "depth": 0.0, "normals": 0.0}
    assert {t: TASKS[t].zoom for t in TASKS} == {"semantic": "unchanged", "instance": "offsets", "depth": "depth",
                                                 "normals": "unchanged"}
    assert {t: TASKS[t].flip_signs for t in TASKS} == {"semantic": None, "instance": (1.0, -1.0), "depth": None,
                                                       "normals": (-1.0, 1.0, 1.0)}


@pytest.mark.parametrize("name, change, message", [
    ("semantic", dict(pad_value=0), "pads with IGNORE_LABEL"),
    ("semantic", dict(zoom="stretch"), "zoom 'stretch' not in"),
    ("semantic", dict(flip_signs=(-1.0,)), "one per channel"),
    ("normals", dict(flip_signs=(-1.0, 1.0)), "one per channel"),
    ("depth", dict(zoom="offsets"), "'offsets' under zoom are 2 channels"),
])
def test_check_table_refuses_inconsistent_augmentation_fields(name, change, message):
    with pytest.raises(ValueError, match=message):
        tasks.check_table({name: dataclasses.replace(TASKS[name], **change)})


def test_the_data_modules_read_the_table():
    from mtl_keras.data import augment, checks

    assert checks.ALL_TASKS == tasks.TASK_NAMES
    assert dict(augment.PAD_VALUES) == {"image": 0.0, "semantic": 255, "instance": 0.0, "depth": 0.0,
                                        "normals": 0.0}
    assert augment.PAD_VALUES.get("depth_mask", 0) == 0


def test_the_config_default_tasks_are_the_table_defaults():
    """config.py keeps a literal copy: it is loaded on its own by ``train.py --help``, and ``import mtl_keras.tasks``
    would run the package's __init__ (TensorFlow)."""
    from mtl_keras.config import TrainConfig

    assert TrainConfig().tasks == tasks.DEFAULT_TASKS


def test_the_export_names_its_outputs_as_the_table_does():
    export = pytest.importorskip("mtl_keras.export")
    names = getattr(export, "OUTPUT_NAMES", None)
    if names is None:
        pytest.skip("mtl_keras.export has no OUTPUT_NAMES")
    assert dict(names) == {t: TASKS[t].output_name for t in TASKS}


def _batch(rng, tasks_, num_classes=19, h=4, w=5):
    """Targets of every task in ``tasks_`` (a few invalid pixels each) and predictions equal to them."""
    targets, predictions = {}, {}
    for name in tasks_:
        task = TASKS[name]
        if task.mask is None:
            labels = rng.integers(0, num_classes, (2, h, w)).astype("int32")
            labels[0, 0, 0] = tasks.IGNORE_LABEL
            targets[name] = labels
            predictions[name] = np.eye(num_classes, dtype="float32")[np.clip(labels, 0, num_classes - 1)] * 50.0
        else:
            value = rng.normal(size=(2, h, w, task.channels)).astype("float32")
            mask = np.ones((2, h, w, 1), "float32")
            mask[1, 0, 0] = 0.0
            targets[name], targets[task.mask], predictions[name] = value, mask, value.copy()
    return targets, predictions


def test_losses_cover_every_task_and_a_perfect_prediction_costs_nothing():
    import keras

    from mtl_keras import losses

    assert {TASKS[t].loss for t in TASKS} <= set(losses.LOSSES)
    targets, predictions = _batch(np.random.default_rng(0), TASKS)
    for name in TASKS:
        value = float(keras.ops.convert_to_numpy(losses.task_loss(name, targets, predictions)))
        assert value == pytest.approx(0.0, abs=1e-4), name
        wrong = dict(predictions, **{name: -predictions[name]})
        assert float(keras.ops.convert_to_numpy(losses.task_loss(name, targets, wrong))) > 0.1, name


def test_the_evaluator_reports_the_metrics_of_the_table_in_its_order():
    from mtl_keras.evaluation import MultiTaskEvaluator

    evaluator = MultiTaskEvaluator(19, tasks.TASK_NAMES)
    targets, predictions = _batch(np.random.default_rng(1), TASKS)
    targets["normals"] /= np.linalg.norm(targets["normals"], axis=-1, keepdims=True)
    predictions["normals"] = targets["normals"]
    evaluator.update(targets, predictions)
    result = evaluator.result()
    assert list(result) == [m for t in TASKS for m in TASKS[t].metrics] + ["num_images"]
    assert result["semantic_miou"] == 1.0 and result["depth_mean_error_px"] == 0.0
    assert result["normals_within_11_25"] == 1.0
    default = MultiTaskEvaluator(19)
    assert default.tasks == tasks.DEFAULT_TASKS


def test_panels_draw_the_tasks_under_the_table_display_names():
    from mtl_keras import visualize

    drawn = visualize.panel_tasks(dict.fromkeys(("depth", "instance", "semantic")))
    assert set(drawn) <= set(TASKS)
    assert [TASKS[t].display_name for t in drawn] == ["semantic", "instance vectors", "inverse depth"]


def test_pipeline_targets_follow_the_table():
    import tensorflow as tf

    from mtl_keras.data.pipeline import prepared_to_targets

    nan = float("nan")
    example = {
        "image": tf.zeros((2, 3, 3), tf.uint8),
        "semantic": tf.constant([[0, 255, 3], [1, 1, 2]], tf.uint8),
        "instance_ids": tf.constant([[0, 7, 7], [0, 0, 9]], tf.int32),
        "depth": tf.constant([[[1.0], [nan], [2.0]], [[0.5], [nan], [3.0]]], tf.float32),
        "normals": tf.constant([[[0, 0, 1], [nan, 0, 1], [1, 0, 0]], [[0, 1, 0], [0, 0, 1], [0, 0, nan]]],
                               tf.float32),
    }
    _, targets = prepared_to_targets(example, tasks.TASK_NAMES)
    targets = {k: v.numpy() for k, v in targets.items()}
    assert sorted(targets) == sorted(list(TASKS) + [TASKS[t].mask for t in TASKS if TASKS[t].mask])
    assert targets["semantic"].dtype == np.int32 and targets["semantic"].tolist() == [[0, 255, 3], [1, 1, 2]]
    assert targets["instance_mask"][..., 0].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert targets["instance"][0, 1].tolist() == [0.0, 0.5] and targets["instance"][1, 2].tolist() == [0.0, 0.0]
    assert targets["depth"][..., 0].tolist() == [[1.0, 0.0, 2.0], [0.5, 0.0, 3.0]]
    assert targets["depth_mask"][..., 0].tolist() == [[1, 0, 1], [1, 0, 1]]
    assert targets["normals_mask"][..., 0].tolist() == [[1, 0, 1], [1, 1, 0]]
    assert targets["normals"][0, 1].tolist() == [0.0, 0.0, 0.0] and targets["normals"][1, 1].tolist() == [0, 0, 1]
    assert all(np.isfinite(v).all() for v in targets.values())
    _, only_depth = prepared_to_targets(example, ("depth",))
    assert sorted(only_depth) == ["depth", "depth_mask"]


def test_prepared_cache_fields_come_from_the_table():
    from mtl_keras.data import prepared

    assert prepared._fields(("depth", "semantic")) == ["image", "semantic", "depth"]
    assert prepared._FIELDS == {"image": ("uint8", 3), "semantic": ("uint8", None), "instance_ids": ("uint16", None),
                                "depth": ("float32", 1), "normals": ("float32", 3)}


@pytest.fixture
def edges(monkeypatch):
    """A fifth task added to the table for one test: a 1-channel regression with an L1 loss and a NaN mask."""
    task = Task("edges", "regression", channels=1, loss="l1", mask="edges_mask", target_rule="finite",
                example_key="edges", example_dtype="float32", example_channels=1, cache_dtype="float32",
                output_name="edges", metrics=("edges_mean_error",), display_name="edges", default=False)
    monkeypatch.setitem(TASKS, "edges", task)
    return task


def test_a_task_added_to_the_table_reaches_the_code_that_reads_it(edges, monkeypatch):
    import keras
    import tensorflow as tf

    from mtl_keras.data.augment import PAD_VALUES, AugmentConfig, augment_example
    from mtl_keras.data.checks import check_tasks
    from mtl_keras.data.pipeline import prepared_to_targets
    from mtl_keras.evaluation import MultiTaskEvaluator
    from mtl_keras.losses import task_loss
    from mtl_keras.weighting import UncertaintyWeightingLayer

    tasks.check_table()
    assert tasks.validate_tasks(["edges", "semantic"]) == ("semantic", "edges")
    assert tasks.task_channels("edges", 19) == 1 and tasks.TASK_TYPES["edges"] == "regression"
    weighting = UncertaintyWeightingLayer(("semantic", "edges"))
    assert weighting.task_types == {"semantic": "classification", "edges": "regression"}

    example = {"image": tf.zeros((1, 2, 3), tf.uint8), "edges": tf.constant([[[1.0], [float("nan")]]])}
    _, targets = prepared_to_targets(example, ("edges",))
    assert targets["edges"].numpy().ravel().tolist() == [1.0, 0.0]
    assert targets["edges_mask"].numpy().ravel().tolist() == [1.0, 0.0]

    batch = {k: v.numpy()[None] for k, v in targets.items()}
    loss = task_loss("edges", batch, {"edges": np.full((1, 1, 2, 1), 3.0, "float32")})
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(2.0)  # |3 - 1| over the one valid pixel
    with pytest.raises(ValueError, match="no metrics for the task"):
        MultiTaskEvaluator(19, ["edges"])

    assert check_tasks("edges,semantic", ("semantic", "edges"), "a data set") == ("edges", "semantic")
    assert PAD_VALUES["edges"] == 0.0 and "edges" in PAD_VALUES
    # scaled x2 (values unchanged: zoom "unchanged"), a centred 2x8 crop of the 2x6 scaled map (padded with the
    # task's pad_value, 0, and a 0 mask), then flipped (seed 0 draws a flip for key 0)
    image = tf.zeros((1, 3, 3), tf.float32)
    edge_targets = {"edges": tf.constant([[[1.0], [2.0], [3.0]]]), "edges_mask": tf.ones((1, 3, 1))}
    config = AugmentConfig(flip=True, scale_range=(2.0, 2.0), crop_size=(2, 8), random_crop=False)
    _, out = augment_example(image, edge_targets, 0, tf.constant(0, tf.int64), config)
    assert out["edges"].shape == (2, 8, 1)
    assert out["edges"].numpy()[0, :, 0].tolist() == [0.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.0]
    assert out["edges_mask"].numpy()[0, :, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # a signed channel under flips (as instance dx and normals x), and values that scale with a zoom (as disparity)
    monkeypatch.setitem(TASKS, "edges", dataclasses.replace(edges, flip_signs=(-1.0,), zoom="depth"))
    _, out = augment_example(image, edge_targets, 0, tf.constant(0, tf.int64), config)
    assert out["edges"].numpy()[0, :, 0].tolist() == [0.0, -6.0, -6.0, -4.0, -4.0, -2.0, -2.0, 0.0]
