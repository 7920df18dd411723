"""tf.data loaders of the pre-processed ``.npy`` releases of CityScapes and NYUv2 (MTAN, LibMTL, ...):
``{root}/{train,val}/{image,label,depth[,normal]}/{i}.npy``; formats, value checks and depth units in
``datasets/cityscapes_npy.md`` and ``datasets/nyuv2_npy.md``. Dtypes are not documented, so any numeric dtype, byte
order and memory order is read: every header is read up front (a truncated file is named before training) and the
values are checked in the graph as they load, each failure naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from mtl_keras.data.checks import (DataError, SplitReport, check_image_size, check_num_classes, check_rows,
                                   check_tasks, error_message, npy_info, pair_files)
from mtl_keras.data.pipeline import Source, metric_depth, resize_image, resize_nearest


@dataclasses.dataclass(frozen=True)
class NpyRelease:
    tasks: tuple
    label_folders: dict  # num_classes -> candidate folder names, first found wins
    native_size: tuple
    splits: dict  # requested split -> folder (NYUv2's val is its test split)
    depth_targets: tuple  # first = default: CityScapes' inverse depth as stored; NYUv2's metres or 1/m


NPY_RELEASES = {
    "cityscapes_npy": NpyRelease(("semantic", "depth"), {19: ("label_19",), 7: ("label_7", "label")}, (128, 256),
                                 {"train": "train", "val": "val"}, ("inverse",)),
    "nyuv2_npy": NpyRelease(("semantic", "depth", "normals"), {13: ("label",)}, (288, 384),
                            {"train": "train", "val": "val", "test": "val"}, ("metric", "inverse")),
}

_FIELD_OF_TASK = {"semantic": "label", "depth": "depth", "normals": "normal"}
_NPY_NAME = re.compile(r"^(\d+)\.npy$")


def _release(name) -> NpyRelease:
    if name not in NPY_RELEASES:
        raise ValueError(f"unknown .npy release {name!r}; valid: {', '.join(NPY_RELEASES)}")
    return NPY_RELEASES[name]


def _check_num_classes(name, num_classes):
    return check_num_classes(num_classes, tuple(_release(name).label_folders), name)


def _label_folder(name, split_dir, num_classes):
    candidates = _release(name).label_folders[_check_num_classes(name, num_classes)]
    for folder in candidates:
        if os.path.isdir(os.path.join(split_dir, folder)):
            return folder
    raise FileNotFoundError(
        f"missing folder {os.path.join(split_dir, candidates[0])}: {name} with num_classes={num_classes} "
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
    """``{field: [path, ...]}`` (sorted by index) of a split; ``fields`` among ``image``, ``label`` (the folder of
    ``num_classes``), ``depth``, ``normal``. Errors name the missing folder or file."""
    release = _release(name)
    if split not in release.splits:
        raise ValueError(f"{name} has the splits {', '.join(release.splits)}, got split={split!r}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{name} root folder {data_dir} does not exist")
    split_dir = os.path.join(data_dir, release.splits[split])
    fields = tuple(dict.fromkeys(("image",) + tuple(fields)))
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"missing folder {split_dir}: expected the folders "
            f"{', '.join(os.path.join(split_dir, f) for f in fields)} of {{i}}.npy files in the {name} root "
            f"{data_dir}")
    images = _scan(os.path.join(split_dir, "image"))  # the image folder first: the most telling error
    folders = {f: _label_folder(name, split_dir, num_classes) if f == "label" else f for f in fields[1:]}
    found = {f: _scan(os.path.join(split_dir, folder)) for f, folder in folders.items()}
    if not images:
        raise ValueError(f"empty split {split!r} of {name}: no {{i}}.npy files in "
                         f"{os.path.join(split_dir, 'image')}")
    order = pair_files(images, found, lambda f, i: os.path.join(split_dir, folders[f], f"{i}.npy"),
                       lambda i: os.path.join(split_dir, "image", f"{i}.npy"))
    return {f: [files[i] for i in order] for f, files in dict(image=images, **found).items()}


def count(name, data_dir, split="train"):
    return len(list_npy_release(name, data_dir, split)["image"])


_CHANNELS = {"image": 3, "label": 1, "depth": 1, "normal": 3}  # a one-channel map may lack its channel axis


def _shape3(path, field, shape):
    c = _CHANNELS[field]
    if len(shape) == 2 and c == 1 and shape[0] > 0 and shape[1] > 0:
        return (shape[0], shape[1], 1)
    if len(shape) == 3 and shape[2] == c and shape[0] > 0 and shape[1] > 0:
        return tuple(shape)
    raise DataError(f"{path}: expected a {field} array of shape HxWx{c}{' (or HxW)' if c == 1 else ''}, got shape "
                    f"{tuple(shape)}")


def _dtype_variant(dtype):
    """(tf decode dtype, little_endian, bitcast-to dtype or None) of a numpy dtype; KeyError if TF has none."""
    import tensorflow as tf

    little = dtype.byteorder == "<" or dtype.byteorder == "|" or (dtype.byteorder == "=" and np.little_endian)
    little = bool(little) if dtype.itemsize > 1 else True
    base = dtype.newbyteorder("=")
    if base.kind not in "biuf" or base.itemsize > 8:
        raise KeyError(dtype)
    if base.kind == "u" and base.itemsize >= 4:  # decode_raw reads no uint32 / uint64: their bits as signed ints
        return {4: tf.int32, 8: tf.int64}[base.itemsize], little, tf.as_dtype(base)
    return tf.as_dtype(base), little, None


def _field_columns(field, paths):
    """Header of every file -> columns (path, offset, nbytes, shape3, fortran, variant code) and the variants."""
    variants, rows = [], []
    for path in paths:
        info = npy_info(path)
        shape3 = _shape3(path, field, info.shape)
        try:
            variant = _dtype_variant(info.dtype)
        except KeyError:
            raise DataError(f"{path}: unsupported dtype {info.dtype} (expected a bool, int or float array)") from None
        if variant not in variants:
            variants.append(variant)
        rows.append((info.offset, int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize, shape3,
                     info.fortran_order, variants.index(variant), info.dtype.kind == "f"))
    offsets, nbytes, shapes, fortran, codes, is_float = zip(*rows)
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
            out["semantic"] = tf.ensure_shape(tf.cast(resize_nearest(lab, (h, w))[..., 0], tf.uint8), (h, w))
        if "depth" in tasks:
            col = row["depth"]
            d = _decode_array(col, variants["depth"])
            # NaN is invalid, not negative; TF's graph optimiser rewrites not(d < 0) into d >= 0, False for NaN
            check = tf.debugging.Assert(tf.reduce_all((d >= 0.0) | tf.math.is_nan(d)), [
                "negative depth values (expected >= 0, 0 = invalid):", col["path"], "min", tf.reduce_min(d)])
            with tf.control_dependencies([check]):
                d = metric_depth(d, inverse_metric_depth)
            out["depth"] = tf.ensure_shape(resize_nearest(d, (h, w)), (h, w, 1))
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
            out["normals"] = tf.ensure_shape(resize_nearest(n, (h, w)), (h, w, 3))
        return out

    return fn


def npy_release_source(name, data_dir, split="train", image_size=None, num_classes=None, tasks=None,
                       depth_target=None, check_files=True) -> Source:
    """The ``pipeline.Source`` of a split of a ``.npy`` release. Every header is read (it gives the dtype, shape and
    data offset), whatever ``check_files``."""
    del check_files
    release = _release(name)
    tasks = check_tasks(release.tasks if tasks is None else tasks, release.tasks, name)
    if num_classes is None:
        num_classes = next(iter(release.label_folders))
    if depth_target is None:
        depth_target = release.depth_targets[0]
    if depth_target not in release.depth_targets:
        raise ValueError(f"{name}: depth_target must be one of {release.depth_targets}, got {depth_target!r}")
    h, w = check_image_size(release.native_size if image_size is None else image_size)
    num_classes = _check_num_classes(name, num_classes)
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
            _shape3(path, field, npy_info(path).shape)  # an empty map would fail the value checks below
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
    folder = os.path.join(data_dir, _release(name).splits.get(split, split))
    if not os.path.isdir(folder):
        return SplitReport(split, missing=True)
    report = SplitReport(split)
    fields = ["image"] + [_FIELD_OF_TASK[t] for t in tasks]
    try:
        listing = list_npy_release(name, data_dir, split, fields, num_classes)
    except (OSError, ValueError) as e:
        report.errors.append((folder, error_message(e)))
        return report
    rows = [{f: listing[f][i] for f in listing} for i in range(len(listing["image"]))]
    check_rows(report, rows, lambda r: _check_npy_example(r, num_classes), workers, max_errors)
    return report
