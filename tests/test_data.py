"""Tests of mtl_keras.data: label tables, the synthetic generator and the tf.data loader."""

import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data import (  # noqa: E402
    class_colors,
    class_names,
    generate_synthetic_cityscapes,
    instance_label_ids,
    instance_train_ids,
    label_lookup_table,
    list_cityscapes_files,
    load_cityscapes,
)

# ----------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------

# From /work/shared/reference/data-formats.md (independent of the implementation's source).
TRAIN_IDS_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CATEGORY_IGNORED = {9, 10, 14, 15, 16, 18, 29, 30}  # ignoreInEval


def _expected_7(label_id):
    if label_id <= 6 or label_id in CATEGORY_IGNORED or label_id > 33:
        return 255
    for first, last, cat in ((7, 10, 0), (11, 16, 1), (17, 20, 2), (21, 22, 3), (23, 23, 4),
                             (24, 25, 5), (26, 33, 6)):
        if first <= label_id <= last:
            return cat
    raise AssertionError(label_id)


def test_label_tables():
    t19, t7 = label_lookup_table(19), label_lookup_table(7)
    assert t19.shape == (256,) and t19.dtype == np.uint8 and t7.dtype == np.uint8
    for i in range(256):
        assert t19[i] == TRAIN_IDS_19.get(i, 255), i
        assert t7[i] == _expected_7(i), i
    assert class_names(19)[0] == "road" and class_names(19)[13] == "car" and len(class_names(19)) == 19
    assert class_names(7) == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    assert class_colors(19).shape == (19, 3) and class_colors(19).dtype == np.uint8
    assert tuple(class_colors(19)[0]) == (128, 64, 128) and class_colors(7).shape == (7, 3)
    assert instance_label_ids() == list(range(24, 34))
    assert instance_train_ids(19) == list(range(11, 19))
    assert instance_train_ids(7) == [5, 6]


@pytest.mark.parametrize("bad", [0, 8, 20, "19", None, 19.5])
def test_invalid_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        label_lookup_table(bad)
    with pytest.raises(ValueError, match="num_classes"):
        class_names(bad)


# ----------------------------------------------------------------------------------------
# synthetic generator
# ----------------------------------------------------------------------------------------


def _read_tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_synthetic_cityscapes(root, num_train=3, num_val=2, height=64, width=128, seed=0)


def test_synthetic_files(synth_root):
    for split, city, n in (("train", "synthtown", 3), ("val", "synthville", 2)):
        files = list_cityscapes_files(synth_root, split)
        assert len(files) == n
        for f in files:
            assert f["city"] == city and "_" not in city
            assert os.path.basename(f["image"]).startswith(f"{city}_")
            img = cv2.imread(f["image"], cv2.IMREAD_UNCHANGED)
            lab = cv2.imread(f["label_ids"], cv2.IMREAD_UNCHANGED)
            inst = cv2.imread(f["instance_ids"], cv2.IMREAD_UNCHANGED)
            disp = cv2.imread(f["disparity"], cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 128, 3) and img.dtype == np.uint8
            assert lab.shape == (64, 128) and lab.dtype == np.uint8
            assert inst.shape == (64, 128) and inst.dtype == np.uint16
            assert disp.shape == (64, 128) and disp.dtype == np.uint16
            assert set(np.unique(lab)) <= {7, 8, 11, 17, 21, 22, 23, 24, 26}
            # instanceIds consistent with labelIds
            is_inst = inst >= 1000
            np.testing.assert_array_equal(np.where(is_inst, inst // 1000, inst), lab)
            assert set(np.unique(inst[is_inst] // 1000)) <= {24, 26}
            # sky invalid, everything else valid; disparity really needs 16 bits
            np.testing.assert_array_equal(disp == 0, lab == 23)
            assert disp.max() > 255
            d = (disp[disp > 0].astype(np.float64) - 1) / 256
            assert 0 < d.max() < 60
            with open(f["camera"]) as fh:
                cam = json.load(fh)
            assert cam["extrinsic"]["baseline"] == 0.209313
            assert set(cam["extrinsic"]) == {"baseline", "pitch", "roll", "yaw", "x", "y", "z"}
            assert set(cam["intrinsic"]) == {"fx", "fy", "u0", "v0"}
            assert cam["intrinsic"]["fx"] == pytest.approx(2262.52 * 128 / 2048)
    # the road occupies the bottom rows of every image (ground plane below the horizon)
    lab = cv2.imread(files[0]["label_ids"], cv2.IMREAD_UNCHANGED)
    assert (lab[-1] == 7).any()


def test_synthetic_deterministic_and_skip(synth_root, tmp_path):
    same = generate_synthetic_cityscapes(tmp_path / "a", num_train=3, num_val=2, height=64,
                                         width=128, seed=0)
    other = generate_synthetic_cityscapes(tmp_path / "b", num_train=3, num_val=2, height=64,
                                          width=128, seed=1)
    ref, a, b = _read_tree(synth_root), _read_tree(same), _read_tree(other)
    assert ref == a
    pngs = [k for k in ref if k.endswith(".png")]
    assert len(pngs) == 5 * 4
    assert all(ref[k] != b[k] for k in pngs if "leftImg8bit" in k)
    # complete set: nothing rewritten
    probe = os.path.join(same, pngs[0])
    os.utime(probe, (1, 1))
    generate_synthetic_cityscapes(same, num_train=3, num_val=2, height=64, width=128, seed=0)
    assert os.path.getmtime(probe) == 1
    # other arguments on an existing set: refuse unless overwrite
    with pytest.raises(FileExistsError):
        generate_synthetic_cityscapes(same, num_train=2, num_val=1, height=64, width=128, seed=0)
    generate_synthetic_cityscapes(same, num_train=2, num_val=1, height=64, width=128, seed=0,
                                  overwrite=True)
    assert len(list_cityscapes_files(same, "train")) == 2
    assert len(list_cityscapes_files(same, "val")) == 1


def test_load_synthetic(synth_root):
    ds = load_cityscapes(synth_root, "train", image_size=(32, 64), batch_size=2)
    batches = list(ds)
    assert len(batches) == 1  # drop_remainder for train: 3 samples -> 1 batch of 2
    image, t = batches[0]
    assert image.shape == (2, 32, 64, 3) and image.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 255.0
    assert float(tf.reduce_max(image)) > 1.0  # not normalised
    expected = {"semantic": ((2, 32, 64), tf.int32), "instance": ((2, 32, 64, 2), tf.float32),
                "instance_mask": ((2, 32, 64, 1), tf.float32), "depth": ((2, 32, 64, 1), tf.float32),
                "depth_mask": ((2, 32, 64, 1), tf.float32)}
    assert set(t) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert tuple(t[k].shape) == shape and t[k].dtype == dtype, k
    sem = t["semantic"].numpy()
    assert set(np.unique(sem)) <= {0, 1, 2, 5, 8, 9, 10, 11, 13}
    dm = t["depth_mask"].numpy()[..., 0]
    np.testing.assert_array_equal(dm == 0, sem == 10)  # sky <-> invalid disparity
    assert t["depth"].numpy().max() < 60 * 64 / 128
    # val: no shuffle / flip / drop by default; 7 classes; only some tasks
    ds = load_cityscapes(synth_root, "val", image_size=(32, 64), batch_size=4, num_classes=7,
                         tasks=("semantic",))
    (image, t), = list(ds)
    assert image.shape[0] == 2 and set(t) == {"semantic"}
    assert set(np.unique(t["semantic"].numpy())) <= {0, 1, 2, 3, 4, 5, 6}


def test_pipeline_deterministic(synth_root):
    def run(seed):
        ds = load_cityscapes(synth_root, "train", image_size=(16, 32), batch_size=1, seed=seed,
                             repeat=True)
        return [(i.numpy(), t["instance"].numpy()) for i, t in ds.take(12)]

    a, b = run(5), run(5)
    for (ia, va), (ib, vb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(va, vb)
    # both shuffling and flipping are at work over 12 draws of 3 images
    c = run(6)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


@pytest.mark.parametrize("cache", [False, True])
def test_every_iterator_sees_the_same_stream_and_each_epoch_is_a_new_permutation(synth_root, cache):
    # Keras' fit makes one iterator to build the model and another to train, while a resumed run trains on its
    # first: the stream must not depend on how many iterators came before, or a resume sees other batches.
    ds = load_cityscapes(synth_root, "train", image_size=(16, 32), batch_size=1, seed=3, flip=False, repeat=True,
                         cache=cache)

    def image_ids(iterator, count):
        return [int(np.asarray(next(iterator)[0]).sum()) for _ in range(count)]

    first = image_ids(iter(ds), 12)
    assert image_ids(iter(ds), 12) == first  # a second iterator of the same dataset object
    assert image_ids(iter(ds.skip(6)), 6) == first[6:]  # skip fast-forwards exactly
    epochs = [first[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 3 for e in epochs)  # each image once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


# ----------------------------------------------------------------------------------------
# hand-written miniature in the CityScapes layout
# ----------------------------------------------------------------------------------------

H, W = 10, 14


def _miniature():
    lab = np.full((H, W), 23, np.uint8)  # sky
    lab[5:, :] = 7  # road
    lab[5:, :3] = 8  # sidewalk
    lab[2:5, 10:] = 11  # building
    lab[9, 10:] = 9  # parking (ignored in both 19 and 7 classes)
    lab[0, 0] = 0  # unlabeled
    inst = lab.astype(np.uint16)
    # car 0: an L shape (centroid not on a pixel centre)
    inst[4:8, 3:5] = 26000
    inst[7, 5:7] = 26000
    # car 1, touching car 0
    inst[5:7, 7:10] = 26001
    # person
    inst[1:6, 12] = 24000
    # caravan (instance class whose semantic label is ignored)
    inst[8, 11:13] = 29000
    # cargroup: labelId 26 without instance id
    inst[9, 4:7] = 26
    lab = np.where(inst >= 1000, inst // 1000, inst).astype(np.uint8)
    rng = np.random.default_rng(0)
    p = (1 + 256 * rng.uniform(0, 40, size=(H, W))).astype(np.uint16)
    p[:2] = 0  # sky invalid
    p[6, 6] = 0
    p[3, 3] = 1  # d = 0, valid
    img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    return img, lab, inst, p


def _write_sample(root, split, city, seq, img, lab, inst, disp, skip=()):
    stem = f"{city}_{seq:06d}_000019"
    paths = {}
    for key, folder, suffix in (("image", "leftImg8bit", "leftImg8bit.png"),
                                ("label_ids", "gtFine", "gtFine_labelIds.png"),
                                ("instance_ids", "gtFine", "gtFine_instanceIds.png"),
                                ("disparity", "disparity", "disparity.png"),
                                ("camera", "camera", "camera.json")):
        d = os.path.join(root, folder, split, city)
        os.makedirs(d, exist_ok=True)
        paths[key] = os.path.join(d, f"{stem}_{suffix}")
    writes = {"image": cv2.cvtColor(img, cv2.COLOR_RGB2BGR), "label_ids": lab,
              "instance_ids": inst, "disparity": disp}
    for key, arr in writes.items():
        if key not in skip:
            assert cv2.imwrite(paths[key], arr)
    if "camera" not in skip:
        with open(paths["camera"], "w") as f:
            json.dump({"extrinsic": {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7,
                                     "y": 0.1, "yaw": 0.0195, "z": 1.22},
                       "intrinsic": {"fx": 2262.52, "fy": 2265.3, "u0": 1096.98, "v0": 513.137}}, f)
    return paths


def _load_one(root, **kw):
    kw.setdefault("flip", False)
    kw.setdefault("shuffle", False)
    ds = load_cityscapes(root, "val", batch_size=1, **kw)
    (image, t), = list(ds)
    return image.numpy()[0], {k: v.numpy()[0] for k, v in t.items()}


def _check_centroids(vec, mask, inst_ids):
    """pixel + vector == centroid of the pixel's instance; 0 outside instances."""
    h, w = inst_ids.shape
    yy, xx = np.mgrid[:h, :w]
    is_inst = inst_ids >= 1000
    np.testing.assert_array_equal(mask[..., 0], is_inst.astype(np.float32))
    np.testing.assert_array_equal(vec[~is_inst], 0.0)
    ids = np.unique(inst_ids[is_inst])
    assert len(ids) > 0
    for i in ids:
        m = inst_ids == i
        cy, cx = yy[m].mean(), xx[m].mean()
        np.testing.assert_allclose(yy[m] + vec[m][:, 0], cy, atol=1e-4)
        np.testing.assert_allclose(xx[m] + vec[m][:, 1], cx, atol=1e-4)


@pytest.fixture()
def mini_root(tmp_path):
    img, lab, inst, p = _miniature()
    _write_sample(tmp_path, "val", "minicity", 1, img, lab, inst, p)
    return tmp_path, (img, lab, inst, p)


def test_miniature_values(mini_root):
    root, (img, lab, inst, p) = mini_root
    image, t = _load_one(root, image_size=(H, W))
    np.testing.assert_array_equal(image, img.astype(np.float32))
    np.testing.assert_array_equal(t["semantic"], label_lookup_table(19)[lab])
    assert t["semantic"][9, 4] == 13 and t["semantic"][8, 11] == 255 and t["semantic"][9, 12] == 255
    _check_centroids(t["instance"], t["instance_mask"], inst.astype(np.int64))
    # the L-shaped car: centroid (5.8, 3.9)
    assert tuple(t["instance"][4, 3]) == pytest.approx((1.8, 0.9), abs=1e-5)
    assert t["instance_mask"][9, 5, 0] == 0  # cargroup: no instance
    valid = p > 0
    np.testing.assert_array_equal(t["depth_mask"][..., 0], valid.astype(np.float32))
    np.testing.assert_allclose(t["depth"][..., 0], np.where(valid, (p.astype(np.float64) - 1) / 256, 0),
                               rtol=1e-6)
    assert t["depth"][3, 3, 0] == 0 and t["depth_mask"][3, 3, 0] == 1
    # 7 classes: categories
    _, t7 = _load_one(root, image_size=(H, W), num_classes=7, tasks=("semantic",))
    np.testing.assert_array_equal(t7["semantic"], label_lookup_table(7)[lab])
    assert t7["semantic"][9, 0] == 0 and t7["semantic"][4, 3] == 6 and t7["semantic"][2, 12] == 5
    assert t7["semantic"][0, 5] == 4 and t7["semantic"][9, 12] == 255 and t7["semantic"][0, 0] == 255
    # metric depth: baseline * fx / d
    _, tm = _load_one(root, image_size=(H, W), tasks=("depth",), depth_target="metric")
    d = (p.astype(np.float64) - 1) / 256
    ok = p > 1
    np.testing.assert_array_equal(tm["depth_mask"][..., 0], ok.astype(np.float32))
    np.testing.assert_allclose(tm["depth"][..., 0][ok], 0.209313 * 2262.52 / d[ok], rtol=1e-5)
    assert tm["depth"][3, 3, 0] == 0


def test_miniature_resize(tmp_path):
    img, lab, inst, p = _miniature()
    up = lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)  # noqa: E731
    _write_sample(tmp_path, "val", "minicity", 1, up(img), up(lab), up(inst), up(p))
    image, t = _load_one(tmp_path, image_size=(H, W))  # source 20x28 -> 10x14
    assert image.shape == (H, W, 3)  # antialiased bilinear: a smoothed version of img
    np.testing.assert_allclose(image.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=3.0)
    np.testing.assert_array_equal(t["semantic"], label_lookup_table(19)[lab])
    _check_centroids(t["instance"], t["instance_mask"], inst.astype(np.int64))
    valid = p > 0
    np.testing.assert_array_equal(t["depth_mask"][..., 0], valid.astype(np.float32))
    # disparity in px scales with the width: 14 / 28
    np.testing.assert_allclose(t["depth"][..., 0], np.where(valid, (p.astype(np.float64) - 1) / 256 * 0.5, 0),
                               rtol=1e-6)


def test_miniature_flip(mini_root):
    root, (img, lab, inst, p) = mini_root
    _, ref = _load_one(root, image_size=(H, W))
    flipped = None
    for seed in range(40):
        image, t = _load_one(root, image_size=(H, W), flip=True, seed=seed)
        if np.array_equal(image, img[:, ::-1].astype(np.float32)):
            flipped = t
        else:
            np.testing.assert_array_equal(image, img.astype(np.float32))
        if flipped is not None:
            break
    assert flipped is not None, "no seed flipped the image"
    t = flipped
    np.testing.assert_array_equal(t["semantic"], ref["semantic"][:, ::-1])
    np.testing.assert_array_equal(t["depth"], ref["depth"][:, ::-1])
    np.testing.assert_array_equal(t["depth_mask"], ref["depth_mask"][:, ::-1])
    np.testing.assert_array_equal(t["instance_mask"], ref["instance_mask"][:, ::-1])
    np.testing.assert_allclose(t["instance"][..., 0], ref["instance"][:, ::-1, 0], atol=1e-5)
    np.testing.assert_allclose(t["instance"][..., 1], -ref["instance"][:, ::-1, 1], atol=1e-5)
    _check_centroids(t["instance"], t["instance_mask"], inst[:, ::-1].astype(np.int64))


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------


def test_unknown_label_id(tmp_path):
    img, lab, inst, p = _miniature()
    lab = lab.copy()
    lab[3, 4] = 200
    paths = _write_sample(tmp_path, "val", "minicity", 1, img, lab, inst, p)
    ds = load_cityscapes(tmp_path, "val", image_size=(H, W), batch_size=1)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(ds)
    assert paths["label_ids"] in str(e.value) and "200" in str(e.value)


def test_file_errors(tmp_path):
    img, lab, inst, p = _miniature()
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        list_cityscapes_files(tmp_path / "does-not-exist", "val")
    with pytest.raises(FileNotFoundError, match=os.path.join("leftImg8bit", "val")):
        load_cityscapes(tmp_path, "val")
    # empty split
    os.makedirs(tmp_path / "leftImg8bit" / "val" / "minicity")
    with pytest.raises(ValueError, match="empty split"):
        load_cityscapes(tmp_path, "val")
    # image without its labelIds (the expected path is named)
    paths = _write_sample(tmp_path, "val", "minicity", 1, img, lab, inst, p, skip=("label_ids",))
    with pytest.raises(FileNotFoundError) as e:
        list_cityscapes_files(tmp_path, "val")
    assert paths["label_ids"] in str(e.value)
    # ... which is fine when only depth is requested
    assert len(list_cityscapes_files(tmp_path, "val", require=("disparity",))) == 1
    # a label file without its image
    _write_sample(tmp_path, "val", "minicity", 1, img, lab, inst, p)
    orphan = _write_sample(tmp_path, "val", "minicity", 2, img, lab, inst, p, skip=("image",))
    with pytest.raises(FileNotFoundError) as e:
        list_cityscapes_files(tmp_path, "val")
    assert orphan["image"] in str(e.value)
    os.remove(orphan["label_ids"]), os.remove(orphan["instance_ids"])
    os.remove(orphan["disparity"]), os.remove(orphan["camera"])
    assert [f["id"] for f in list_cityscapes_files(tmp_path, "val")] == ["minicity_000001_000019"]
    # missing gtFine split folder
    _write_sample(tmp_path, "train", "minicity", 1, img, lab, inst, p)
    shutil.rmtree(tmp_path / "gtFine" / "train")
    with pytest.raises(FileNotFoundError, match=os.path.join("gtFine", "train")):
        list_cityscapes_files(tmp_path, "train")
    # argument errors
    with pytest.raises(ValueError, match="num_classes"):
        load_cityscapes(tmp_path, "val", num_classes=10)
    with pytest.raises(ValueError, match="tasks"):
        load_cityscapes(tmp_path, "val", tasks=("normals",))
    with pytest.raises(ValueError, match="depth_target"):
        load_cityscapes(tmp_path, "val", depth_target="log")


def test_sharding(synth_root):
    ctx = [tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i) for i in range(2)]
    seen = []
    for c in ctx:
        ds = load_cityscapes(synth_root, "train", image_size=(16, 32), batch_size=1, shuffle=False,
                             flip=False, tasks=("depth",), input_context=c)
        seen.append([i.numpy() for i, _ in ds])
    assert [len(s) for s in seen] == [2, 1]
    full = [i.numpy() for i, _ in load_cityscapes(synth_root, "train", image_size=(16, 32), batch_size=1,
                                                  shuffle=False, flip=False, tasks=("depth",))]
    np.testing.assert_array_equal(seen[0][0], full[0])
    np.testing.assert_array_equal(seen[1][0], full[1])


def test_synthetic_set_grows_without_rewriting_its_scenes(tmp_path):
    # An existing default set (the previous default job's size) and a larger request: the existing scenes are kept
    # untouched, the new ones are rendered, and the result equals a set generated at the larger size from scratch.
    grown = generate_synthetic_cityscapes(tmp_path / "grown", num_train=2, num_val=1, height=32, width=64, seed=0)
    kept = os.path.join(grown, _read_tree_keys(grown, "leftImg8bit")[0])
    os.utime(kept, (1, 1))
    generate_synthetic_cityscapes(grown, num_train=4, num_val=2, height=32, width=64, seed=0)
    assert os.path.getmtime(kept) == 1
    fresh = generate_synthetic_cityscapes(tmp_path / "fresh", num_train=4, num_val=2, height=32, width=64, seed=0)
    assert _read_tree(grown) == _read_tree(fresh)
    assert len(list_cityscapes_files(grown, "train")) == 4 and len(list_cityscapes_files(grown, "val")) == 2
    # Another image size is no growth: refused as before.
    with pytest.raises(FileExistsError):
        generate_synthetic_cityscapes(grown, num_train=5, num_val=2, height=32, width=32, seed=0)


def _read_tree_keys(root, kind):
    return sorted(k for k in _read_tree(root) if kind in k and k.endswith(".png"))
