"""Writers of small datasets in the exact on-disk formats the loaders read (tests, benchmarks, trying things out).

They only serialise what they are given, the way the real releases store it (see ``datasets/*.md``):

* :func:`write_cityscapes_sample`: the CityScapes raw layout (8-bit RGB image, 8-bit labelIds, 16-bit
  instanceIds and disparity PNGs, camera JSON);
* :func:`write_npy_release`: the pre-processed ``.npy`` release (``{root}/{split}/{field}/{i}.npy``);
* :func:`write_nyuv2`: NYUv2's labeled set as a MATLAB v7.3 (HDF5) file with MATLAB's dimension order and
  128-byte header, plus ``splits.mat``, ``classMapping40.mat`` and ``class13Mapping.mat`` (MATLAB v5).
"""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np

from mtl_keras.labels import NYUV2_40_TO_13

__all__ = ["write_cityscapes_sample", "write_npy_release", "write_nyuv2", "write_mat_v73", "matlab_v73_header"]


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def _as_16bit(array):
    """uint16 unless the caller deliberately passes uint8 (to write a broken, 8-bit file)."""
    array = np.asarray(array)
    return array if array.dtype == np.uint8 else array.astype(np.uint16)


def write_cityscapes_sample(root, split, city, seq, image=None, label_ids=None, instance_ids=None, disparity=None,
                            camera=None, frame=19):
    """Writes the files of one CityScapes sample; returns ``{key: path}`` of what was written.

    ``image`` uint8 HxWx3 RGB; ``label_ids`` uint8 HxW; ``instance_ids`` uint16 HxW; ``disparity`` uint16 HxW (raw
    PNG values p, d = (p - 1) / 256; a uint8 array is written as an 8-bit PNG, as broken copies are); ``camera`` a dict (``{"extrinsic": {...}, "intrinsic": {...}}``).
    """
    root = os.fspath(root)
    stem = f"{city}_{seq:06d}_{frame:06d}"
    paths = {}

    def path(folder, suffix):
        return os.path.join(root, folder, split, city, f"{stem}_{suffix}")

    if image is not None:
        paths["image"] = path("leftImg8bit", "leftImg8bit.png")
        _write_png(paths["image"], cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR))
    if label_ids is not None:
        paths["label_ids"] = path("gtFine", "gtFine_labelIds.png")
        _write_png(paths["label_ids"], np.asarray(label_ids, np.uint8))
    if instance_ids is not None:
        paths["instance_ids"] = path("gtFine", "gtFine_instanceIds.png")
        _write_png(paths["instance_ids"], _as_16bit(instance_ids))
    if disparity is not None:
        paths["disparity"] = path("disparity", "disparity.png")
        _write_png(paths["disparity"], _as_16bit(disparity))
    if camera is not None:
        paths["camera"] = path("camera", "camera.json")
        os.makedirs(os.path.dirname(paths["camera"]), exist_ok=True)
        with open(paths["camera"], "w") as f:
            json.dump(camera, f)
    return paths


def write_npy_release(root, split, examples, label_folder="label", start=0):
    """Writes ``examples`` (dicts with any of ``image``, ``label``, ``depth``, ``normal``: arrays saved as given,
    dtype included) to ``{root}/{split}/{field}/{i}.npy``; ``label`` goes to ``label_folder``. Returns the paths."""
    out = []
    for i, example in enumerate(examples, start=start):
        paths = {}
        for field, array in example.items():
            folder = label_folder if field == "label" else field
            d = os.path.join(os.fspath(root), split, folder)
            os.makedirs(d, exist_ok=True)
            paths[field] = os.path.join(d, f"{i}.npy")
            np.save(paths[field], array)
        out.append(paths)
    return out


def matlab_v73_header(text="MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {date} HDF5 schema 1.00 ."):
    """MATLAB's 128-byte v7.3 header: 116 bytes of text, 8 bytes of subsystem offset, version 0x0200, 'IM'."""
    text = text.format(date=time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(0))).encode("ascii")
    return text.ljust(116, b" ")[:116] + b" " * 8 + b"\x00\x02" + b"IM"


def write_mat_v73(path, datasets):
    """An HDF5 file with a 512-byte user block holding MATLAB's v7.3 header (scipy then recognises it as v7.3).

    ``datasets``: ``{name: array}`` written as given (pass arrays already in h5py's, i.e. reversed, order).
    """
    import h5py

    path = os.fspath(path)
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, array in datasets.items():
            f.create_dataset(name, data=array)
    with open(path, "r+b") as f:
        f.write(matlab_v73_header())
    return path


def write_nyuv2(root, images, labels=None, depths=None, instances=None, train=None, test=None, map40=None,
                map13=None, mat_name="nyu_depth_v2_labeled.mat"):
    """Writes a miniature NYUv2 labeled set in ``root``; arrays are given as HxW(xC) per image (numpy order).

    ``images`` (N, H, W, 3) uint8 -> ``images`` (N, 3, W, H); ``labels`` (N, H, W) uint16, ``depths`` float32,
    ``instances`` uint8 -> (N, W, H). ``train`` / ``test``: 0-based indices (saved 1-based as ``trainNdxs`` /
    ``testNdxs``, column vectors). ``map40``: 894 ints (default ``1 + (label - 1) % 40``); ``map13``: 40 ints
    (default the standard 40 -> 13 map). Returns ``root``.
    """
    from scipy.io import savemat

    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    images = np.asarray(images, np.uint8)
    n = images.shape[0]
    datasets = {"images": images.transpose(0, 3, 2, 1)}
    if labels is not None:
        datasets["labels"] = np.asarray(labels, np.uint16).transpose(0, 2, 1)
    if depths is not None:
        datasets["depths"] = np.asarray(depths, np.float32).transpose(0, 2, 1)
    if instances is not None:
        datasets["instances"] = np.asarray(instances, np.uint8).transpose(0, 2, 1)
    write_mat_v73(os.path.join(root, mat_name), datasets)
    train = np.arange(n // 2) if train is None else np.asarray(train)
    test = np.arange(n // 2, n) if test is None else np.asarray(test)
    savemat(os.path.join(root, "splits.mat"), {"trainNdxs": (train + 1).reshape(-1, 1).astype(np.float64),
                                               "testNdxs": (test + 1).reshape(-1, 1).astype(np.float64)})
    map40 = 1 + np.arange(894) % 40 if map40 is None else np.asarray(map40)
    savemat(os.path.join(root, "classMapping40.mat"), {"mapClass": map40.reshape(1, -1).astype(np.float64)})
    map13 = np.asarray(NYUV2_40_TO_13 if map13 is None else map13)
    savemat(os.path.join(root, "class13Mapping.mat"),
            {"classMapping13": {"labels13": map13.reshape(1, -1).astype(np.uint8),
                                "names": np.array(["c"] * 13, dtype=object)}})
    return root
