"""tf.data loaders for the pre-processed ``.npy`` release of CityScapes and NYUv2 (used by MTAN, LibMTL, ...).

Layout: ``{root}/{train,val}/{image,label,depth[,normal]}/{i}.npy``, one array per file:

============ ========== ========================= =============================== ================================ =====
dataset      size       image                     label                           depth                            normal
============ ========== ========================= =============================== ================================ =====
NYUv2        288x384    HxWx3 float in [0, 1]     HxW, 13 classes 0..12, -1 ignore HxWx1 metres, 0 invalid         HxWx3 in [-1, 1], all-zero invalid
CityScapes   128x256    HxWx3 float in [0, 1]     HxW, -1 ignore; ``label_7`` /    HxWx1 inverse depth (0..~0.49),  -
                                                  ``label_19`` (or ``label``: 7)   0 invalid
============ ========== ========================= =============================== ================================ =====

Dtypes are not documented, so any bool / int / float dtype (either byte order, C or Fortran order) is accepted:
the header of every file is read up front (shape, dtype, size: a truncated file is reported by name before
training), and the values are checked as they load, each failure naming the file: a float image must lie in
[0, 1] (an integer image in 0..255), labels must be whole numbers in 0..C-1 or the ignore value -1 (255 is also
read as ignore), depth must not be negative (0, NaN and inf are invalid), normals must lie in [-1, 1] (all-zero
or NaN = invalid). Files may have any size (each is resized to ``image_size``: bilinear for the image, nearest
for the rest); a label of another size than its image is an error.

Depth units: NYUv2 metres (``depth_target="metric"``) or 1/m (``"inverse"``), unchanged by random scaling;
CityScapes the release's inverse depth as stored (it appears to be the 16-bit disparity PNG value / 65536, i.e.
about disparity in px at 2048 wide / 256; MTAN-style tables report errors in this unit), which is a disparity and
is multiplied by the scale factor under random scaling (``mtl_keras.data.augment``).

NYUv2 has no separate validation split: ``val`` is the standard 654-image test split (``split="test"`` is an alias).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from mtl_keras.data.checks import DataError, SplitReport, check_num_classes, check_rows, error_message, npy_info
from mtl_keras.data.pipeline import Source, check_image_size, check_tasks, resize_image


@dataclasses.dataclass(frozen=True)
class NpyRelease:
    name: str
    tasks: tuple
    label_folders: dict  # num_classes -> candidate folder names, first found wins
    native_size: tuple
    splits: dict  # requested split -> folder
    depth_targets: tuple  # first = default
    depth_note: str


NPY_RELEASES = {
    "cityscapes_npy": NpyRelease(
        "cityscapes_npy", ("semantic", "depth"), {19: ("label_19",), 7: ("label_7", "label")}, (128, 256),
        {"train": "train", "val": "val"}, ("inverse",),
        "the release's inverse depth as stored"),
    "nyuv2_npy": NpyRelease(
        "nyuv2_npy", ("semantic", "depth", "normals"), {13: ("label",)}, (288, 384),
        {"train": "train", "val": "val", "test": "val"}, ("metric", "inverse"),
        "metres (metric) or 1/m (inverse)"),
}

_FIELD_OF_TASK = {"semantic": "label", "depth": "depth", "normals": "normal"}
_NPY_NAME = re.compile(r"^(\d+)\.npy$")


def _release(name) -> NpyRelease:
    if name not in NPY_RELEASES:
        raise ValueError(f"unknown .npy release {name!r}; valid: {', '.join(NPY_RELEASES)}")
    return NPY_RELEASES[name]


def _split_folder(release, data_dir, split):
    if split not in release.splits:
        raise ValueError(f"{release.name} has the splits {', '.join(release.splits)}, got split={split!r}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{release.name} root folder {data_dir} does not exist")
    return os.path.join(data_dir, release.splits[split])


def _check_num_classes(release, num_classes):
    return check_num_classes(num_classes, tuple(release.label_folders), release.name)


def _label_folder(release, split_dir, num_classes):
    candidates = release.label_folders[_check_num_classes(release, num_classes)]
    for folder in candidates:
        if os.path.isdir(os.path.join(split_dir, folder)):
            return folder
    raise FileNotFoundError(
        f"missing folder {os.path.join(split_dir, candidates[0])}: {release.name} with num_classes={num_classes} "
        f"reads its labels from {' or '.join(os.path.join(split_dir, c) for c in candidates)}")


def _scan(folder):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"missing folder {folder}: expected {{i}}.npy files (i = 0..N-1)")
    out = {}
    for name in os.listdir(folder):
        m = _NPY_NAME.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(folder, name)
    return out


def list_npy_release(name, data_dir, split="train", fields=("image",), num_classes=None):
    """``{field: [path, ...]}`` (sorted by index) of a split of a ``.npy`` release; ``fields`` among ``image``,
    ``label``, ``depth``, ``normal`` (``label`` resolves to the folder of ``num_classes``).

    Errors name the folder or file: a missing folder, an empty split, an image without one of its files or a file
    without its image.
    """
    release = _release(name)
    split_dir = _split_folder(release, data_dir, split)
    fields = tuple(dict.fromkeys(("image",) + tuple(fields)))
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"missing folder {split_dir}: expected the folders "
            f"{', '.join(os.path.join(split_dir, f) for f in fields)} of {{i}}.npy files in the {release.name} root "
            f"{data_dir}")
    _scan(os.path.join(split_dir, "image"))  # the image folder first: the most telling error
    folders = {}
    for field in fields:
        folders[field] = _label_folder(release, split_dir, num_classes) if field == "label" else field
    found = {f: _scan(os.path.join(split_dir, folder)) for f, folder in folders.items()}
    images = found["image"]
    if not images:
        raise ValueError(f"empty split {split!r} of {release.name}: no {{i}}.npy files in "
                         f"{os.path.join(split_dir, 'image')}")
    for field, files in found.items():
        missing = sorted(set(images) - set(files))
        if missing:
            i = missing[0]
            raise FileNotFoundError(
                f"image {images[i]} has no {field} file: expected {os.path.join(split_dir, folders[field], f'{i}.npy')}"
                f" ({len(missing)} image(s) of split {split!r} lack their {folders[field]}/ file)")
        orphans = sorted(set(files) - set(images))
        if orphans:
            i = orphans[0]
            raise FileNotFoundError(
                f"{folders[field]} file {files[i]} has no image: expected {os.path.join(split_dir, 'image', f'{i}.npy')}"
                f" ({len(orphans)} {folders[field]}/ file(s) of split {split!r} without an image)")
    order = sorted(images)
    return {field: [found[field][i] for i in order] for field in found}


def count(name, data_dir, split="train"):
    return len(list_npy_release(name, data_dir, split)["image"])


# ----------------------------------------------------------------------------------------------------------------
# headers -> columns; decoding in TF
# ----------------------------------------------------------------------------------------------------------------

_EXPECTED = {  # field -> (allowed shapes as a text, channels)
    "image": ("HxWx3", 3),
    "label": ("HxW (or HxWx1)", 1),
    "depth": ("HxWx1 (or HxW)", 1),
    "normal": ("HxWx3", 3),
}


def _shape3(path, field, shape):
    text, channels = _EXPECTED[field]
    if len(shape) == 2 and channels == 1:
        return (shape[0], shape[1], 1)
    if len(shape) == 3 and shape[2] == channels and shape[0] > 0 and shape[1] > 0:
        return tuple(shape)
    raise DataError(f"{path}: expected a {field} array of shape {text}, got shape {tuple(shape)}")


def _dtype_variant(dtype):
    """(tf decode dtype, little_endian, bitcast-to dtype or None) of a numpy dtype."""
    import tensorflow as tf

    little = dtype.byteorder == "<" or dtype.byteorder == "|" or (dtype.byteorder == "=" and np.little_endian)
    base = dtype.newbyteorder("=")
    mapping = {np.dtype(np.bool_): (tf.bool, None), np.dtype(np.uint8): (tf.uint8, None),
               np.dtype(np.int8): (tf.int8, None), np.dtype(np.uint16): (tf.uint16, None),
               np.dtype(np.int16): (tf.int16, None), np.dtype(np.int32): (tf.int32, None),
               np.dtype(np.uint32): (tf.int32, tf.uint32), np.dtype(np.int64): (tf.int64, None),
               np.dtype(np.uint64): (tf.int64, tf.uint64), np.dtype(np.float16): (tf.float16, None),
               np.dtype(np.float32): (tf.float32, None), np.dtype(np.float64): (tf.float64, None)}
    if base not in mapping:
        raise KeyError(dtype)
    tf_dtype, bitcast = mapping[base]
    return tf_dtype, bool(little) if dtype.itemsize > 1 else True, bitcast


def _field_columns(field, paths):
    """Header of every file -> columns (path, offset, nbytes, shape3, fortran, variant code) and the variants."""
    variants, codes, offsets, nbytes, shapes, fortran, is_float = [], [], [], [], [], [], []
    for path in paths:
        info = npy_info(path)
        shape3 = _shape3(path, field, info.shape)
        try:
            variant = _dtype_variant(info.dtype)
        except KeyError:
            raise DataError(f"{path}: unsupported dtype {info.dtype} (expected a bool, int or float array)") from None
        if variant not in variants:
            variants.append(variant)
        codes.append(variants.index(variant))
        offsets.append(info.offset)
        nbytes.append(int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize)
        shapes.append(shape3)
        fortran.append(info.fortran_order)
        is_float.append(info.dtype.kind == "f")
    columns = {"path": list(paths), "offset": np.array(offsets, np.int64), "nbytes": np.array(nbytes, np.int64),
               "shape": np.array(shapes, np.int32), "fortran": np.array(fortran, bool),
               "code": np.array(codes, np.int32), "is_float": np.array(is_float, bool)}
    return columns, variants


def _decode_array(col, variants):
    """One .npy file -> float32 HxWxC (in TF)."""
    import tensorflow as tf

    data = tf.strings.substr(tf.io.read_file(col["path"]), tf.cast(col["offset"], tf.int32),
                             tf.cast(col["nbytes"], tf.int32))

    def branch(variant):
        tf_dtype, little, bitcast = variant

        def fn():
            x = tf.io.decode_raw(data, tf_dtype, little_endian=little)
            if bitcast is not None:
                x = tf.bitcast(x, bitcast)
            return tf.cast(x, tf.float32)

        return fn

    if len(variants) == 1:
        flat = branch(variants[0])()
    else:
        flat = tf.switch_case(col["code"], [branch(v) for v in variants])
    shape = col["shape"]
    return tf.cond(col["fortran"],
                   lambda: tf.transpose(tf.reshape(flat, tf.reverse(shape, [0])), [2, 1, 0]),
                   lambda: tf.reshape(flat, shape))


def _decode_stage(variants, tasks, image_size, num_classes, inverse_metric_depth):
    import tensorflow as tf

    h, w = image_size

    def nearest(x):
        return tf.image.resize(x, (h, w), method="nearest")

    def fn(row):
        out = {}
        col = row["image"]
        img = _decode_array(col, variants["image"])
        lo, hi = tf.reduce_min(img), tf.reduce_max(img)
        in_range = tf.cond(col["is_float"],
                           lambda: tf.logical_and(lo >= -1e-3, hi <= 1.0 + 1e-3),
                           lambda: tf.logical_and(lo >= 0.0, hi <= 255.0))
        check = tf.debugging.Assert(in_range, [
            "image values outside the expected range (a float image must lie in [0, 1], an integer image in "
            "0..255):", col["path"], "min", lo, "max", hi])
        with tf.control_dependencies([check]):
            img = tf.where(col["is_float"], img * 255.0, img)
        out["image"] = resize_image(img, (h, w))
        if "semantic" in tasks:
            col = row["label"]
            lab = _decode_array(col, variants["label"])
            ignore = tf.logical_or(tf.equal(lab, -1.0), tf.equal(lab, 255.0))
            ok = tf.logical_or(ignore, tf.logical_and(
                tf.logical_and(lab >= 0.0, lab <= float(num_classes - 1)), tf.equal(lab, tf.round(lab))))
            bad = tf.boolean_mask(lab, tf.logical_not(ok))
            check = tf.debugging.Assert(tf.reduce_all(ok), [
                f"label values outside -1 (ignore) and 0..{num_classes - 1} (whole numbers) for "
                f"num_classes={num_classes}:", col["path"], "bad values:", bad[:10]], summarize=10)
            with tf.control_dependencies([check]):
                lab = tf.where(ignore | tf.logical_not(ok), 255.0, lab)
            out["semantic"] = tf.ensure_shape(tf.cast(nearest(lab)[..., 0], tf.uint8), (h, w))
        if "depth" in tasks:
            col = row["depth"]
            d = _decode_array(col, variants["depth"])
            # NaN is invalid (masked below), not negative: "d < 0 or NaN is fine" written as not(d < 0) is rewritten
            # by TF's graph optimiser into d >= 0, which is False for NaN; so test NaN explicitly.
            check = tf.debugging.Assert(tf.reduce_all((d >= 0.0) | tf.math.is_nan(d)), [
                "negative depth values (expected >= 0, 0 = invalid):", col["path"], "min", tf.reduce_min(d)])
            with tf.control_dependencies([check]):
                valid = tf.logical_and(tf.math.is_finite(d), d > 0.0)
            if inverse_metric_depth:  # metres -> 1/m
                d = 1.0 / tf.where(valid, d, 1.0)
            d = tf.where(valid, d, float("nan"))
            out["depth"] = tf.ensure_shape(nearest(d), (h, w, 1))
        if "normals" in tasks:
            col = row["normal"]
            n = _decode_array(col, variants["normal"])
            finite = tf.reduce_all(tf.math.is_finite(n), axis=-1, keepdims=True)
            n0 = tf.where(finite, n, 0.0)
            check = tf.debugging.Assert(tf.reduce_all(tf.abs(n0) <= 1.0 + 1e-3), [
                "normal values outside [-1, 1]:", col["path"], "min", tf.reduce_min(n0), "max", tf.reduce_max(n0)])
            with tf.control_dependencies([check]):
                valid = tf.logical_and(finite, tf.reduce_any(tf.not_equal(n0, 0.0), axis=-1, keepdims=True))
            n = tf.where(valid, n0, float("nan"))
            out["normals"] = tf.ensure_shape(nearest(n), (h, w, 3))
        return out

    return fn


def npy_release_source(name, data_dir, split="train", image_size=None, num_classes=None, tasks=None,
                       depth_target=None, check_files=True) -> Source:
    """The rows and decode function of a split of a ``.npy`` release (``mtl_keras.data.pipeline.Source``).

    The header of every file is always read (it gives the dtype, shape and data offset); ``check_files`` is
    accepted for symmetry with the other loaders.
    """
    del check_files
    release = _release(name)
    tasks = check_tasks(release.tasks if tasks is None else tasks, release.tasks, name)
    if num_classes is None:
        num_classes = next(iter(release.label_folders))
    if depth_target is None:
        depth_target = release.depth_targets[0]
    if depth_target not in release.depth_targets:
        raise ValueError(f"{name}: depth_target must be one of {release.depth_targets} ({release.depth_note}), "
                         f"got {depth_target!r}")
    h, w = check_image_size(release.native_size if image_size is None else image_size)
    num_classes = _check_num_classes(release, num_classes)
    fields = ["image"] + [_FIELD_OF_TASK[t] for t in tasks]
    paths = list_npy_release(name, data_dir, split, fields, num_classes)
    columns, variants = {}, {}
    for field, field_paths in paths.items():
        columns[field], variants[field] = _field_columns(field, field_paths)
    for field in paths:  # maps of another size than their image: an error, up front
        for i, (a, b) in enumerate(zip(columns["image"]["shape"], columns[field]["shape"])):
            if tuple(a[:2]) != tuple(b[:2]):
                raise DataError(f"{paths[field][i]}: {field} is {b[0]}x{b[1]} but its image {paths['image'][i]} "
                                f"is {a[0]}x{a[1]}")
    decode = _decode_stage(variants, tasks, (h, w), num_classes,
                           inverse_metric_depth=(name == "nyuv2_npy" and depth_target == "inverse"))
    return Source(columns=columns, decode=decode, num_examples=len(paths["image"]), tasks=tasks, image_size=(h, w),
                  depth_scales_with_zoom=(name == "cityscapes_npy"))


def _check_npy_example(paths, num_classes):
    errors, out = [], {"size": None}
    arrays = {}
    for field, path in paths.items():
        try:
            npy_info(path)
            arrays[field] = np.load(path, allow_pickle=False)
        except (DataError, OSError, ValueError) as e:
            errors.append((path, error_message(e)))
    if "image" in arrays:
        img = arrays["image"]
        if img.ndim != 3 or img.shape[2] != 3:
            errors.append((paths["image"], f"{paths['image']}: expected an image array HxWx3, got {img.shape}"))
        else:
            out["size"] = (img.shape[1], img.shape[0])
            lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
            ok = (-1e-3 <= lo and hi <= 1 + 1e-3) if img.dtype.kind == "f" else (lo >= 0 and hi <= 255)
            if img.dtype.kind == "f" and not np.all(np.isfinite(img)):  # the loader refuses these too
                errors.append((paths["image"], f"{paths['image']}: {int((~np.isfinite(img)).sum())} non-finite "
                                               f"image value(s) (NaN or inf)"))
            elif not ok:
                errors.append((paths["image"], f"{paths['image']}: image values {lo:g}..{hi:g} outside "
                                               f"{'[0, 1]' if img.dtype.kind == 'f' else '0..255'}"))
    size = out["size"]
    for field in ("label", "depth", "normal"):
        if field not in arrays:
            continue
        a, path = arrays[field], paths[field]
        if size and a.shape[:2] != (size[1], size[0]):
            errors.append((path, f"{path}: {field} is {a.shape[0]}x{a.shape[1]} but its image is "
                                 f"{size[1]}x{size[0]}"))
            continue
        if field == "label":
            a = a.astype(np.float64)
            ignore = (a == -1) | (a == 255)
            ok = ignore | ((a >= 0) & (a <= num_classes - 1) & (a == np.round(a)))
            if not ok.all():
                errors.append((path, f"{path}: label values {np.unique(a[~ok])[:10].tolist()} are not -1 (ignore) or "
                                     f"whole numbers in 0..{num_classes - 1}"))
            out.update(pixels=a.size, labelled_pixels=int((~ignore & ok).sum()))
        elif field == "depth":
            if np.any(a < 0):
                errors.append((path, f"{path}: negative depth values (min {float(np.nanmin(a)):g})"))
            out.update(depth_pixels=a.size, valid_depth_pixels=int((np.isfinite(a) & (a > 0)).sum()))
        elif np.any(np.abs(np.nan_to_num(a)) > 1 + 1e-3):
            errors.append((path, f"{path}: normal values outside [-1, 1]"))
    return out, errors


def validate_split(name, data_dir, split, num_classes, tasks, workers=4, max_errors=20, depth_target=None):
    """Pairing, headers and the value ranges of every array, as the loader checks them (``--check``)."""
    report = SplitReport(split)
    folder = os.path.join(data_dir, _release(name).splits.get(split, split))
    if not os.path.isdir(folder):
        report.missing = True
        return report
    fields = ["image"] + [_FIELD_OF_TASK[t] for t in tasks]
    try:
        listing = list_npy_release(name, data_dir, split, fields, num_classes)
    except (OSError, ValueError) as e:
        report.errors.append((folder, error_message(e)))
        return report
    rows = [{f: listing[f][i] for f in listing} for i in range(len(listing["image"]))]
    check_rows(report, rows, lambda r: _check_npy_example(r, num_classes), workers, max_errors)
    return report
