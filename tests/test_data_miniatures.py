"""Builders of miniature datasets in each on-disk format (used by the other test_data_* modules), and tests that
the files they write are what the formats define (read back with independent readers: cv2, h5py, scipy, numpy)."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.io  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from miniature import write_cityscapes_sample, write_mat_v73, write_npy_release, write_nyuv2  # noqa: E402,F401

CAMERA = {"extrinsic": {"baseline": 0.209313, "pitch": 0.0, "roll": 0.0, "yaw": 0.0, "x": 1.7, "y": 0.1, "z": 1.2},
          "intrinsic": {"fx": 2262.52, "fy": 2262.52, "u0": 1024.0, "v0": 512.0}}


def cityscapes_arrays(h, w, seed):
    """One CityScapes sample: RGB image, labelIds, instanceIds (16-bit), disparity (16-bit raw p)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = np.full((h, w), 23, np.uint8)  # sky
    lab[h // 2:] = 7  # road
    lab[h // 2:, : w // 4] = 8  # sidewalk
    lab[0, 0] = 0  # unlabeled
    lab[1, w - 1] = 9  # parking: ignored for 7 categories, 255 for 19 classes
    inst = lab.astype(np.uint16).copy()
    # a car instance (L-shaped), a person, and a cargroup region (labelId 26 without instance number)
    y0, x0 = h // 3, w // 3
    lab[y0:y0 + 3, x0:x0 + 4] = 26
    lab[y0 + 3, x0:x0 + 2] = 26
    inst[lab == 26] = 26000
    lab[h - 2:, w - 3:] = 24
    inst[h - 2:, w - 3:] = 24001
    lab[h - 1, x0 + 5] = 26  # cargroup pixel: no instance
    inst[h - 1, x0 + 5] = 26
    disp = rng.integers(2, 40000, (h, w)).astype(np.uint16)
    disp[lab == 23] = 0  # sky: invalid
    disp[h // 2, w // 2] = 1  # d = 0: infinitely far (valid inverse depth 0, invalid metric depth)
    return image, lab, inst, disp


def write_cityscapes_miniature(root, sizes=(("train", (11, 15)), ("train", (12, 18)), ("train", (11, 15)),
                                            ("val", (13, 17)), ("val", (11, 15))), camera=True):
    """A few samples (odd sizes) in the CityScapes raw layout; returns {split: [(paths, arrays), ...]}."""
    out = {}
    for i, (split, (h, w)) in enumerate(sizes):
        arrays = cityscapes_arrays(h, w, i)
        image, lab, inst, disp = arrays
        paths = write_cityscapes_sample(root, split, "minicity", i, image, lab, inst, disp,
                                        CAMERA if camera else None)
        out.setdefault(split, []).append((paths, arrays))
    return out


def npy_examples(n, h, w, seed, num_classes, normals=True, depth_max=5.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ex = {"image": (rng.integers(0, 256, (h, w, 3)) / 255.0).astype(np.float32),
              "label": rng.integers(-1, num_classes, (h, w)).astype(np.float32),
              "depth": rng.uniform(0.1, depth_max, (h, w, 1)).astype(np.float32)}
        ex["depth"][0, :2] = 0.0  # invalid
        if normals:
            nrm = rng.normal(size=(h, w, 3))
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[1, :3] = 0.0  # invalid
            ex["normal"] = nrm.astype(np.float32)
        out.append(ex)
    return out


def write_nyuv2_npy_miniature(root, sizes=((("train"), (9, 12)), ("train", (9, 12)), ("train", (10, 14)),
                                           ("val", (9, 12)), ("val", (11, 13)))):
    out = {}
    for i, (split, (h, w)) in enumerate(sizes):
        ex = npy_examples(1, h, w, 100 + i, 13)[0]
        start = len(out.get(split, []))
        write_npy_release(root, split, [ex], start=start)
        out.setdefault(split, []).append(ex)
    return out


def write_cityscapes_npy_miniature(root, n_train=3, n_val=2, h=8, w=16, folders=("label_19", "label_7")):
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        exs = npy_examples(n, h, w, 7 if split == "train" else 8, 19, normals=False, depth_max=0.49)
        for folder in folders:
            classes = 19 if folder == "label_19" else 7
            rng = np.random.default_rng(len(folder) + n)
            for i, ex in enumerate(exs):
                write_npy_release(root, split, [{"label": rng.integers(-1, classes, (h, w)).astype(np.float32)}],
                                  label_folder=folder, start=i)
        write_npy_release(root, split, [{k: v for k, v in ex.items() if k != "label"} for ex in exs])
        out[split] = exs
    return out


def nyuv2_arrays(n=6, h=12, w=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3))
    labels = rng.integers(1, 895, (n, h, w))
    labels[:, 0, :] = 0  # unlabeled
    labels[:, 1:4, 1:5] = 5  # one object region
    labels[:, 5:, :] = 1  # wall-ish (class40 of label 1 = 1: wall with the default map) -> stuff
    depths = rng.uniform(0.5, 9.5, (n, h, w)).astype(np.float32)
    depths[:, 0, 0] = 0.0  # invalid
    instances = np.zeros((n, h, w), np.uint8)
    instances[:, 1:4, 1:3] = 1
    instances[:, 1:4, 3:5] = 2
    instances[:, 5:, :] = 1  # a numbered wall: stuff, no instance
    labels[:, 8:, 10:] = 7  # class40 7 (table): an object
    instances[:, 8:, 10:] = 3
    return images, labels, depths, instances


def write_nyuv2_miniature(root, n=6, h=12, w=16, train=(0, 2, 3), test=(1, 4, 5)):
    images, labels, depths, instances = nyuv2_arrays(n, h, w)
    write_nyuv2(root, images, labels, depths, instances, train=list(train), test=list(test))
    return images, labels, depths, instances


def nearest_src(n_out, n_in):
    """TF's nearest-neighbour resize (half-pixel centres), written out: output index -> input index."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)


def resize_nearest(a, h, w):
    return a[nearest_src(h, a.shape[0])][:, nearest_src(w, a.shape[1])]


def collect(ds):
    """Every batch of ``ds`` concatenated: (images, {key: array})."""
    images, targets = [], {}
    for image, t in ds:
        images.append(image.numpy())
        for k, v in t.items():
            targets.setdefault(k, []).append(v.numpy())
    return np.concatenate(images), {k: np.concatenate(v) for k, v in targets.items()}


# ------------------------------------------------------------------------------------------------------------------


def test_cityscapes_writer_formats(tmp_path):
    split = write_cityscapes_miniature(tmp_path)
    paths, (image, lab, inst, disp) = split["train"][1]
    assert cv2.imread(paths["image"], cv2.IMREAD_UNCHANGED).shape == (12, 18, 3)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(paths["image"]), cv2.COLOR_BGR2RGB), image)
    read = cv2.imread(paths["instance_ids"], cv2.IMREAD_UNCHANGED)
    assert read.dtype == np.uint16 and read.max() == 26000
    assert cv2.imread(paths["disparity"], cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert cv2.imread(paths["label_ids"], cv2.IMREAD_UNCHANGED).dtype == np.uint8
    with open(paths["camera"]) as f:
        assert json.load(f)["intrinsic"]["fx"] == 2262.52
    assert os.path.basename(paths["image"]) == "minicity_000001_000019_leftImg8bit.png"


def test_nyuv2_writer_is_matlab_v73_with_reversed_dimensions(tmp_path):
    images, labels, depths, instances = write_nyuv2_miniature(tmp_path)
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    with open(mat, "rb") as f:
        header = f.read(128)
    assert header.startswith(b"MATLAB 7.3 MAT-file") and header[-4:] == b"\x00\x02IM"
    with pytest.raises(NotImplementedError):  # scipy recognises v7.3 and refers to HDF5 readers
        scipy.io.loadmat(str(mat))
    with h5py.File(mat, "r") as f:
        assert f["images"].shape == (6, 3, 16, 12) and f["images"].dtype == np.uint8
        assert f["depths"].shape == (6, 16, 12) and f["labels"].dtype == np.uint16
        np.testing.assert_array_equal(f["images"][2].transpose(2, 1, 0), images[2])
        np.testing.assert_array_equal(f["labels"][4].T, labels[4])
        np.testing.assert_array_equal(f["depths"][1].T, depths[1])
    splits = scipy.io.loadmat(str(tmp_path / "splits.mat"))
    assert splits["trainNdxs"].ravel().tolist() == [1, 3, 4] and splits["testNdxs"].ravel().tolist() == [2, 5, 6]
    m13 = scipy.io.loadmat(str(tmp_path / "class13Mapping.mat"))["classMapping13"]["labels13"][0, 0].ravel()
    assert m13.tolist()[:6] == [12, 5, 6, 1, 4, 9] and len(m13) == 40
    assert scipy.io.loadmat(str(tmp_path / "classMapping40.mat"))["mapClass"].shape == (1, 894)
