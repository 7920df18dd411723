"""The CityScapes raw layout on disk, without TensorFlow: file types, listing a split, header checks, camera.json.

Shared by the tf.data loader (``mtl_keras.data.cityscapes``), the TensorFlow-free loader
(``mtl_keras.data.numpy_loader``), ``prepare_data --check`` and the evaluation script.
"""

from __future__ import annotations

import glob
import json
import os

from mtl_keras.data.checks import check_png

TASKS = ("semantic", "instance", "depth")

# key -> (type folder, suffix)
FILE_TYPES = {
    "image": ("leftImg8bit", "leftImg8bit.png"),
    "label_ids": ("gtFine", "gtFine_labelIds.png"),
    "instance_ids": ("gtFine", "gtFine_instanceIds.png"),
    "disparity": ("disparity", "disparity.png"),
    "camera": ("camera", "camera.json"),
}
_ALL_KEYS = tuple(FILE_TYPES)
# What each PNG must be: (description, bit depth, single channel)
_PNG_EXPECT = {
    "label_ids": ("labelIds", 8, True),
    "instance_ids": ("instanceIds", 16, True),
    "disparity": ("disparity", 16, True),
}
# Folders that may be absent for the test split, whose labels CityScapes withholds.
_WITHHELD_ON_TEST = ("label_ids", "instance_ids", "disparity", "camera")


def _stem(path: str, suffix: str) -> str:
    name = os.path.basename(path)
    return name[: -len(suffix) - 1]  # strip "_" + suffix


def _split_dir(data_dir, split, key):
    return os.path.join(data_dir, FILE_TYPES[key][0], split)


def _scan(data_dir: str, split: str, key: str) -> dict:
    folder, suffix = FILE_TYPES[key]
    split_dir = _split_dir(data_dir, split, key)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"missing folder {split_dir}: expected {folder}/{split}/{{city}}/"
            f"{{city}}_{{seq}}_{{frame}}_{suffix} files under the CityScapes root {data_dir}")
    files = glob.glob(os.path.join(glob.escape(split_dir), "*", f"*_{suffix}"))
    return {(os.path.basename(os.path.dirname(p)), _stem(p, suffix)): p for p in files}


def list_cityscapes_files(data_dir, split: str = "train", require=_ALL_KEYS, check: bool = False,
                          optional=(), problems=None) -> list[dict]:
    """Lists the samples of a split of a CityScapes-layout folder.

    Returns a list sorted by (city, stem) of dicts with keys ``"id"`` (``city_seq_frame``),
    ``"city"`` and one path per key in ``require`` (any of ``"image"``, ``"label_ids"``,
    ``"instance_ids"``, ``"disparity"``, ``"camera"``; ``"image"`` is always included).

    Raises ``FileNotFoundError`` naming the folder when the root or a required
    ``{type}/{split}`` folder is missing, or naming the file when an image lacks one of its
    required files (or a required file has no image); ``ValueError`` for an empty split or an
    unknown key. ``optional``: keys whose whole ``{type}/{split}`` folder may be absent (they are then left
    out of the entries). ``check``: also read every PNG's header (:func:`check_cityscapes_files`).
    ``problems``: a list to collect every missing or orphan file in, as ``(path, message)``, instead of raising at
    the first; images lacking a required file are then left out (``prepare_data.py --check`` lists them all).
    """
    data_dir = os.fspath(data_dir)
    require = tuple(dict.fromkeys(("image",) + tuple(require)))
    unknown = [k for k in require if k not in FILE_TYPES]
    if unknown:
        raise ValueError(f"require must be a subset of {_ALL_KEYS}, got unknown {unknown}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CityScapes root folder {data_dir} does not exist")
    images = _scan(data_dir, split, "image")
    if not images:
        folder = os.path.join(data_dir, FILE_TYPES["image"][0], split)
        raise ValueError(
            f"empty split {split!r}: no *_{FILE_TYPES['image'][1]} files in the city folders "
            f"of {folder}")
    require = tuple(k for k in require
                    if not (k in optional and not os.path.isdir(_split_dir(data_dir, split, k))))
    found = {"image": images}
    found.update({k: _scan(data_dir, split, k) for k in require[1:]})
    incomplete = set()
    for key in require[1:]:
        folder, suffix = FILE_TYPES[key]
        missing = sorted(set(images) - set(found[key]))
        for city, stem in missing:
            expected = os.path.join(data_dir, folder, split, city, f"{stem}_{suffix}")
            message = (f"image {images[(city, stem)]} has no {key} file: expected {expected} "
                       f"({len(missing)} image(s) of split {split!r} lack their {suffix})")
            if problems is None:
                raise FileNotFoundError(message)
            problems.append((expected, f"{expected}: missing {key} file (its image: {images[(city, stem)]})"))
            incomplete.add((city, stem))
        orphans = sorted(set(found[key]) - set(images))
        for city, stem in orphans:
            expected = os.path.join(data_dir, FILE_TYPES["image"][0], split, city,
                                    f"{stem}_{FILE_TYPES['image'][1]}")
            message = (f"{key} file {found[key][(city, stem)]} has no image: expected {expected} "
                       f"({len(orphans)} {suffix} file(s) of split {split!r} without an image)")
            if problems is None:
                raise FileNotFoundError(message)
            problems.append((found[key][(city, stem)],
                             f"{found[key][(city, stem)]}: {key} file without an image (expected {expected})"))
    out = []
    for city_stem in sorted(set(images) - incomplete):
        entry = {"id": city_stem[1], "city": city_stem[0]}
        entry.update({k: found[k][city_stem] for k in require})
        out.append(entry)
    if check:
        check_cityscapes_files(out)
    return out


def check_cityscapes_files(files) -> dict:
    """Reads the header of every PNG of ``files`` (entries of :func:`list_cityscapes_files`), no decoding.

    Checks: each file is a complete PNG (signature, IHDR, final IEND: catches truncated downloads), labelIds are
    8-bit grey, instanceIds and disparity 16-bit grey, and every label map has its image's size. Raises
    :class:`mtl_keras.data.checks.DataError` naming the first bad file. Returns ``{(width, height): count}`` of
    the images.
    """
    sizes = {}
    for entry in files:
        info = check_png(entry["image"], "image")
        size = (info.width, info.height)
        sizes[size] = sizes.get(size, 0) + 1
        for key, (what, depth, grey) in _PNG_EXPECT.items():
            if key in entry:
                check_png(entry[key], what, bit_depth=depth, grey=grey, size=size)
    return sizes


def _read_baseline_fx(camera_path: str) -> float:
    try:
        with open(camera_path) as f:
            cam = json.load(f)
        return float(cam["extrinsic"]["baseline"]) * float(cam["intrinsic"]["fx"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read extrinsic.baseline and intrinsic.fx from {camera_path} (expected the CityScapes "
            f"camera.json: {{\"extrinsic\": {{\"baseline\", ...}}, \"intrinsic\": {{\"fx\", ...}}}}): {e}") from e
