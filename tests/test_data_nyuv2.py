"""NYUv2 labeled .mat (MATLAB v7.3 via h5py): split, 894 -> 40 -> 13 classes, depth, instances, broken files."""

import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.io  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data import DataError, load_nyuv2  # noqa: E402
from mtl_keras.data.datasets import count_examples  # noqa: E402
from tests.test_data_miniatures import (collect, nyuv2_arrays, write_mat_v73, write_nyuv2,  # noqa: E402
                                         write_nyuv2_miniature)

# From the format reference: 40 -> 13 (1-based)
MAP13 = [12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2, 6, 11, 7, 7, 7, 7, 7, 7, 6, 7,
         7, 7, 7, 7, 7, 6, 7]


def _class40(label):  # the miniature's mapClass: 1 + (label - 1) % 40
    return 1 + (label - 1) % 40


def _expected_semantic(labels, num_classes):
    c40 = _class40(labels)
    train = c40 - 1 if num_classes == 40 else np.array(MAP13)[c40 - 1] - 1
    return np.where(labels > 0, train, 255)




@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyu")
    return root, write_nyuv2_miniature(root)


def test_val_is_the_test_split_value_by_value(nyu):
    root, (images, labels, depths, instances) = nyu
    out, t = collect(load_nyuv2(root, "val", image_size=(12, 16), batch_size=2))
    test = [1, 4, 5]  # testNdxs 2, 5, 6 (1-based)
    np.testing.assert_array_equal(out, images[test].astype(np.float32))
    np.testing.assert_array_equal(t["semantic"], _expected_semantic(labels[test], 13))
    assert (t["semantic"][:, 0] == 255).all()  # label 0: ignore
    np.testing.assert_array_equal(t["depth"][..., 0], np.where(depths[test] > 0, depths[test], 0))
    np.testing.assert_array_equal(t["depth_mask"][..., 0], (depths[test] > 0).astype(np.float32))
    # instances: two chair instances (label 5, instances 1 and 2) and a table (label 7, instance 3); the numbered
    # wall (label 1 -> class40 1) is stuff
    mask = t["instance_mask"][..., 0]
    expected_mask = np.zeros((12, 16))
    expected_mask[1:4, 1:5] = 1
    expected_mask[8:, 10:] = 1
    np.testing.assert_array_equal(mask, np.broadcast_to(expected_mask, mask.shape))
    yy, xx = np.mgrid[:12, :16]
    for region in ((slice(1, 4), slice(1, 3)), (slice(1, 4), slice(3, 5)), (slice(8, 12), slice(10, 16))):
        cy, cx = yy[region].mean(), xx[region].mean()
        for c, expected in ((0, cy - yy[region]), (1, cx - xx[region])):
            got = t["instance"][:, region[0], region[1], c]
            np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-5)
    assert count_examples("nyuv2", root, "train") == 3 and count_examples("nyuv2", root, "val") == 3
    test_out, _ = collect(load_nyuv2(root, "test", image_size=(12, 16), batch_size=3, tasks=("depth",)))
    np.testing.assert_array_equal(test_out, out)


def test_train_split_40_classes_inverse_depth_and_resize(nyu):
    root, (images, labels, depths, instances) = nyu
    _, t = collect(load_nyuv2(root, "train", image_size=(6, 8), batch_size=3, shuffle=False, flip=False,
                           num_classes=40, tasks=("semantic", "depth"), depth_target="inverse"))
    train = [0, 2, 3]
    src_y, src_x = np.arange(6) * 2 + 1, np.arange(8) * 2 + 1  # nearest, half-pixel centres, factor 2
    lab = labels[train][:, src_y][:, :, src_x]
    d = depths[train][:, src_y][:, :, src_x]
    np.testing.assert_array_equal(t["semantic"], _expected_semantic(lab, 40))
    np.testing.assert_allclose(t["depth"][..., 0], np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0), rtol=1e-6)
    assert set(t) == {"semantic", "depth", "depth_mask"}


def test_metric_depth_is_unchanged_by_random_scale(nyu):
    root, _ = nyu
    kw = dict(image_size=(12, 16), batch_size=3, shuffle=False, flip=False, tasks=("depth",))
    _, base = collect(load_nyuv2(root, "train", **kw))
    _, t = collect(load_nyuv2(root, "train", scale_range=(2.0, 2.0), random_crop=False, **kw))
    ys, xs = (np.arange(12) + 6) // 2, (np.arange(16) + 8) // 2
    np.testing.assert_array_equal(t["depth"], base["depth"][:, ys][:, :, xs])


def test_argument_errors(nyu):
    root, _ = nyu
    with pytest.raises(ValueError, match="num_classes must be one of"):
        load_nyuv2(root, "train", num_classes=19)
    with pytest.raises(ValueError, match="no normals"):
        load_nyuv2(root, "train", tasks=("semantic", "normals"))
    with pytest.raises(ValueError, match="splits train, val"):
        load_nyuv2(root, "valid")


def _copy(nyu, tmp_path):
    root, _ = nyu
    dst = tmp_path / "nyu"
    shutil.copytree(root, dst)
    return dst


def test_mat_without_expected_datasets_is_named(nyu, tmp_path):
    root = _copy(nyu, tmp_path)
    mat = str(root / "nyu_depth_v2_labeled.mat")
    images, labels, depths, instances = nyuv2_arrays()
    write_mat_v73(mat, {"images": images.transpose(0, 3, 2, 1).astype(np.uint8),
                        "labels": labels.transpose(0, 2, 1).astype(np.uint16)})
    with pytest.raises(DataError, match=r"no dataset\(s\) \['instances', 'depths'\]") as e:
        load_nyuv2(root, "train")
    assert mat in str(e.value) and "expected images" in str(e.value)
    assert len(list(load_nyuv2(root, "train", tasks=("semantic",), image_size=(12, 16), batch_size=3))) == 1
    write_mat_v73(mat, {"images": images.transpose(0, 3, 2, 1).astype(np.uint8),
                        "labels": labels.transpose(0, 2, 1)[:, :, :5].astype(np.uint16)})
    with pytest.raises(DataError, match="labels has shape"):
        load_nyuv2(root, "train", tasks=("semantic",))
    scipy.io.savemat(mat, {"images": images})  # a v5 file: not HDF5
    with pytest.raises(DataError, match="not an HDF5"):
        load_nyuv2(root, "train")
    os.remove(mat)
    with pytest.raises(FileNotFoundError, match="nyu_depth_v2_labeled.mat"):
        load_nyuv2(root, "train")


def test_label_outside_the_table_is_named(nyu, tmp_path):
    root = _copy(nyu, tmp_path)
    images, labels, depths, instances = nyuv2_arrays()
    labels[2, 3, 3] = 900
    write_nyuv2(root, images, labels, depths, instances, train=[0, 2, 3], test=[1, 4, 5])
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(load_nyuv2(root, "train", image_size=(12, 16), shuffle=False))
    assert "label id outside 0..894" in str(e.value) and "nyu_depth_v2_labeled.mat" in str(e.value)
    assert "900" in str(e.value)


def test_split_and_mapping_file_errors(nyu, tmp_path):
    root = _copy(nyu, tmp_path)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [7]]), "testNdxs": np.array([[2]])})
    with pytest.raises(DataError, match="1..6") as e:
        load_nyuv2(root, "train")
    assert "splits.mat" in str(e.value)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [2]]), "testNdxs": np.array([[2]])})
    with pytest.raises(DataError, match="share"):
        load_nyuv2(root, "train")
    scipy.io.savemat(root / "splits.mat", {"train": np.array([[1]])})
    with pytest.raises(DataError, match="no variable 'trainNdxs'"):
        load_nyuv2(root, "train")
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    assert count_examples("nyuv2", root, "train") == 1
    scipy.io.savemat(root / "classMapping40.mat", {"mapClass": np.ones((1, 100))})
    with pytest.raises(DataError, match="mapClass has 100 entries"):
        load_nyuv2(root, "train")
    os.remove(root / "classMapping40.mat")
    with pytest.raises(FileNotFoundError, match="classMapping40.mat"):
        load_nyuv2(root, "train")
    write_nyuv2(root, *nyuv2_arrays())
    scipy.io.savemat(root / "class13Mapping.mat", {"classMapping13": {"names": np.array(["a"], dtype=object)}})
    with pytest.raises(DataError, match="no field 'labels13'"):
        load_nyuv2(root, "train")
    # 40 classes need no 13-class map
    assert len(list(load_nyuv2(root, "train", num_classes=40, image_size=(12, 16), batch_size=3))) == 1
    write_mat_v73(root / "x.mat", {"classMapping13": np.ones(40)})
    with pytest.raises(DataError, match="v7.3"):
        load_nyuv2(root, "train", map13_path=root / "x.mat")
