"""Prepared caches (write once, read the same tensors fast) and experiments/prepare_data.py --check."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data.datasets import count_examples, load_dataset, load_prepared, write_prepared  # noqa: E402
from tests.test_data_miniatures import (  # noqa: E402
    write_cityscapes_sample,
    CAMERA,
    cityscapes_arrays,
    write_cityscapes_miniature,
    write_nyuv2_miniature,
    write_nyuv2_npy_miniature,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import prepare_data  # noqa: E402


def _stream(ds, n):
    out = []
    for image, t in ds.take(n):
        out.append((image.numpy(), {k: v.numpy() for k, v in t.items()}))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        assert set(ta) == set(tb)
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.mark.parametrize("name,size,classes,tasks", [
    ("cityscapes", (11, 15), 19, ("semantic", "instance", "depth")),
    ("nyuv2_npy", (9, 12), 13, ("semantic", "depth", "normals")),
    ("nyuv2", (12, 16), 13, ("semantic", "instance", "depth")),
])
def test_prepared_stream_equals_the_source_stream(tmp_path, name, size, classes, tasks):
    raw = tmp_path / "raw"
    {"cityscapes": write_cityscapes_miniature, "nyuv2_npy": write_nyuv2_npy_miniature,
     "nyuv2": write_nyuv2_miniature}[name](raw)
    manifest = write_prepared(name, raw, tmp_path / "prep", image_size=size, num_classes=classes, tasks=tasks)
    assert manifest["tasks"] == list(tasks) and manifest["splits"]["train"]["count"] == 3
    assert count_examples("prepared", tmp_path / "prep", "val") == count_examples(name, raw, "val")
    kw = dict(image_size=size, batch_size=2, num_classes=classes, tasks=tasks, seed=4)
    # val, no augmentation: the same tensors
    _assert_same(_stream(load_dataset(name, raw, "val", **kw), 9),
                 _stream(load_dataset("prepared", tmp_path / "prep", "val", **kw), 9))
    # train with shuffling, flips, random scale and crop: the same stream (same seed, same order of files)
    aug = dict(kw, repeat=True, flip=True, scale_range=(0.75, 1.5), crop_size=(8, 10))
    _assert_same(_stream(load_dataset(name, raw, "train", **aug), 4),
                 _stream(load_dataset("prepared", tmp_path / "prep", "train", **aug), 4))


def test_prepared_set_mismatches_and_damage(tmp_path):
    write_nyuv2_npy_miniature(tmp_path / "raw")
    prep = tmp_path / "prep"
    write_prepared("nyuv2_npy", tmp_path / "raw", prep, image_size=(9, 12), num_classes=13,
                   tasks=("semantic", "depth"))
    with pytest.raises(ValueError, match="at 9x12, not"):
        load_prepared(prep, "train", image_size=(18, 24))
    with pytest.raises(ValueError, match="13 classes, not 19"):
        load_prepared(prep, "train", num_classes=19)
    with pytest.raises(ValueError, match="not normals"):
        load_prepared(prep, "train", tasks=("semantic", "normals"))
    with pytest.raises(ValueError, match="depth_target"):
        load_prepared(prep, "train", depth_target="inverse")
    with pytest.raises(ValueError, match="not 'test'"):
        load_prepared(prep, "test")
    with pytest.raises(FileNotFoundError, match="not a prepared set"):
        load_prepared(tmp_path / "raw", "train")
    image, t = next(iter(load_prepared(prep, "val", tasks=("depth",), batch_size=2)))
    assert image.shape == (2, 9, 12, 3) and set(t) == {"depth", "depth_mask"}
    # a damaged file is named
    path = prep / "val" / "000001.zlib"
    import zlib

    with open(path, "wb") as f:
        f.write(zlib.compress(b"x" * 10))
    with pytest.raises(tf.errors.InvalidArgumentError, match="corrupt prepared file") as e:
        list(load_prepared(prep, "val", batch_size=2))
    assert str(path) in str(e.value)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="000001.zlib"):
        load_prepared(prep, "val")


# ----------------------------------------------------------------------------------------------------------------
# prepare_data.py --check
# ----------------------------------------------------------------------------------------------------------------


def _check(root, capsys, *flags):
    """(exit status, printed report) of ``prepare_data.py --dataset cityscapes --data_dir ROOT --check FLAGS``."""
    status = prepare_data.main(["--dataset", "cityscapes", "--data_dir", str(root), "--check", *flags])
    return status, capsys.readouterr().out


def test_check_lists_every_broken_file_and_fails(tmp_path, capsys):
    root = tmp_path / "cs"
    write_cityscapes_miniature(root)
    assert prepare_data.main(["--dataset", "cityscapes", "--data_dir", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert "| train | 3 |" in out and "OK: no problem found" in out and "(absent)" in out
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=9)
    # a corrupt (not truncated) image, an 8-bit disparity, an unknown label id, instanceIds that disagree
    bad = write_cityscapes_sample(root, "train", "badcity", 1, image, lab, inst, disp, CAMERA)
    with open(bad["image"], "rb") as f:
        data = bytearray(f.read())
    for i in range(60, 120):
        data[i] ^= 0x5A
    with open(bad["image"], "wb") as f:
        f.write(bytes(data))
    bad2 = write_cityscapes_sample(root, "train", "badcity", 2, image, lab, inst, (disp // 256).astype(np.uint8),
                                   CAMERA)
    lab3 = lab.copy()
    lab3[0, 0] = 77
    bad3 = write_cityscapes_sample(root, "val", "badcity", 3, image, lab3, inst, disp, CAMERA)
    inst4 = inst.copy()
    inst4[0, :3] = 24000
    bad4 = write_cityscapes_sample(root, "val", "badcity", 4, image, lab, inst4, disp, CAMERA)
    status, out = _check(root, capsys)
    assert status == 1
    assert f"{bad['image']}: cannot decode the PNG" in out
    assert f"{bad2['disparity']}: expected a 16-bit disparity PNG, got a 8-bit" in out
    assert f"{bad3['label_ids']}: labelId(s) [77]" in out
    assert f"{bad4['instance_ids']}: instanceIds disagree" in out
    assert "4 problem(s)" in out
    # writing a cache refuses to start when the check fails
    assert prepare_data.main(["--dataset", "cityscapes", "--data_dir", str(root), "--check", "--output",
                              str(tmp_path / "p")]) == 1
    assert not os.path.exists(tmp_path / "p")
    # Missing files in both splits (an image without its label, one without its disparity, a label without its
    # image): every one is listed, and the rest of each split is still examined (bad4's instanceIds).
    os.remove(bad3["label_ids"])
    os.remove(bad2["disparity"])
    os.remove(bad["image"])
    status, out = _check(root, capsys)
    assert status == 1
    assert f"{bad3['label_ids']}: missing label_ids file" in out
    assert f"{bad2['disparity']}: missing disparity file" in out
    assert f"{bad['label_ids']}: label_ids file without an image" in out
    assert f"{bad4['instance_ids']}: instanceIds disagree" in out


def test_check_test_split_and_other_formats(tmp_path, capsys):
    root = tmp_path / "cs"
    write_cityscapes_miniature(root)
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=9)
    void = np.zeros_like(lab)
    write_cityscapes_sample(root, "test", "berlin", 0, image, void, void.astype(np.uint16), disp, CAMERA)
    assert prepare_data.main(["--dataset", "cityscapes", "--data_dir", str(root), "--check"]) == 0
    assert "all labels are void (ignored everywhere): the official test split withholds" in capsys.readouterr().out
    # .npy: a bad label value and a truncated file, each named
    npy = tmp_path / "npy"
    write_nyuv2_npy_miniature(npy)
    np.save(npy / "train" / "label" / "1.npy", np.full((9, 12), 14.0, np.float32))
    with open(npy / "val" / "depth" / "0.npy", "r+b") as f:
        f.truncate(200)
    assert prepare_data.main(["--dataset", "nyuv2_npy", "--data_dir", str(npy), "--check"]) == 1
    out = capsys.readouterr().out
    assert os.path.join("train", "label", "1.npy") + ": label values [14.0]" in out
    assert os.path.join("val", "depth", "0.npy") + " is truncated" in out
    # NYUv2 .mat
    nyu = tmp_path / "nyu"
    write_nyuv2_miniature(nyu)
    assert prepare_data.main(["--dataset", "nyuv2", "--data_dir", str(nyu), "--check"]) == 0
    assert "| val | 3 | 16x12 x3 |" in capsys.readouterr().out
    os.remove(nyu / "splits.mat")
    assert prepare_data.main(["--dataset", "nyuv2", "--data_dir", str(nyu), "--check"]) == 1
    assert "splits.mat" in capsys.readouterr().out
    assert prepare_data.main(["--dataset", "nyuv2", "--data_dir", str(tmp_path / "nowhere"), "--check"]) == 1


def test_prepare_cli_writes_a_cache_that_trains_by_name(tmp_path, capsys):
    npy = tmp_path / "npy"
    write_nyuv2_npy_miniature(npy)
    out_dir = tmp_path / "prep"
    assert prepare_data.main(["--dataset", "nyuv2_npy", "--data_dir", str(npy), "--output", str(out_dir),
                              "--image_size", "9,12", "--tasks", "semantic,depth,normals"]) == 0
    out = capsys.readouterr().out
    assert f"--dataset prepared --data_dir {out_dir} --image_size 9,12 --num_classes 13" in out
    image, t = next(iter(load_dataset("prepared", out_dir, "train", image_size=(9, 12), batch_size=2,
                                      num_classes=13, tasks=("semantic", "depth", "normals"), seed=0,
                                      flip=True, repeat=True)))
    assert image.shape == (2, 9, 12, 3) and t["normals"].shape == (2, 9, 12, 3)


def test_check_flags_a_bad_camera_file_only_when_training_reads_it(tmp_path, capsys):
    # Camera files are read only for metric depth; for the default inverse depth (from the disparity) a broken one
    # cannot affect training: a note; with --depth_target metric: an error naming the file.
    root = tmp_path / "cs"
    write_cityscapes_miniature(root)
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=9)
    sample = write_cityscapes_sample(root, "train", "badcity", 5, image, lab, inst, disp, CAMERA)
    with open(sample["camera"], "w") as f:
        f.write('{"extrinsic": {"baseline": ')  # cut short
    assert prepare_data.main(["--dataset", "cityscapes", "--data_dir", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert "note (train): 1 unreadable camera file(s)" in out and "OK: no problem found" in out
    assert prepare_data.main(["--dataset", "cityscapes", "--data_dir", str(root), "--check",
                              "--depth_target", "metric"]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and sample["camera"] in out
