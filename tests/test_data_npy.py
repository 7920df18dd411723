"""The pre-processed .npy release (CityScapes 128x256, NYUv2 288x384 with normals): values, dtypes, errors."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data import DataError, load_cityscapes_npy, load_nyuv2_npy  # noqa: E402
from mtl_keras.data.datasets import count_examples, load_dataset  # noqa: E402
from tests.test_data_miniatures import (  # noqa: E402
    write_npy_release,
    collect,
    npy_examples,
    resize_nearest,
    write_cityscapes_npy_miniature,
    write_nyuv2_npy_miniature,
)








def _expected_nyu(ex, h, w):
    lab = resize_nearest(ex["label"], h, w)
    depth = resize_nearest(ex["depth"], h, w)
    normal = resize_nearest(ex["normal"], h, w)
    n_valid = np.any(normal != 0, axis=-1, keepdims=True)
    return {"semantic": np.where(lab < 0, 255, lab).astype(np.int32),
            "depth": depth, "depth_mask": (depth > 0).astype(np.float32),
            "normals": np.where(n_valid, normal, 0), "normals_mask": n_valid.astype(np.float32)}


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyu_npy")
    return root, write_nyuv2_npy_miniature(root)


def test_nyuv2_npy_value_by_value_with_odd_sizes(nyu):
    root, examples = nyu
    images, t = collect(load_nyuv2_npy(root, "val", image_size=(9, 12), batch_size=2))
    assert set(t) == {"semantic", "depth", "depth_mask", "normals", "normals_mask"}
    assert images.shape == (2, 9, 12, 3) and t["normals"].shape == (2, 9, 12, 3)
    # native size: the float image in [0, 1] comes back as 0..255 exactly
    np.testing.assert_array_equal(images[0], np.round(examples["val"][0]["image"] * 255))
    for b, ex in enumerate(examples["val"]):  # sample 1 is 11x13, resized to 9x12
        expected = _expected_nyu(ex, 9, 12)
        for key, value in expected.items():
            np.testing.assert_allclose(t[key][b], value, rtol=1e-6, err_msg=key)
    assert t["depth_mask"][0, 0, 0, 0] == 0 and t["normals_mask"][0, 1, 0, 0] == 0
    assert (t["semantic"] == 255).any() and (t["semantic"] == 12).any()
    # "test" is NYUv2's val; counts
    images_test, _ = collect(load_nyuv2_npy(root, "test", image_size=(9, 12), batch_size=2))
    np.testing.assert_array_equal(images, images_test)
    assert count_examples("nyuv2_npy", root, "train") == 3 and count_examples("nyuv2_npy", root, "val") == 2


def test_nyuv2_npy_flip_negates_normal_x(nyu):
    root, _ = nyu
    _, ref = collect(load_nyuv2_npy(root, "val", image_size=(9, 12), batch_size=1, shuffle=False))
    for seed in range(20):
        _, t = collect(load_nyuv2_npy(root, "val", image_size=(9, 12), batch_size=1, shuffle=False, flip=True,
                                   seed=seed))
        if not np.array_equal(t["semantic"][0], ref["semantic"][0]):
            break
    else:
        pytest.fail("no seed flipped the first image")
    np.testing.assert_array_equal(t["semantic"][0], ref["semantic"][0][:, ::-1])
    np.testing.assert_array_equal(t["normals"][0][..., 0], -ref["normals"][0][:, ::-1, 0])
    np.testing.assert_array_equal(t["normals"][0][..., 1:], ref["normals"][0][:, ::-1, 1:])
    np.testing.assert_array_equal(t["normals_mask"][0], ref["normals_mask"][0][:, ::-1])


@pytest.mark.parametrize("name", ["nyuv2_npy", "cityscapes_npy"])
def test_scale_multiplies_disparity_not_metres(tmp_path, name):
    ex = npy_examples(1, 8, 12, 0, 13, normals=name == "nyuv2_npy")[0]
    write_npy_release(tmp_path, "train", [ex], label_folder="label" if name == "nyuv2_npy" else "label_19")
    kw = dict(image_size=(8, 12), batch_size=1, shuffle=False, flip=False, num_classes=13 if "nyu" in name else 19,
              tasks=("semantic", "depth"))
    _, base = collect(load_dataset(name, tmp_path, "train", **kw))
    _, t = collect(load_dataset(name, tmp_path, "train", scale_range=(2.0, 2.0), random_crop=False, **kw))
    ys, xs = (np.arange(8) + 4) // 2, (np.arange(12) + 6) // 2
    np.testing.assert_array_equal(t["semantic"][0], base["semantic"][0][ys][:, xs])
    zoom = 2.0 if name == "cityscapes_npy" else 1.0
    np.testing.assert_allclose(t["depth"][0], zoom * base["depth"][0][ys][:, xs], rtol=1e-6)


def test_any_dtype_byte_order_and_memory_order(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (7, 10, 3))
    lab = rng.integers(-1, 13, (7, 10))
    depth = rng.uniform(0, 4, (7, 10, 1))
    normal = rng.normal(size=(7, 10, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    variants = [
        dict(image=img.astype(np.uint8), label=lab.astype(">i2"), depth=np.asfortranarray(depth),
             normal=normal.astype(np.float16)),
        dict(image=(img / 255.0).astype(">f8"), label=np.where(lab < 0, 255, lab).astype(np.uint8),
             depth=depth.astype(np.float16)[..., 0], normal=np.asfortranarray(normal.astype(np.float32))),
        dict(image=np.asfortranarray(img.astype(np.int64)), label=lab.astype(np.int32)[..., None],
             depth=depth.astype(">f4"), normal=normal.astype(np.float64)),
    ]
    write_npy_release(tmp_path, "val", variants)
    images, t = collect(load_nyuv2_npy(tmp_path, "val", image_size=(7, 10), batch_size=3))
    for b, v in enumerate(variants):
        np.testing.assert_array_equal(images[b], img.astype(np.float32))
        np.testing.assert_array_equal(t["semantic"][b], np.where(lab < 0, 255, lab))
        d = np.asarray(v["depth"], np.float32).reshape(7, 10, 1)
        np.testing.assert_array_equal(t["depth"][b], d)
        np.testing.assert_array_equal(t["normals"][b], np.asarray(v["normal"]).astype(np.float32))


def test_cityscapes_npy_label_folders_and_depth(tmp_path):
    examples = write_cityscapes_npy_miniature(tmp_path)
    _, t19 = collect(load_cityscapes_npy(tmp_path, "val", image_size=(8, 16), batch_size=2, num_classes=19))
    lab19 = [np.load(tmp_path / "val" / "label_19" / f"{i}.npy") for i in range(2)]
    lab7 = [np.load(tmp_path / "val" / "label_7" / f"{i}.npy") for i in range(2)]
    np.testing.assert_array_equal(t19["semantic"], np.where(np.array(lab19) < 0, 255, lab19))
    assert set(t19) == {"semantic", "depth", "depth_mask"}
    d = np.array([ex["depth"] for ex in examples["val"]])
    np.testing.assert_array_equal(t19["depth"], d)  # the release's inverse depth as stored
    np.testing.assert_array_equal(t19["depth_mask"], (d > 0).astype(np.float32))
    _, t7 = collect(load_cityscapes_npy(tmp_path, "val", image_size=(8, 16), batch_size=2, num_classes=7))
    np.testing.assert_array_equal(t7["semantic"], np.where(np.array(lab7) < 0, 255, lab7))
    # copies with a single `label` folder hold 7 classes
    os.rename(tmp_path / "val" / "label_7", tmp_path / "val" / "label")
    _, tl = collect(load_cityscapes_npy(tmp_path, "val", image_size=(8, 16), batch_size=2, num_classes=7))
    np.testing.assert_array_equal(tl["semantic"], t7["semantic"])
    os.rename(tmp_path / "val" / "label_19", tmp_path / "val" / "other")
    with pytest.raises(FileNotFoundError, match="label_19"):
        load_cityscapes_npy(tmp_path, "val", num_classes=19)
    with pytest.raises(ValueError, match="instance"):
        load_cityscapes_npy(tmp_path, "val", num_classes=7, tasks=("semantic", "instance", "depth"))
    with pytest.raises(ValueError, match="num_classes"):
        load_cityscapes_npy(tmp_path, "val", num_classes=13)
    with pytest.raises(ValueError, match="depth_target"):
        load_cityscapes_npy(tmp_path, "val", num_classes=7, depth_target="metric")
    with pytest.raises(ValueError, match="splits train, val"):
        load_cityscapes_npy(tmp_path, "test", num_classes=7)


# ----------------------------------------------------------------------------------------------------------------
# broken files
# ----------------------------------------------------------------------------------------------------------------


def _write_one(root, **overrides):
    ex = npy_examples(1, 6, 8, 0, 13)[0]
    ex.update(overrides)
    return write_npy_release(root, "val", [ex])[0]


@pytest.mark.parametrize("field,value,message", [
    ("image", np.full((6, 8, 3), 1.5, np.float32), "image values outside"),
    ("image", np.full((6, 8, 3), 300, np.int16), "image values outside"),
    ("label", np.full((6, 8), 13.0, np.float32), "label values outside -1"),
    ("label", np.full((6, 8), 2.5, np.float32), "label values outside -1"),
    ("depth", np.full((6, 8, 1), -1.0, np.float32), "negative depth"),
    ("normal", np.full((6, 8, 3), 1.5, np.float32), "normal values outside"),
])
def test_values_outside_the_format_name_the_file(tmp_path, field, value, message):
    paths = _write_one(tmp_path, **{field: value})
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(load_nyuv2_npy(tmp_path, "val", image_size=(6, 8)))
    assert message in str(e.value) and paths[field] in str(e.value)


def test_file_errors_are_named_up_front(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_nyuv2_npy(tmp_path / "nowhere", "val")
    with pytest.raises(FileNotFoundError, match=os.path.join("val", "image")):
        load_nyuv2_npy(tmp_path, "val")
    os.makedirs(tmp_path / "val" / "image")
    for f in ("label", "depth", "normal"):
        os.makedirs(tmp_path / "val" / f)
    with pytest.raises(ValueError, match="empty split"):
        load_nyuv2_npy(tmp_path, "val")
    paths = _write_one(tmp_path)
    # truncated file
    with open(paths["depth"], "rb") as f:
        data = f.read()
    with open(paths["depth"], "wb") as f:
        f.write(data[:-20])
    with pytest.raises(DataError, match="truncated") as e:
        load_nyuv2_npy(tmp_path, "val", image_size=(6, 8))
    assert paths["depth"] in str(e.value)
    paths = _write_one(tmp_path)
    # an image without its label, a label without its image
    os.remove(paths["label"])
    with pytest.raises(FileNotFoundError, match="has no label file") as e:
        load_nyuv2_npy(tmp_path, "val")
    assert paths["label"] in str(e.value)
    assert len(list(load_nyuv2_npy(tmp_path, "val", image_size=(6, 8), tasks=("depth",)))) == 1
    paths = _write_one(tmp_path)
    np.save(tmp_path / "val" / "normal" / "1.npy", np.zeros((6, 8, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="has no image") as e:
        load_nyuv2_npy(tmp_path, "val")
    assert os.path.join("normal", "1.npy") in str(e.value)
    os.remove(tmp_path / "val" / "normal" / "1.npy")
    # wrong shapes and dtypes
    for field, value, message in (("label", np.zeros((5, 8), np.float32), "label is 5x8 but its image"),
                                  ("normal", np.zeros((6, 8, 3, 1), np.float32), "expected a normal array"),
                                  ("image", np.zeros((6, 8), np.float32), "expected a image array"),
                                  ("depth", np.array([[{"a": 1}]], dtype=object), "numeric"),
                                  ("depth", np.zeros((6, 8, 1), np.complex64), "numeric")):
        paths = _write_one(tmp_path, **{field: value})
        with pytest.raises(DataError, match=message) as e:
            load_nyuv2_npy(tmp_path, "val")
        assert paths[field] in str(e.value)
    paths = _write_one(tmp_path)
    with open(paths["image"], "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_nyuv2_npy(tmp_path, "val")


def test_sharding_hooks_split_the_files_between_input_pipelines(nyu):
    root, _ = nyu
    kw = dict(image_size=(9, 12), batch_size=1, shuffle=False, flip=False, tasks=("depth",))
    full = [i.numpy() for i, _ in load_nyuv2_npy(root, "train", **kw)]
    shards = [[i.numpy() for i, _ in load_nyuv2_npy(
        root, "train", input_context=tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=k), **kw)]
        for k in range(2)]
    assert [len(s) for s in shards] == [2, 1]
    np.testing.assert_array_equal(np.stack([shards[0][0], shards[1][0], shards[0][1]]), np.stack(full))
