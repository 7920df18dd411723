"""A user's own data in plain folders (``--dataset folder``; layout and classes file in ``datasets/folder.md``):
``DIR/classes.json`` (or ``classes.csv``) and ``DIR/{split}/images/STEM.png|jpg`` with, per task present,
``semantic/STEM.png`` (uint8 class ids), ``instance/STEM.png`` (uint16 ids, 0 = none) and ``depth/STEM.png``
(CityScapes' uint16 disparity encoding)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import cv2
import numpy as np

from mtl_keras.data.checks import (DataError, SplitReport, check_headers, check_image_size, check_jpeg_end, check_rows,
                                   check_tasks, error_message, imread_label, imread_png, pair_files)
from mtl_keras.data.cityscapes import disparity_depth, read_png
from mtl_keras.data.pipeline import Source, resize_image, resize_nearest
from mtl_keras.labels import IGNORE_INDEX

TASKS = ("semantic", "instance", "depth")
# task -> (subfolder, what, bit depth)
FOLDERS = {"semantic": ("semantic", "semantic label", 8), "instance": ("instance", "instance id", 16),
           "depth": ("depth", "disparity", 16)}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class Classes:
    names: tuple
    colors: np.ndarray  # uint8 (C, 3)
    instance_ids: tuple  # the class ids whose pixels carry instances
    ignore_label: int = IGNORE_INDEX


def _classes_error(path, problem):
    return DataError(f"{path}: {problem}; expected {{\"classes\": [{{\"name\": str, \"color\": [r, g, b], "
                     f"\"instances\": bool}}, ...], \"ignore_label\": 255}} (or classes.csv: name,r,g,b,instances)")


def _class_rows(path):
    """``[(name, colour, instances)]`` and the ignore label of a classes file."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark of spreadsheets' UTF-8 CSV
        if not path.endswith(".json"):
            try:  # a short row has None in its missing columns
                return [(r["name"], [int(r[c]) for c in "rgb"], (r.get("instances") or "0").strip() in ("1", "true"))
                        for r in csv.DictReader(f)], IGNORE_INDEX
            except (KeyError, TypeError, ValueError, AttributeError, csv.Error) as e:
                raise _classes_error(path, f"a row lacks a whole-number r, g or b, or a name ({e})") from None
        spec = json.load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list):
        raise _classes_error(path, "no list \"classes\"")
    return ([(c.get("name"), c.get("color"), c.get("instances", False)) if isinstance(c, dict) else (None,) * 3
             for c in spec["classes"]], spec.get("ignore_label", IGNORE_INDEX))


def read_classes(data_dir) -> Classes:
    """The classes of a folder dataset from ``classes.json`` (else ``classes.csv``); errors name the file."""
    for name in ("classes.json", "classes.csv"):
        path = os.path.join(os.fspath(data_dir), name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"missing {os.path.join(os.fspath(data_dir), 'classes.json')} (or classes.csv): a "
                                f"folder dataset names its classes there (see datasets/folder.md)")
    try:
        rows, ignore = _class_rows(path)
    except DataError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise _classes_error(path, f"cannot read it ({' '.join(str(e).split())[:200]})") from None
    if not rows:
        raise _classes_error(path, "no class")

    def is_int(v):  # JSON's true / false are Python ints: not a colour value nor a label
        return isinstance(v, int) and not isinstance(v, bool)

    for i, (name, color, instances) in enumerate(rows):
        if not isinstance(name, str) or not isinstance(color, (list, tuple)) or len(color) != 3 \
                or not all(is_int(v) and 0 <= v <= 255 for v in color):
            raise _classes_error(path, f"class {i} needs a name and a colour [r, g, b] in 0..255")
        if not isinstance(instances, bool):
            raise _classes_error(path, f"class {i}: \"instances\" must be true or false, got {instances!r}")
    if not is_int(ignore) or not len(rows) <= ignore <= 255:
        raise _classes_error(path, f"ignore_label {ignore!r} must be an int in {len(rows)}..255 (not a class id)")
    return Classes(tuple(r[0] for r in rows), np.array([r[1] for r in rows], np.uint8),
                   tuple(i for i, r in enumerate(rows) if r[2]), ignore)


def folder_tasks(data_dir, split="train"):
    """The tasks whose subfolder exists in ``DIR/split``."""
    return tuple(t for t in TASKS if os.path.isdir(os.path.join(os.fspath(data_dir), split, FOLDERS[t][0])))


def list_folder_files(data_dir, split="train", tasks=TASKS, problems=None, check=False):
    """``[{"id": stem, "image": path, task: path, ...}]`` sorted by stem (``problems``: ``checks.pair_files``).
    ``check``: also read the label PNGs' headers (complete, bit depth, grey, the image's size)."""
    split_dir = os.path.join(os.fspath(data_dir), split)
    image_dir = os.path.join(split_dir, "images")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"missing folder {image_dir}: a folder dataset has {split}/images/STEM.png|jpg "
                                f"(see datasets/folder.md)")
    images = {os.path.splitext(n)[0]: os.path.join(image_dir, n) for n in sorted(os.listdir(image_dir))
              if n.lower().endswith(IMAGE_EXTENSIONS)}
    if not images:
        raise ValueError(f"empty split {split!r}: no .png / .jpg image in {image_dir}")
    found = {}
    for task in tasks:
        folder = os.path.join(split_dir, FOLDERS[task][0])
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing folder {folder}: the {task} task needs "
                                    f"{split}/{FOLDERS[task][0]}/STEM.png for each image")
        found[task] = {os.path.splitext(n)[0]: os.path.join(folder, n) for n in os.listdir(folder)
                       if n.lower().endswith(".png")}
    stems = pair_files(images, found, lambda task, stem: os.path.join(split_dir, FOLDERS[task][0], stem + ".png"),
                       lambda stem: f"{os.path.join(image_dir, stem)}.png or .jpg", problems)
    files = [dict({"id": s, "image": images[s]}, **{t: found[t][s] for t in tasks}) for s in stems]
    if check:
        check_headers(files, {t: FOLDERS[t][1:] for t in TASKS})
    return files


def label_table(classes):
    """(uint8 lookup table: class ids stay, all else -> 255; bool table of the valid values: ids, ignore label)."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[: len(classes.names)] = np.arange(len(classes.names))
    valid = np.zeros(256, bool)
    valid[: len(classes.names)] = valid[classes.ignore_label] = True
    return lut, valid


def _decode_stage(tasks, image_size, classes):
    import tensorflow as tf

    h, w = image_size
    lut, valid = (tf.constant(t) for t in label_table(classes))

    def same_size(x, image, path, what):
        check = tf.debugging.Assert(tf.reduce_all(tf.equal(tf.shape(x)[:2], tf.shape(image)[:2])), [
            f"{what} PNG of another size than its image:", path, tf.shape(x)[:2], "image", tf.shape(image)[:2]])
        with tf.control_dependencies([check]):
            return tf.identity(x)

    def fn(row):
        image = tf.io.decode_image(tf.io.read_file(row["image"]), channels=3, expand_animations=False)
        out = {"image": resize_image(image, (h, w))}
        if "semantic" in tasks:
            lab = tf.io.decode_png(read_png(row["semantic"], "semantic label", 8), channels=1, dtype=tf.uint8)
            bad = tf.boolean_mask(lab, tf.logical_not(tf.gather(valid, tf.cast(lab, tf.int32))))
            check = tf.debugging.Assert(tf.equal(tf.size(bad), 0), [
                f"semantic label values outside 0..{len(classes.names) - 1} and the ignore label "
                f"{classes.ignore_label} in", row["semantic"], "values:", bad], summarize=10)
            with tf.control_dependencies([check]):
                lab = resize_nearest(same_size(lab, image, row["semantic"], "semantic label"), (h, w))[..., 0]
            out["semantic"] = tf.ensure_shape(tf.gather(lut, tf.cast(lab, tf.int32)), (h, w))
        if "instance" in tasks:
            inst = tf.io.decode_png(read_png(row["instance"], "instance id", 16), channels=1, dtype=tf.uint16)
            inst = resize_nearest(same_size(inst, image, row["instance"], "instance id"), (h, w))[..., 0]
            out["instance_ids"] = tf.ensure_shape(tf.cast(inst, tf.int32), (h, w))
        if "depth" in tasks:
            disp = tf.io.decode_png(read_png(row["depth"], "disparity", 16), channels=1, dtype=tf.uint16)
            disp = same_size(disp, image, row["depth"], "disparity")
            out["depth"] = tf.ensure_shape(disparity_depth(disp, (h, w)), (h, w, 1))
        return out

    return fn


def read_image(path):
    """An RGB PNG or JPG as uint8 HxWx3 BGR (OpenCV's order); DataError naming the file if it is truncated or
    corrupt."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if path.lower().endswith(".png"):
        return imread_png(path, flags)
    with open(path, "rb") as f:
        data = f.read()
    check_jpeg_end(path, data)  # OpenCV returns a truncated JPEG greyed out, without an error
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise DataError(f"{path}: cannot decode the image (expected an RGB PNG or JPG)")
    return image


def checked_num_classes(data_dir, classes, num_classes):
    if num_classes is None:
        return len(classes.names)
    if int(num_classes) != len(classes.names):
        raise ValueError(f"the folder dataset {data_dir} has {len(classes.names)} classes (its classes file), not "
                         f"num_classes={num_classes}: pass --num_classes {len(classes.names)}")
    return int(num_classes)


def folder_source(data_dir, split="train", image_size=(128, 256), num_classes=None, tasks=None,
                  depth_target="inverse", check_files=True) -> Source:
    """The rows and decode function of a split of a folder dataset (``mtl_keras.data.pipeline.Source``)."""
    if depth_target != "inverse":
        raise ValueError(f"a folder dataset holds disparity (inverse depth): depth_target must be 'inverse', got "
                         f"{depth_target!r}")
    classes = read_classes(data_dir)
    checked_num_classes(data_dir, classes, num_classes)
    present = folder_tasks(data_dir)
    tasks = check_tasks(present if tasks is None else tasks, present, f"the folder dataset {data_dir}")
    h, w = check_image_size(image_size)
    files = list_folder_files(data_dir, split, tasks, check=check_files)
    columns = {k: [f[k] for f in files] for k in ("image",) + tasks}
    return Source(columns=columns, decode=_decode_stage(tasks, (h, w), classes), num_examples=len(files),
                  tasks=tasks, image_size=(h, w), depth_scales_with_zoom=True)


def count(data_dir, split="train"):
    return len(list_folder_files(data_dir, split, ()))


def _check_example(entry, classes):
    out, errors = {"size": None}, []
    try:
        image = read_image(entry["image"])
    except DataError as e:
        return out, [(entry["image"], str(e))]
    out["size"] = size = (image.shape[1], image.shape[0])
    c = len(classes.names)
    for task in TASKS:
        if task not in entry:
            continue
        try:
            a = imread_label(entry[task], FOLDERS[task][1], FOLDERS[task][2], size)
        except (DataError, OSError) as e:
            errors.append((entry[task], error_message(e)))
            continue
        if task == "semantic":
            bad = np.unique(a[(a >= c) & (a != classes.ignore_label)])
            if bad.size:
                errors.append((entry[task], f"{entry[task]}: label values {bad[:10].tolist()} are neither class ids "
                                            f"0..{c - 1} nor the ignore label {classes.ignore_label}"))
            out.update(pixels=a.size, labelled_pixels=int((a < c).sum()))
        elif task == "instance":
            out["instances"] = len(np.unique(a[a > 0]))
        else:
            out.update(depth_pixels=a.size, valid_depth_pixels=int((a > 0).sum()))
    return out, errors


def validate_split(data_dir, split, num_classes=None, tasks=None, workers=4, max_errors=20, depth_target=None):
    """Every file of a split decoded: pairing, bit depths, sizes, label values (``prepare_data.py --check``)."""
    if not os.path.isdir(os.path.join(os.fspath(data_dir), split)):
        return SplitReport(split, missing=True)
    report = SplitReport(split)
    problems = []
    try:
        classes = read_classes(data_dir)
        checked_num_classes(data_dir, classes, num_classes)
        present = folder_tasks(data_dir)
        files = list_folder_files(data_dir, split, tuple(t for t in (tasks or present) if t in present), problems)
    except (OSError, ValueError) as e:
        report.errors.append((data_dir, error_message(e)))
        return report
    report.errors.extend(problems)
    check_rows(report, files, lambda entry: _check_example(entry, classes), workers, max_errors)
    return report
