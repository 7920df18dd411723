"""The CityScapes raw layout (real CityScapes and the synthetic set; ``datasets/cityscapes.md``): listing, header
checks, the tf.data decode step (TF ops only, so the pipeline is deterministic under ``seed``) and ``--check``. The
test split's labels are withheld: its void ``gtFine`` files load as "ignore everywhere", and absent ``gtFine/test``
or ``disparity/test`` folders mask those targets out."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np

from mtl_keras.data.checks import (PNG_IEND, DataError, SplitReport, check_headers, check_image_size, check_png,
                                   check_rows, check_tasks, decode_png_file, error_message, pair_files)
from mtl_keras.data.pipeline import Source, resize_image, resize_nearest
from mtl_keras.labels import known_label_mask, label_lookup_table
from mtl_keras.tasks import IGNORE_LABEL

log = logging.getLogger("mtl_keras")

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
# what each label PNG must be (single-channel): (description, bit depth)
_PNG_EXPECT = {"label_ids": ("labelIds", 8), "instance_ids": ("instanceIds", 16), "disparity": ("disparity", 16)}
# folders that may be absent for the test split, whose labels CityScapes withholds
_WITHHELD_ON_TEST = ("label_ids", "instance_ids", "disparity", "camera")
# the file of each task's target (metric depth needs "camera" as well)
_TASK_FILES = {"semantic": "label_ids", "instance": "instance_ids", "depth": "disparity"}


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
    return {(os.path.basename(os.path.dirname(p)), os.path.basename(p)[: -len(suffix) - 1]): p for p in files}


def list_cityscapes_files(data_dir, split: str = "train", require=_ALL_KEYS, check: bool = False,
                          optional=(), problems=None) -> list[dict]:
    """The samples of a split sorted by (city, stem): dicts with ``"id"`` (``city_seq_frame``), ``"city"`` and a path
    per key of ``require`` (keys of ``FILE_TYPES``; ``"image"`` always). ``optional``: keys whose whole
    ``{type}/{split}`` folder may be absent (then left out). ``check``: also read every PNG's header. ``problems``:
    see ``checks.pair_files``."""
    data_dir = os.fspath(data_dir)
    require = tuple(dict.fromkeys(("image",) + tuple(require)))
    unknown = [k for k in require if k not in FILE_TYPES]
    if unknown:
        raise ValueError(f"require must be a subset of {_ALL_KEYS}, got unknown {unknown}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CityScapes root folder {data_dir} does not exist")
    images = _scan(data_dir, split, "image")
    if not images:
        raise ValueError(f"empty split {split!r}: no *_{FILE_TYPES['image'][1]} files in the city folders of "
                         f"{_split_dir(data_dir, split, 'image')}")
    found = {k: _scan(data_dir, split, k) for k in require[1:]
             if not (k in optional and not os.path.isdir(_split_dir(data_dir, split, k)))}

    def expected(key, city_stem):
        folder, suffix = FILE_TYPES[key]
        return os.path.join(data_dir, folder, split, city_stem[0], f"{city_stem[1]}_{suffix}")

    keys = pair_files(images, found, expected, lambda city_stem: expected("image", city_stem), problems)
    out = [dict({"id": k[1], "city": k[0], "image": images[k]}, **{key: v[k] for key, v in found.items()})
           for k in keys]
    if check:
        check_cityscapes_files(out)
    return out


def list_task_files(data_dir, split, tasks, check_files, metric_depth=False):
    """The samples of a split with the files of ``tasks``; the test split's withheld label folders may be absent
    (their targets are then masked out, with a warning)."""
    require = ["image"] + [_TASK_FILES[t] for t in TASKS if t in tasks]
    if metric_depth and "depth" in tasks:
        require.append("camera")
    files = list_cityscapes_files(data_dir, split, require, check_files, _WITHHELD_ON_TEST if split == "test" else ())
    withheld = [k for k in require if k not in files[0]]
    if withheld:
        log.warning("CityScapes %s: no %s folder(s) for the test split (CityScapes withholds test labels): "
                    "those targets are masked out everywhere", data_dir,
                    ", ".join(os.path.join(FILE_TYPES[k][0], split) for k in withheld))
    return files


def check_cityscapes_files(files) -> dict:
    return check_headers(files, _PNG_EXPECT)


def _read_baseline_fx(camera_path: str) -> float:
    try:
        with open(camera_path, encoding="utf-8") as f:
            cam = json.load(f)
        baseline_fx = float(cam["extrinsic"]["baseline"]) * float(cam["intrinsic"]["fx"])
        if not 0 < baseline_fx < float("inf"):  # json reads NaN and Infinity; depth = baseline * fx / disparity
            raise ValueError(f"baseline * fx = {baseline_fx}, expected a positive number")
        return baseline_fx
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(
            f"cannot read extrinsic.baseline and intrinsic.fx from {camera_path} (expected the CityScapes "
            f"camera.json: {{\"extrinsic\": {{\"baseline\", ...}}, \"intrinsic\": {{\"fx\", ...}}}}): "
            f"{' '.join(str(e).split())[:200]}") from e


def read_png(path, what, bit_depth=None):
    """The bytes of a PNG, with in-graph checks that name the file: complete (IEND at its end), bit depth."""
    import tensorflow as tf

    contents = tf.io.read_file(path)
    n = tf.strings.length(contents)
    checks = [tf.debugging.Assert(
        tf.logical_and(n >= 45, tf.equal(tf.strings.substr(contents, tf.maximum(n - 12, 0), 12), PNG_IEND)),
        [f"truncated or corrupt {what} PNG (no IEND chunk at its end):", path])]
    if bit_depth is not None:
        depth = tf.strings.substr(contents, 24, 1)
        checks.append(tf.debugging.Assert(
            tf.equal(depth, bytes([bit_depth])),
            [f"expected a {bit_depth}-bit {what} PNG:", path, "has bit depth",
             tf.io.decode_raw(depth, tf.uint8)]))
    with tf.control_dependencies(checks):
        return tf.identity(contents)


def _decode_stage(tasks, image_size, num_classes, depth_target, present):
    """Decoding, resizing and label mapping -> a prepared example (``mtl_keras.data.pipeline``)."""
    import tensorflow as tf

    h, w = image_size
    lut = tf.constant(label_lookup_table(num_classes), dtype=tf.uint8)
    known_np = known_label_mask()
    max_known = int(np.nonzero(known_np)[0].max())
    assert known_np[: max_known + 1].all(), "the fast label check assumes contiguous known ids"
    known = tf.constant(known_np)

    def fn(elem):
        out = {}
        out["image"] = resize_image(tf.io.decode_png(read_png(elem["image"], "image"), channels=3), (h, w))
        if "semantic" in tasks:
            if "label_ids" in present:
                path = elem["label_ids"]
                ids = tf.io.decode_png(read_png(path, "labelIds", 8), channels=1, dtype=tf.uint8)
                # known ids are 0..33: one max tells whether the file is clean; the histogram (30 ms on a full-size
                # map) is only computed to name the unknown ids of a bad file
                top = tf.cast(tf.reduce_max(ids), tf.int32)

                def unknown_ids():
                    hist = tf.math.bincount(tf.reshape(tf.cast(ids, tf.int32), [-1]), minlength=256, maxlength=256)
                    return tf.where(tf.logical_and(hist > 0, tf.logical_not(known)))[:, 0]

                bad = tf.cond(top > max_known, unknown_ids, lambda: tf.zeros([0], tf.int64))
                check = tf.debugging.Assert(
                    tf.equal(tf.size(bad), 0),
                    ["unknown CityScapes labelId(s) (not in cityscapesscripts' table, ids 0..33) in labelIds "
                     "file", path, "unknown ids:", bad], summarize=20)
                with tf.control_dependencies([check]):
                    ids = tf.identity(ids)
                sem = tf.gather(lut, tf.cast(resize_nearest(ids, (h, w))[..., 0], tf.int32))
            else:  # withheld test labels: ignore everywhere
                sem = tf.fill((h, w), tf.constant(IGNORE_LABEL, tf.uint8))
            out["semantic"] = tf.ensure_shape(sem, (h, w))
        if "instance" in tasks:
            if "instance_ids" in present:
                inst = tf.io.decode_png(read_png(elem["instance_ids"], "instanceIds", 16), channels=1,
                                        dtype=tf.uint16)
                inst = tf.cast(resize_nearest(inst, (h, w))[..., 0], tf.int32)
                inst = tf.where(inst >= 1000, inst, 0)  # plain labelIds (incl. groups) are no instance
            else:
                inst = tf.zeros((h, w), tf.int32)
            out["instance_ids"] = tf.ensure_shape(inst, (h, w))
        if "depth" in tasks:
            if "disparity" in present and (depth_target == "inverse" or "baseline_fx" in elem):
                raw = tf.io.decode_png(read_png(elem["disparity"], "disparity", 16), channels=1, dtype=tf.uint16)
                depth = disparity_depth(raw, (h, w), elem.get("baseline_fx"))
            else:
                depth = tf.fill((h, w, 1), float("nan"))
            out["depth"] = tf.ensure_shape(depth, (h, w, 1))
        return out

    return fn


def disparity_depth(raw, image_size, baseline_fx=None):
    """A decoded 16-bit disparity PNG ``raw`` (``d = (p - 1) / 256`` px, ``p == 0`` invalid) at ``image_size``:
    float32 HxWx1, NaN where invalid; inverse depth in px at the training width, or metres given ``baseline_fx``."""
    import tensorflow as tf

    h, w = image_size
    png_width = tf.cast(tf.shape(raw)[1], tf.float32)
    p = tf.cast(resize_nearest(raw, (h, w)), tf.float32)
    d = (p - 1.0) / 256.0  # disparity in px at the PNG's (full) resolution
    if baseline_fx is None:
        valid = p > 0
        value = d * (float(w) / png_width)  # px at the training width
    else:  # metric depth in metres; d == 0 (p == 1) is at infinity -> invalid
        valid = p > 1
        value = baseline_fx / tf.where(valid, d, 1.0)
    return tf.where(valid, value, float("nan"))


def cityscapes_source(data_dir, split="train", image_size=(128, 256), num_classes=19,
                      tasks=("semantic", "instance", "depth"), depth_target="inverse", check_files=True,
                      dataset_name="cityscapes") -> Source:
    """The rows and decode function of a CityScapes-layout split (see ``mtl_keras.data.pipeline.Source``)."""
    tasks = check_tasks(tasks, TASKS, dataset_name)
    if depth_target not in ("inverse", "metric"):
        raise ValueError(f"depth_target must be 'inverse' or 'metric', got {depth_target!r}")
    label_lookup_table(num_classes)  # validates num_classes
    h, w = check_image_size(image_size)

    files = list_task_files(data_dir, split, tasks, check_files, metric_depth=depth_target == "metric")
    present = set(files[0])
    columns = {k: [f[k] for f in files] for k in files[0] if k not in ("id", "city", "camera")}
    if depth_target == "metric" and "depth" in tasks and "camera" in present:
        columns["baseline_fx"] = np.array([_read_baseline_fx(f["camera"]) for f in files], np.float32)
    return Source(columns=columns, decode=_decode_stage(tasks, (h, w), num_classes, depth_target, present),
                  num_examples=len(files), tasks=tasks, image_size=(h, w),
                  depth_scales_with_zoom=depth_target == "inverse")


def _check_cityscapes_entry(entry, num_classes):
    """Decodes every file of one sample; returns (counts, [(path, message)])."""
    errors, out = [], {"pixels": 0, "labelled_pixels": 0, "depth_pixels": 0, "valid_depth_pixels": 0,
                       "instances": 0, "void": None, "size": None}
    try:
        info = check_png(entry["image"], "image")
        decode_png_file(entry["image"])
        size = (info.width, info.height)
        out["size"] = size
    except (DataError, OSError) as e:
        return out, [(entry["image"], error_message(e))]
    known = known_label_mask()
    lab = None
    for key, (what, depth) in _PNG_EXPECT.items():
        if key not in entry:
            continue
        path = entry[key]
        try:
            check_png(path, what, bit_depth=depth, grey=True, size=size)
            arr = decode_png_file(path, "uint8" if depth == 8 else "uint16")[..., 0].astype(np.int64)
        except (DataError, OSError) as e:
            errors.append((path, error_message(e)))
            continue
        if key == "label_ids":
            bad = np.unique(arr[~known[np.minimum(arr, 255)]])
            if bad.size:
                errors.append((path, f"{path}: labelId(s) {bad.tolist()} are not in cityscapesscripts' label table "
                                     f"(expected ids 0..33)"))
                continue
            lab = arr
            train = label_lookup_table(num_classes)[arr]
            out["pixels"] += arr.size
            out["labelled_pixels"] += int((train != 255).sum())
            out["void"] = bool(np.all(train == 255))
        elif key == "instance_ids":
            is_inst = arr >= 1000
            plain = np.where(is_inst, arr // 1000, arr)
            bad = np.unique(plain[(plain > 255) | ~known[np.minimum(plain, 255)]])
            if bad.size:
                errors.append((path, f"{path}: instanceIds hold labelId(s) {bad.tolist()} that are not in the "
                                     f"table (expected labelId * 1000 + k on instances, labelId elsewhere)"))
                continue
            out["instances"] += len(np.unique(arr[is_inst]))
            if lab is not None and lab.shape == arr.shape and np.any(plain != lab):
                errors.append((path, f"{path}: instanceIds disagree with {entry['label_ids']} at "
                                     f"{int((plain != lab).sum())} pixel(s) (expected labelId = instanceId // 1000 "
                                     f"on instances)"))
        else:
            out["depth_pixels"] += arr.size
            out["valid_depth_pixels"] += int((arr > 0).sum())
    if "camera" in entry:
        try:
            _read_baseline_fx(entry["camera"])
        except ValueError as e:
            errors.append((entry["camera"], str(e)))
    return out, errors


def validate_split(data_dir, split, num_classes, tasks, workers=4, max_errors=20, depth_target=None):
    """Every file of a split decoded and checked (``prepare_data.py --check``). Camera files are read by training only
    for metric depth: otherwise an unreadable one is a note, not an error."""
    if not os.path.isdir(_split_dir(data_dir, split, "image")):
        return SplitReport(split, missing=True)
    report = SplitReport(split)
    # the files of each task, the labelIds that instanceIds are checked against, and the disparity's camera files
    require = ["image"] + [_TASK_FILES[t] for t in TASKS if t in tasks]
    if "instance_ids" in require and "label_ids" not in require:
        require.insert(require.index("instance_ids"), "label_ids")
    if "disparity" in require:
        require.insert(require.index("disparity") + 1, "camera")
    optional = _WITHHELD_ON_TEST if split == "test" else ("camera",)
    problems = []  # every missing or orphan file of the split, not only the first
    try:
        files = list_cityscapes_files(data_dir, split, require=require, optional=optional, problems=problems)
    except (OSError, ValueError) as e:
        report.errors.append((_split_dir(data_dir, split, "image"), error_message(e)))
        return report
    report.errors.extend(problems)
    if not files:
        return report
    absent = [k for k in require if k not in files[0]]
    if absent:
        report.notes.append("no " + ", ".join(os.path.join(FILE_TYPES[k][0], split) for k in absent)
                            + (" (CityScapes withholds test labels)" if split == "test" else ""))

    def check(entry):
        out, errors = _check_cityscapes_entry(entry, num_classes)
        if depth_target != "metric":  # unread by training: noted, not an error
            out["camera_notes"] = [m for p, m in errors if p == entry.get("camera")]
            errors = [(p, m) for p, m in errors if p != entry.get("camera")]
        return out, errors

    seen = check_rows(report, files, check, workers, max_errors)
    camera_notes = [m for out in seen for m in out.get("camera_notes", ())]
    if camera_notes:
        report.notes.append(f"{len(camera_notes)} unreadable camera file(s), e.g. {camera_notes[0]}; training reads "
                            f"them only for --depth_target metric")
    if "label_ids" in files[0] and seen and all(out["void"] is True for out in seen):
        report.notes.append("all labels are void (ignored everywhere)" + (
            ": the official test split withholds its labels" if split == "test" else
            ": this split cannot train or score semantics"))
    return report


def count(data_dir, split):
    return len(list_cityscapes_files(data_dir, split))
