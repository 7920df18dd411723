"""The ``folder`` dataset (a user's own images + label / instance / depth PNGs + classes file): targets equal what
the test wrote, bad files are named in one line, ``prepare_data.py --check``, the numpy loader, a 2-step training."""

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data import DataError, load_dataset  # noqa: E402
from mtl_keras.data.datasets import class_table, count_examples  # noqa: E402
from mtl_keras.data.folder import read_classes  # noqa: E402
from mtl_keras.data.numpy_loader import FolderPyDataset  # noqa: E402
from tests.test_data_miniatures import collect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import prepare_data  # noqa: E402

H, W = 12, 16
CLASSES = {"classes": [{"name": "ground", "color": [128, 64, 128]}, {"name": "wall", "color": [70, 70, 70]},
                       {"name": "car", "color": [0, 0, 142], "instances": True}], "ignore_label": 255}
RECT = (slice(2, 6), slice(3, 9))  # rows 2..5, columns 3..8: the car, instance 7


def _example(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    semantic = np.zeros((H, W), np.uint8)
    semantic[:, W // 2:] = 1
    semantic[RECT] = 2
    semantic[H - 1, :4] = 255  # ignored
    instance = np.zeros((H, W), np.uint16)
    instance[RECT] = 7
    depth = rng.integers(0, 3000, (H, W)).astype(np.uint16)
    depth[0, :5] = 0  # invalid
    return image, semantic, instance, depth


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)


def write_folder_dataset(root, counts=(("train", 3), ("val", 2)), folders=("semantic", "instance", "depth")):
    """A folder dataset written with cv2; returns {split: [(stem, (image, semantic, instance, depth))]}."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump(CLASSES, f)
    out = {}
    for split, n in counts:
        out[split] = []
        for i in range(n):
            stem, arrays = f"img{i:02d}", _example(len(out) * 100 + i)
            _write(os.path.join(root, split, "images", stem + ".png"), cv2.cvtColor(arrays[0], cv2.COLOR_RGB2BGR))
            for folder, array in zip(("semantic", "instance", "depth"), arrays[1:]):
                if folder in folders:
                    _write(os.path.join(root, split, folder, stem + ".png"), array)
            out[split].append((stem, arrays))
    return out


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    return root, write_folder_dataset(root)


def test_targets_are_the_values_written(folder_root):
    root, written = folder_root
    images, t = collect(load_dataset("folder", root, "val", image_size=(H, W), batch_size=2))
    assert set(t) == {"semantic", "instance", "instance_mask", "depth", "depth_mask"}
    # the car's centroid, by hand: rows 2..5 -> 3.5, columns 3..8 -> 5.5
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    inside = np.zeros((H, W), bool)
    inside[RECT] = True
    vectors = np.where(inside[..., None], np.stack([3.5 - yy, 5.5 - xx], -1), 0.0)
    for b, (_, (image, semantic, _, depth)) in enumerate(written["val"]):
        np.testing.assert_array_equal(images[b], image.astype(np.float32))
        np.testing.assert_array_equal(t["semantic"][b], semantic)
        np.testing.assert_array_equal(t["instance_mask"][b, ..., 0], inside.astype(np.float32))
        np.testing.assert_allclose(t["instance"][b], vectors, atol=1e-6)
        np.testing.assert_array_equal(t["depth_mask"][b, ..., 0], (depth > 0).astype(np.float32))
        np.testing.assert_allclose(t["depth"][b, ..., 0], np.where(depth > 0, (depth - 1.0) / 256.0, 0), rtol=1e-6)
    assert count_examples("folder", root, "train") == 3


def test_classes_tasks_and_num_classes(folder_root, tmp_path):
    root, _ = folder_root
    table = class_table("folder", 3, root)
    assert table.names == ("ground", "wall", "car") and table.instance_ids == (2,)
    np.testing.assert_array_equal(table.colors[2], [0, 0, 142])
    with pytest.raises(ValueError, match=r"has 3 classes \(its classes file\), not num_classes=19: pass "
                                         r"--num_classes 3"):
        load_dataset("folder", root, "val", num_classes=19)
    # classes.csv, and the tasks are the subfolders present
    write_folder_dataset(tmp_path, folders=("semantic",))
    os.remove(tmp_path / "classes.json")
    (tmp_path / "classes.csv").write_text("name,r,g,b,instances\nground,1,2,3,0\ncar,4,5,6,1\n")
    classes = read_classes(tmp_path)
    assert classes.names == ("ground", "car") and classes.instance_ids == (1,) and classes.ignore_label == 255
    with pytest.raises(ValueError, match="has no depth targets"):
        load_dataset("folder", tmp_path, "val", tasks=("depth",))


def test_a_bad_file_is_named_in_one_line(tmp_path):
    written = write_folder_dataset(tmp_path)
    stem = written["val"][1][0]
    bad = str(tmp_path / "val" / "depth" / f"{stem}.png")
    _write(bad, np.full((H, W), 9, np.uint8))  # an 8-bit copy
    with pytest.raises(DataError) as e:
        load_dataset("folder", tmp_path, "val", image_size=(H, W))
    message = str(e.value)
    assert "\n" not in message and message.startswith(bad) and "expected a 16-bit disparity PNG" in message
    os.remove(bad)
    with pytest.raises(FileNotFoundError, match=f"{bad}: missing depth file"):
        load_dataset("folder", tmp_path, "val")
    # a label value that is no class id: the loader names the file
    semantic = written["val"][0][1][1].copy()
    semantic[0, 0] = 5
    _write(str(tmp_path / "val" / "semantic" / f"{written['val'][0][0]}.png"), semantic)
    with pytest.raises(tf.errors.InvalidArgumentError, match="semantic label values outside 0..2"):
        list(load_dataset("folder", tmp_path, "val", tasks=("semantic",)))


def test_prepare_data_check_passes_then_fails(tmp_path, capsys):
    written = write_folder_dataset(tmp_path)
    assert prepare_data.main(["--dataset", "folder", "--data_dir", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "| train | 3 | 16x12 x3 |" in out and "OK: no problem found" in out
    semantic = written["train"][2][1][1].copy()
    semantic[1, 1] = 9
    bad = str(tmp_path / "train" / "semantic" / f"{written['train'][2][0]}.png")
    _write(bad, semantic)
    small = str(tmp_path / "val" / "instance" / f"{written['val'][0][0]}.png")
    _write(small, np.zeros((H - 1, W), np.uint16))
    assert prepare_data.main(["--dataset", "folder", "--data_dir", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: label values [9] are neither class ids 0..2 nor the ignore label 255" in out
    assert f"{small}: instance id is 16x11 but its image is 16x12" in out and "2 problem(s)" in out


def test_numpy_loader_equals_the_tf_loader(folder_root):
    root, _ = folder_root
    kw = dict(image_size=(9, 10), batch_size=2, shuffle=False, flip=False)
    images, t = collect(load_dataset("folder", root, "train", drop_remainder=False, **kw))
    ds = FolderPyDataset(root, "train", drop_remainder=False, **kw)
    batches = [ds[i] for i in range(len(ds))]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
    for key in t:
        np.testing.assert_allclose(np.concatenate([b[1][key] for b in batches]), t[key], atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_two_training_steps_on_a_folder_dataset(tmp_path):
    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import run_training

    write_folder_dataset(tmp_path / "data", counts=(("train", 4), ("val", 2)))
    config = TrainConfig(dataset="folder", data_dir=str(tmp_path / "data"), num_classes=3, image_size=(32, 64),
                         batch_size=2, steps=2, model="kendall_deeplabv3_resnet26_slim",
                         model_overrides=dict(backbone_width=8, aspp_channels=16, decoder_channels=16), export=False,
                         output_dir=str(tmp_path / "run"), scale_range=(0.75, 1.25), val_batches=1,
                         num_sample_images=0)
    results = run_training(config, verbose=0)
    assert results["steps"] == 2 and results["tasks"] == ["semantic", "instance", "depth"]
    assert {"semantic_miou", "instance_mean_error_px", "depth_mean_error_px"} <= set(results["val"])
    # experiments/evaluate.py on the run: the folder's class names, its instance class clustered
    from tests.helpers import evaluate_script

    metrics = evaluate_script().run_evaluation(str(tmp_path / "run"), output_dir=str(tmp_path / "eval"),
                                               batch_size=2, num_images=1)
    assert metrics["dataset"] == "folder" and metrics["num_images"] == 2
    assert list(metrics["semantic_per_class_iou_named"]) == ["ground", "wall", "car"]
    assert metrics["clustering"] == "histogram"


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_py_on_a_folder_dataset(tmp_path):
    write_folder_dataset(tmp_path / "data", counts=(("train", 4), ("val", 2)))
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--dataset", "folder", "--data_dir",
           str(tmp_path / "data"), "--num_classes", "3", "--image_size", "32,64", "--batch_size", "2", "--steps", "2",
           "--noexport", "--val_batches", "1", "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["dataset"] == "folder" and metrics["steps"] == 2
    assert {"semantic_miou", "instance_mean_error_px", "depth_mean_error_px"} <= set(metrics["val"])
