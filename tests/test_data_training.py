"""Training smoke tests: every dataset form trains through the experiment runner on its miniature."""

import json
import math
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tests.helpers import reference_dense_metrics  # noqa: E402
from tests.test_data_miniatures import (  # noqa: E402
    write_cityscapes_miniature,
    write_cityscapes_npy_miniature,
    write_nyuv2_miniature,
    write_nyuv2_npy_miniature,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(backbone_width=8, aspp_channels=16, decoder_channels=16)


def _run(tmp_path, dataset, data_dir, tasks, num_classes):
    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import run_training

    config = TrainConfig(dataset=dataset, data_dir=str(data_dir), tasks=tasks, num_classes=num_classes,
                         image_size=(32, 64), batch_size=2, steps=2, model="kendall_deeplabv3_resnet26_slim",
                         model_overrides=TINY, export=False, output_dir=str(tmp_path / "run"), scale_range=(0.75, 1.25),
                         val_batches=1, num_sample_images=1)
    results = run_training(config, verbose=0)
    assert results["steps"] == 2 and results["tasks"] == list(tasks)
    for task in tasks:
        losses = results["train_history"][f"{task}_loss"]
        assert all(math.isfinite(v) for v in losses), (task, losses)
    assert os.path.isfile(tmp_path / "run" / "metrics.json")
    return results


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_py_on_a_cityscapes_miniature(tmp_path):
    write_cityscapes_miniature(tmp_path / "cs")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--dataset", "cityscapes", "--data_dir",
           str(tmp_path / "cs"), "--image_size", "32,64", "--batch_size", "2", "--steps", "2", "--noexport",
           "--val_batches", "1", "--output_dir", str(tmp_path / "run"), "--depth_target", "metric"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["dataset"] == "cityscapes" and metrics["steps"] == 2
    assert "semantic_miou" in metrics["val"] and "instance_mean_error_px" in metrics["val"]
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["depth_target"] == "metric"


def test_a_bad_depth_target_is_refused_before_anything_runs(tmp_path):
    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import run_training

    with pytest.raises(ValueError, match="--depth_target must be one of '', 'inverse', 'metric', got 'metres'"):
        run_training(TrainConfig(depth_target="metres", output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nyuv2_mat_trains(tmp_path):
    write_nyuv2_miniature(tmp_path / "nyu", n=8, h=24, w=32, train=(0, 2, 3, 6), test=(1, 4, 5, 7))
    results = _run(tmp_path, "nyuv2", tmp_path / "nyu", ("semantic", "instance", "depth"), 13)
    assert results["val"]["num_images"] == 2  # val_batches=1 of batch 2


@pytest.mark.slow
def test_cityscapes_npy_trains(tmp_path):
    write_cityscapes_npy_miniature(tmp_path / "npy", h=16, w=32)
    _run(tmp_path, "cityscapes_npy", tmp_path / "npy", ("semantic", "depth"), 7)


@pytest.mark.slow  # 25 to 30 s
def test_nyuv2_npy_trains_with_normals(tmp_path):
    """The fourth task end to end: data -> model head (3 channels) -> cosine loss -> fit -> metrics. The loss and
    the metric of the trained model on the val batch are recomputed here with plain numpy."""
    import keras

    from mtl_keras.data.datasets import load_dataset
    from mtl_keras.training import MultiTaskTrainer
    from mtl_keras.weighting import build_weighting

    write_nyuv2_npy_miniature(tmp_path / "npy")
    tasks = ("semantic", "depth", "normals")
    results = _run(tmp_path, "nyuv2_npy", tmp_path / "npy", tasks, 13)
    model = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    assert model.output["normals"].shape[-1] == 3
    # The val batch the run evaluated (val_batches=1 of batch 2: both val images), as run_training reads it.
    val = load_dataset("nyuv2_npy", str(tmp_path / "npy"), "val", image_size=(32, 64), batch_size=2, num_classes=13,
                       tasks=tasks, seed=0, shuffle=False, flip=False)
    images, targets = next(iter(val))
    images, targets = np.asarray(images), {k: np.asarray(v) for k, v in targets.items()}
    predictions = {k: keras.ops.convert_to_numpy(v) for k, v in model(images, training=False).items()}
    assert results["val"]["num_images"] == len(images) == 2

    # The metric: the mean angle between the predicted and true normals over the valid pixels.
    expected = reference_dense_metrics([(predictions, targets)], num_classes=13)
    assert results["val"]["normals_mean_angle_deg"] == pytest.approx(expected["normals_mean_angle_deg"], rel=1e-5)

    # The training loss, as the trainer reports it: the mean over valid pixels of 1 - cos(prediction, target). On
    # targets made from the model's own outputs: aligned (loss 0) on half of the valid pixels, opposite (2) on a
    # quarter, orthogonal (1) on the rest, and opposite on the pixels masked out: (2 * 16 + 1 * 8) / 56 by hand. The
    # loss normalises the prediction by sqrt(|p|^2 + 1e-6) (finite at a zero prediction), which for this untrained
    # head's small outputs (|p| ~ 0.02) moves the aligned and opposite pixels' terms by ~1e-3: hence abs=5e-3.
    unit = predictions["normals"].astype(np.float64)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    axis = np.eye(3)[np.abs(unit).argmin(-1)]  # the axis least parallel to each prediction
    orthogonal = np.cross(unit, axis)
    orthogonal /= np.linalg.norm(orthogonal, axis=-1, keepdims=True)
    normals = np.concatenate([unit[:, :, :32], -unit[:, :, 32:48], orthogonal[:, :, 48:56],
                              -5.0 * unit[:, :, 56:]], axis=2).astype(np.float32)  # counted, these would add 2s
    normals_mask = np.ones(normals.shape[:3] + (1,), np.float32)
    normals_mask[:, :, 56:] = 0.0
    trainer = MultiTaskTrainer(model, build_weighting("equal", tasks))
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = trainer.evaluate(images, dict(targets, normals=normals, normals_mask=normals_mask), batch_size=2,
                            verbose=0, return_dict=True)
    assert logs["normals_loss"] == pytest.approx((2 * 16 + 1 * 8) / 56, abs=5e-3)
