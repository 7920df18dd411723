"""CityScapes raw layout: odd sizes value by value, scale augmentation of every target, broken files, test split."""

import logging
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data import DataError, label_lookup_table, list_cityscapes_files, load_cityscapes  # noqa: E402
from tests.test_data_miniatures import (  # noqa: E402
    write_cityscapes_sample,
    CAMERA,
    cityscapes_arrays,
    collect,
    resize_nearest,
    write_cityscapes_miniature,
)

T19 = label_lookup_table(19)






def _centroid_vectors(ids):
    """Reference: (dy, dx) to the centroid of each instance (ids >= 1000), 0 elsewhere; and the mask."""
    h, w = ids.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    vec = np.zeros((h, w, 2))
    mask = ids >= 1000
    for k in np.unique(ids[mask]):
        m = ids == k
        vec[m, 0] = yy[m].mean() - yy[m]
        vec[m, 1] = xx[m].mean() - xx[m]
    return vec, mask




@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    return root, write_cityscapes_miniature(root)


def test_odd_sizes_value_by_value(mini):
    root, samples = mini
    h, w = 13, 17  # val: sample 3 is 13x17 (native), sample 4 is 11x15 (resized)
    images, t = collect(load_cityscapes(root, "val", image_size=(h, w), batch_size=2))
    assert images.shape == (2, h, w, 3)
    for b, (_, (image, lab, inst, disp)) in enumerate(samples["val"]):
        native = image.shape[:2] == (h, w)
        if native:
            np.testing.assert_array_equal(images[b], image.astype(np.float32))
        lab_r, inst_r, disp_r = (resize_nearest(a, h, w) for a in (lab, inst, disp))
        np.testing.assert_array_equal(t["semantic"][b], T19[lab_r])
        vec, mask = _centroid_vectors(inst_r.astype(np.int64))
        np.testing.assert_array_equal(t["instance_mask"][b, ..., 0], mask.astype(np.float32))
        np.testing.assert_allclose(t["instance"][b], vec, atol=1e-5)
        valid = disp_r > 0
        np.testing.assert_array_equal(t["depth_mask"][b, ..., 0], valid.astype(np.float32))
        expected = np.where(valid, (disp_r.astype(np.float64) - 1) / 256 * w / image.shape[1], 0)
        np.testing.assert_allclose(t["depth"][b, ..., 0], expected, rtol=1e-6)
    # the cargroup pixel (labelId 26 without an instance number) is a car for semantics but no instance
    _, (_, lab, inst, _) = samples["val"][0]
    y, x = lab.shape[0] - 1, lab.shape[1] // 3 + 5
    assert t["semantic"][0, y, x] == 13 and t["instance_mask"][0, y, x, 0] == 0


@pytest.mark.parametrize("depth_target", ["inverse", "metric"])
def test_scale_2_centre_crop_scales_instance_vectors_and_disparity(tmp_path, depth_target):
    image, lab, inst, disp = cityscapes_arrays(12, 16, seed=5)
    write_cityscapes_sample(tmp_path, "train", "minicity", 0, image, lab, inst, disp, CAMERA)
    kwargs = dict(image_size=(12, 16), batch_size=1, shuffle=False, flip=False, depth_target=depth_target)
    _, base = collect(load_cityscapes(tmp_path, "train", **kwargs))
    _, t = collect(load_cityscapes(tmp_path, "train", scale_range=(2.0, 2.0), random_crop=False, **kwargs))
    # 24x32 nearest upsampling (each pixel -> 2x2), then the centred 12x16 window: rows 6.., cols 8..
    ys, xs = (np.arange(12) + 6) // 2, (np.arange(16) + 8) // 2

    def src(a):
        return a[0][ys][:, xs]

    np.testing.assert_array_equal(t["semantic"][0], src(base["semantic"]))
    np.testing.assert_array_equal(t["instance_mask"][0], src(base["instance_mask"]))
    np.testing.assert_allclose(t["instance"][0], 2.0 * src(base["instance"]), atol=1e-5)
    np.testing.assert_array_equal(t["depth_mask"][0], src(base["depth_mask"]))
    zoom = 2.0 if depth_target == "inverse" else 1.0  # disparity doubles under a 2x zoom; metres do not change
    np.testing.assert_allclose(t["depth"][0], zoom * src(base["depth"]), rtol=1e-6)
    assert t["instance_mask"].sum() > 0 and t["depth_mask"].sum() > 0


def test_scale_and_crop_arguments_reach_the_loader(mini):
    root, _ = mini
    ds = load_cityscapes(root, "train", image_size=(11, 15), batch_size=3, scale_range=(0.5, 1.5),
                         crop_size=(16, 16), seed=1)
    image, t = next(iter(ds))
    assert image.shape == (3, 16, 16, 3) and t["semantic"].shape == (3, 16, 16)
    assert t["instance"].shape == (3, 16, 16, 2) and t["depth_mask"].shape == (3, 16, 16, 1)
    # padded pixels: ignore label
    assert (t["semantic"].numpy() == 255).any()
    again = next(iter(load_cityscapes(root, "train", image_size=(11, 15), batch_size=3, scale_range=(0.5, 1.5),
                                      crop_size=(16, 16), seed=1)))
    np.testing.assert_array_equal(image.numpy(), again[0].numpy())


# ----------------------------------------------------------------------------------------------------------------
# broken files
# ----------------------------------------------------------------------------------------------------------------


def _one(tmp_path, **overrides):
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=0)
    arrays = dict(image=image, label_ids=lab, instance_ids=inst, disparity=disp)
    arrays.update(overrides)
    return write_cityscapes_sample(tmp_path, "val", "minicity", 0, camera=CAMERA, **arrays)


def test_truncated_png_is_named_before_training(tmp_path):
    paths = _one(tmp_path)
    with open(paths["image"], "rb") as f:
        data = f.read()
    with open(paths["image"], "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as e:
        load_cityscapes(tmp_path, "val", image_size=(11, 15))
    assert paths["image"] in str(e.value)
    # without the up-front check, the in-graph check names the file too
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(load_cityscapes(tmp_path, "val", image_size=(11, 15), check_files=False))
    assert paths["image"] in str(e.value) and "IEND" in str(e.value)


def test_8bit_disparity_is_named(tmp_path):
    _, _, _, disp = cityscapes_arrays(11, 15, seed=0)
    paths = _one(tmp_path, disparity=(disp // 256).astype(np.uint8))
    with pytest.raises(DataError, match="16-bit disparity") as e:
        load_cityscapes(tmp_path, "val", image_size=(11, 15))
    assert paths["disparity"] in str(e.value) and "8-bit" in str(e.value)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(load_cityscapes(tmp_path, "val", image_size=(11, 15), check_files=False))
    assert paths["disparity"] in str(e.value) and "16-bit" in str(e.value)
    # not needed when depth is not requested
    assert len(list(load_cityscapes(tmp_path, "val", image_size=(11, 15), tasks=("semantic",)))) == 1


def test_8bit_instance_ids_colour_labels_size_mismatch_and_non_png(tmp_path):
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=0)
    paths = _one(tmp_path, instance_ids=np.minimum(inst, 255).astype(np.uint8))
    with pytest.raises(DataError, match="16-bit instanceIds"):
        load_cityscapes(tmp_path, "val", image_size=(11, 15))
    paths = _one(tmp_path, label_ids=np.repeat(lab[..., None], 3, axis=-1))
    with pytest.raises(DataError, match="single-channel") as e:
        load_cityscapes(tmp_path, "val", image_size=(11, 15), tasks=("semantic",))
    assert paths["label_ids"] in str(e.value)
    paths = _one(tmp_path, label_ids=lab[:10])
    with pytest.raises(DataError, match="10 but its image is 15x11") as e:
        load_cityscapes(tmp_path, "val", image_size=(11, 15), tasks=("semantic",))
    assert paths["label_ids"] in str(e.value)
    paths = _one(tmp_path)
    with open(paths["label_ids"], "w") as f:
        f.write("not a png")
    with pytest.raises(DataError, match="is not a PNG") as e:
        load_cityscapes(tmp_path, "val", image_size=(11, 15), tasks=("semantic",))
    assert paths["label_ids"] in str(e.value)


def test_camera_json_without_fx_is_named(tmp_path):
    paths = _one(tmp_path)
    with open(paths["camera"], "w") as f:
        f.write('{"extrinsic": {"baseline": 0.2}, "intrinsic": {}}')
    with pytest.raises(ValueError, match="intrinsic.fx") as e:
        load_cityscapes(tmp_path, "val", image_size=(11, 15), depth_target="metric")
    assert paths["camera"] in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# the test split (labels withheld by CityScapes)
# ----------------------------------------------------------------------------------------------------------------


def test_test_split_without_label_folders_loads_masked(tmp_path, caplog):
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=0)
    write_cityscapes_sample(tmp_path, "test", "berlin", 0, image=image)
    write_cityscapes_sample(tmp_path, "test", "berlin", 1, image=image)
    with caplog.at_level(logging.WARNING, logger="mtl_keras"):
        images, t = collect(load_cityscapes(tmp_path, "test", image_size=(11, 15), batch_size=2))
    assert "withholds test labels" in caplog.text
    assert images.shape == (2, 11, 15, 3)
    assert np.all(t["semantic"] == 255)
    assert np.all(t["instance_mask"] == 0) and np.all(t["depth_mask"] == 0) and np.all(t["depth"] == 0)
    # the train split still insists on its labels
    write_cityscapes_sample(tmp_path, "train", "berlin", 0, image=image)
    with pytest.raises(FileNotFoundError, match=os.path.join("gtFine", "train")):
        load_cityscapes(tmp_path, "train", image_size=(11, 15))


def test_test_split_with_void_labels_is_ignored_everywhere(tmp_path):
    image, lab, inst, disp = cityscapes_arrays(11, 15, seed=0)
    void = np.zeros_like(lab)
    void[-2:] = 1  # ego vehicle
    for i in range(2):
        write_cityscapes_sample(tmp_path, "test", "bonn", i, image, void, void.astype(np.uint16), disp, CAMERA)
    _, t = collect(load_cityscapes(tmp_path, "test", image_size=(11, 15), batch_size=2))
    assert np.all(t["semantic"] == 255) and np.all(t["instance_mask"] == 0)
    assert t["depth_mask"].sum() > 0  # test disparity is public
    # an image without its labelIds in a present gtFine/test folder is still an error
    write_cityscapes_sample(tmp_path, "test", "bonn", 2, image=image)
    with pytest.raises(FileNotFoundError, match="bonn_000002_000019_gtFine_labelIds.png"):
        list_cityscapes_files(tmp_path, "test", require=("label_ids",), optional=("label_ids",))


def test_header_check_is_fast_and_counts_sizes(mini):
    from mtl_keras.data.cityscapes import check_cityscapes_files

    root, _ = mini
    files = list_cityscapes_files(root, "train")
    assert check_cityscapes_files(files) == {(15, 11): 2, (18, 12): 1}


def test_label_folder_removed_mid_way_is_named(mini, tmp_path):
    root, _ = mini
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "disparity" / "val")
    with pytest.raises(FileNotFoundError, match=os.path.join("disparity", "val")):
        load_cityscapes(copy, "val")
