"""Training smoke tests: every dataset form trains through the experiment runner on its miniature."""

import json
import math
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

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


def test_nyuv2_mat_trains(tmp_path):
    write_nyuv2_miniature(tmp_path / "nyu", n=8, h=24, w=32, train=(0, 2, 3, 6), test=(1, 4, 5, 7))
    results = _run(tmp_path, "nyuv2", tmp_path / "nyu", ("semantic", "instance", "depth"), 13)
    assert results["val"]["num_images"] == 2  # val_batches=1 of batch 2


def test_cityscapes_npy_trains(tmp_path):
    write_cityscapes_npy_miniature(tmp_path / "npy", h=16, w=32)
    _run(tmp_path, "cityscapes_npy", tmp_path / "npy", ("semantic", "depth"), 7)


def test_nyuv2_npy_trains_with_normals(tmp_path):
    """The fourth task end to end: data -> model head (3 channels) -> cosine loss -> fit (-> metrics)."""
    from mtl_keras import evaluation

    write_nyuv2_npy_miniature(tmp_path / "npy")
    tasks = ("semantic", "depth", "normals")
    if "normals" in evaluation.TASKS:  # the runner evaluates every task it trains
        results = _run(tmp_path, "nyuv2_npy", tmp_path / "npy", tasks, 13)
        assert 0.0 <= results["train_history"]["normals_loss"][-1] <= 2.0
        assert any(k.startswith("normals_") for k in results["val"])
        return
    import keras

    from mtl_keras.data.datasets import load_dataset
    from mtl_keras.registry import build_model
    from mtl_keras.training import MultiTaskTrainer
    from mtl_keras.weighting import build_weighting

    ds = load_dataset("nyuv2_npy", tmp_path / "npy", "train", image_size=(16, 24), batch_size=2, num_classes=13,
                      tasks=tasks, seed=0, flip=True, repeat=True)
    model = build_model("kendall_deeplabv3_resnet26_slim", tasks=tasks, num_classes=13, input_shape=(16, 24, 3),
                        **TINY)
    assert model.output["normals"].shape[-1] == 3
    trainer = MultiTaskTrainer(model, build_weighting("uncertainty", tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = trainer.fit(ds, steps_per_epoch=2, epochs=1, verbose=0).history
    assert 0.0 <= history["normals_loss"][-1] <= 2.0 and np.isfinite(history["loss"][-1])
