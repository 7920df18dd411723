"""tf.data loader of NYUv2's labeled set (``nyu_depth_v2_labeled.mat``, MATLAB v7.3 = HDF5, read with h5py) with
the standard split (``splits.mat``; ``val`` = its 654-image test split) and the user's class maps
(``classMapping40.mat``, ``class13Mapping.mat``); files, shapes and targets in ``datasets/nyuv2.md``. Instances are
objects only: wall, floor and ceiling are numbered too, but "stuff" has no meaningful centroid. The ``.mat`` is read
in the parallel map (h5py serialises access; resizing and label mapping run in TF ops in parallel).
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import zlib

import numpy as np

from mtl_keras.data.checks import (DataError, SplitReport, check_image_size, check_num_classes, check_tasks,
                                   error_message)
from mtl_keras.data.pipeline import Source, metric_depth, resize_image, resize_nearest
from mtl_keras.labels import IGNORE_INDEX, NYUV2_NUM_CLASSES

TASKS = ("semantic", "instance", "depth")
NYUV2_FILES = {"mat": "nyu_depth_v2_labeled.mat", "splits": "splits.mat", "map40": "classMapping40.mat",
               "map13": "class13Mapping.mat"}
_STUFF_40 = (1, 2, 22)  # wall, floor, ceiling (1-based 40-class ids)
_NEEDS = {"semantic": ("labels",), "instance": ("labels", "instances"), "depth": ("depths",)}


def _path(data_dir, key, override=None):
    return os.fspath(override) if override else os.path.join(os.fspath(data_dir), NYUV2_FILES[key])


def _split_key(split):
    if split not in ("train", "val", "test"):
        raise ValueError(f"NYUv2 has the splits train, val (= the 654-image test split) and test, got {split!r}")
    return "train" if split == "train" else "val"


def _loadmat(path, what):
    import scipy.io

    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}: expected {what}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        # scipy's v5 reader trusts the sizes and flags it reads: one flipped bit can crash the process (segfault)
        _check_mat_v5(data)
        return scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except _MatV5Error as e:
        raise DataError(f"{path}: not a readable MATLAB v5 .mat file with {what} ({e})") from None
    except NotImplementedError as e:  # a v7.3 (HDF5) file
        raise DataError(f"{path}: expected a MATLAB v5 .mat with {what}, got a v7.3 (HDF5) file ({e})") from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types on a broken file
        raise DataError(f"{path}: cannot read it as a MATLAB .mat file with {what} ({type(e).__name__}: "
                        f"{_one_line(e)})") from None


class _MatV5Error(Exception):
    pass


_MI_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}  # numeric miTYPE -> bytes per value
_MI_CHAR_SIZES = {1: 1, 2: 1, 4: 2, 17: 2, 18: 4}  # miINT8, miUINT8, miUINT16, miUTF16, miUTF32 (miUTF8: 1 to 4)
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = range(6, 16)  # double, single, int8 ... uint64


def _check_mat_v5(data):
    """Walks the elements of a MATLAB v5 file (v7: compressed elements) and checks that every size, count and type
    is consistent before scipy reads it; _MatV5Error otherwise. Other versions are left to scipy (v7.3: HDF5).
    Supported classes: numeric, char, cell, struct (a sparse matrix, object or function handle is refused)."""
    if len(data) < 128 or 0 in data[:4]:
        raise _MatV5Error(f"no MATLAB v5 header ({len(data)} bytes; a v4 file or not a .mat)")
    if data[126:128] not in (b"IM", b"MI"):
        raise _MatV5Error("no MATLAB v5 header (no endian indicator)")
    order = "<" if data[126:128] == b"IM" else ">"
    if data[125 if order == "<" else 124] != 1:  # the major version: 2 is v7.3 (HDF5), read by scipy's error
        return
    pos = 128
    while pos < len(data):
        mdtype, nbytes, start = _mat_tag(data, pos, len(data), order)
        if mdtype == _MI_COMPRESSED:
            inflate = zlib.decompressobj()
            try:
                element = inflate.decompress(data[start:start + nbytes], 1 << 26)
            except zlib.error as e:
                raise _MatV5Error(f"corrupt compressed variable at byte {pos}: {e}") from None
            if not inflate.eof or inflate.unconsumed_tail:
                raise _MatV5Error(f"truncated or oversized compressed variable at byte {pos}")
            inner, inner_bytes, inner_start = _mat_tag(element, 0, len(element), order)
            if inner != _MI_MATRIX or inner_start + inner_bytes != len(element):
                raise _MatV5Error(f"the compressed variable at byte {pos} is not one matrix")
            _check_mat_matrix(element, inner_start, inner_bytes, order, 0)
            pos = start + nbytes
        elif mdtype == _MI_MATRIX:
            _check_mat_matrix(data, start, nbytes, order, 0)
            pos = start + nbytes
        else:
            raise _MatV5Error(f"element type {mdtype} at byte {pos}, expected a matrix")


def _mat_tag(data, pos, end, order):
    """(type, byte count, data offset) of the element tag at ``pos``; its data must end by ``end``."""
    if pos + 8 > end:
        raise _MatV5Error(f"truncated element tag at byte {pos}")
    word, nbytes = struct.unpack(order + "II", data[pos:pos + 8])
    if word >> 16:  # small data element: type and count in the first word, up to 4 bytes of data
        if (word >> 16) > 4:
            raise _MatV5Error(f"corrupt small element at byte {pos}")
        return word & 0xFFFF, word >> 16, pos + 4
    if pos + 8 + nbytes > end:
        raise _MatV5Error(f"element at byte {pos} ends past its container ({nbytes} bytes)")
    return word, nbytes, pos + 8


def _mat_next(pos, start, nbytes):
    """The offset of the element after the one at ``pos`` (data at ``start``): padded to 8 bytes."""
    return pos + 8 if start == pos + 4 else start + (nbytes + 7) // 8 * 8


def _check_mat_matrix(data, start, nbytes, order, depth):
    """The sub-elements of one miMATRIX element (data at ``start``, ``nbytes`` long)."""
    if nbytes == 0:  # an empty matrix
        return
    if depth > 16:
        raise _MatV5Error("matrices nested too deeply")
    end = start + nbytes

    def element(pos, types=None):
        mdtype, count, at = _mat_tag(data, pos, end, order)
        if types is not None and mdtype not in types:
            raise _MatV5Error(f"element type {mdtype} at byte {pos}, expected one of {sorted(types)}")
        return mdtype, count, at, _mat_next(pos, at, count)

    _, count, at, pos = element(start, {6})  # array flags: 2 x uint32
    if count != 8:
        raise _MatV5Error(f"array flags of {count} bytes at byte {start}")
    flags = struct.unpack(order + "I", data[at:at + 4])[0]
    mx_class, is_complex = flags & 0xFF, bool(flags & 0x800)
    _, count, at, pos = element(pos, {5})  # dimensions: int32
    if count < 8 or count % 4 or count > 4 * 32:
        raise _MatV5Error(f"dimensions of {count} bytes at byte {at}")
    dims = struct.unpack(order + f"{count // 4}i", data[at:at + count])
    if min(dims) < 0:
        raise _MatV5Error(f"negative dimensions {dims}")
    n = math.prod(dims)
    _, _, _, pos = element(pos, {1, 2})  # the name (int8 characters)
    if mx_class in _MX_NUMERIC:
        for _ in range(2 if is_complex else 1):  # the real part, then the imaginary part
            mdtype, count, _, pos = element(pos, set(_MI_SIZES))
            if count != n * _MI_SIZES[mdtype]:
                raise _MatV5Error(f"{count} bytes of data for {n} values of type {mdtype}")
    elif mx_class == _MX_CHAR:
        mdtype, count, _, pos = element(pos, set(_MI_CHAR_SIZES) | {16})
        if not (n <= count <= 4 * n if mdtype == 16 else count == n * _MI_CHAR_SIZES[mdtype]):
            raise _MatV5Error(f"{count} bytes of characters for {n} characters of type {mdtype}")
    elif mx_class in (_MX_CELL, _MX_STRUCT):
        fields = 1
        if mx_class == _MX_STRUCT:
            _, count, at, pos = element(pos, {5})  # the length of each field name
            length = struct.unpack(order + "i", data[at:at + 4])[0] if count == 4 else 0
            _, count, _, pos = element(pos, {1, 2})  # the field names
            if length < 1 or count % length:
                raise _MatV5Error(f"field names of {count} bytes in names of {length} bytes")
            fields = count // length
        if n * fields * 8 > end - pos:
            raise _MatV5Error(f"{n * fields} matrices cannot fit in {end - pos} bytes")
        for _ in range(n * fields):
            mdtype, count, at, _ = element(pos, {_MI_MATRIX})
            if at != pos + 8:
                raise _MatV5Error(f"a small element at byte {pos} where a matrix belongs")
            _check_mat_matrix(data, at, count, order, depth + 1)
            pos = _mat_next(pos, at, count)
    else:
        raise _MatV5Error(f"unsupported or corrupt array class {mx_class}")
    if pos != end:
        raise _MatV5Error(f"a matrix of {nbytes} bytes holds {pos - start} bytes of elements")


def _one_line(e):
    return " ".join(str(e).split())[:300]


# What h5py raises on a corrupt HDF5 file past its superblock (a broken object header, B-tree or chunk)
_H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError)


def _mat_vector(path, mat, key, what, field=None):
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no variable {key!r} (found {found}); expected {what}")
    value = mat[key]
    if field is not None:
        if hasattr(value, field):
            value = getattr(value, field)
        elif isinstance(value, np.ndarray) and value.dtype.names and field in value.dtype.names:
            value = value[field].item() if value.size == 1 else value[field]
        else:
            raise DataError(f"{path}: variable {key!r} has no field {field!r}; expected {what}")
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {key}{'.' + field if field else ''} is not numeric; expected {what}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(np.abs(arr) > 2 ** 31):
        raise DataError(f"{path}: {key}{'.' + field if field else ''} must hold whole numbers; expected {what}")
    return arr.astype(np.int64)


def nyuv2_label_table(data_dir, num_classes=13, map40_path=None, map13_path=None):
    """(uint8 table: raw label 0..894 -> training id 0..C-1, 255 for 0 = unlabeled; the 1-based 40-class of each raw
    label, 0 for unlabeled) from ``classMapping40.mat`` (and ``class13Mapping.mat`` for 13 classes)."""
    num_classes = check_num_classes(num_classes, NYUV2_NUM_CLASSES, "NYUv2 (13 = Couprie et al., 40 = Gupta et al.)")
    p40 = _path(data_dir, "map40", map40_path)
    what40 = "mapClass: 1 x 894, the 894 NYUv2 labels -> 40 classes (1-based)"
    map40 = _mat_vector(p40, _loadmat(p40, what40), "mapClass", what40)
    if map40.size != 894 or map40.min() < 0 or map40.max() > 40:
        raise DataError(f"{p40}: mapClass has {map40.size} entries in {map40.min()}..{map40.max()}; expected "
                        f"{what40}")
    class40 = np.concatenate([[0], map40])  # raw label -> 1-based 40-class (0 = unlabeled)
    if int(num_classes) == 40:
        train = class40 - 1
    else:
        p13 = _path(data_dir, "map13", map13_path)
        what13 = "classMapping13.labels13: 1 x 40, the 40 classes -> 13 classes (1-based)"
        map13 = _mat_vector(p13, _loadmat(p13, what13), "classMapping13", what13, field="labels13")
        if map13.size != 40 or map13.min() < 1 or map13.max() > 13:
            raise DataError(f"{p13}: classMapping13.labels13 has {map13.size} entries in {map13.min()}.."
                            f"{map13.max()}; expected {what13}")
        train = np.where(class40 > 0, np.concatenate([[0], map13])[class40] - 1, -1)
    table = np.where(train >= 0, train, IGNORE_INDEX).astype(np.uint8)
    table[0] = IGNORE_INDEX
    return table, class40.astype(np.int32)


def read_nyuv2_splits(data_dir, num_images, splits_path=None):
    """``{"train": indices, "val": indices}`` (0-based) from ``splits.mat``; errors name the file."""
    path = _path(data_dir, "splits", splits_path)
    what = "trainNdxs (795) and testNdxs (654): 1-based image indices of the standard split"
    mat = _loadmat(path, what)
    out = {}
    for split, key in (("train", "trainNdxs"), ("val", "testNdxs")):
        idx = _mat_vector(path, mat, key, what)
        if idx.min() < 1 or idx.max() > num_images:
            raise DataError(f"{path}: {key} holds indices {idx.min()}..{idx.max()} but the .mat has {num_images} "
                            f"images (expected 1-based indices in 1..{num_images})")
        if len(np.unique(idx)) != len(idx):
            raise DataError(f"{path}: {key} repeats image indices")
        out[split] = idx - 1
    shared = np.intersect1d(out["train"], out["val"])
    if shared.size:
        raise DataError(f"{path}: trainNdxs and testNdxs share {shared.size} image(s), e.g. {shared[0] + 1}")
    return out


def check_nyuv2_mat(path, tasks=TASKS):
    """Checks the labeled ``.mat``'s datasets for ``tasks``; returns ``(N, (H, W))``."""
    import h5py

    path = os.fspath(path)
    expected = ("images (N, 3, W, H) uint8, depths (N, W, H) float metres, labels (N, W, H) uint16, "
                "instances (N, W, H) uint8")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}: expected NYUv2's nyu_depth_v2_labeled.mat (MATLAB v7.3) "
                                f"with {expected}")
    needed = list(dict.fromkeys(["images"] + [d for t in tasks for d in _NEEDS.get(t, ())]))
    try:
        f = h5py.File(path, "r")
    except _H5_ERRORS as e:
        raise DataError(f"{path} is not an HDF5 (MATLAB v7.3) file ({_one_line(e)}); expected NYUv2's labeled set "
                        f"with {expected}") from None
    with f:
        try:
            return _check_datasets(f, path, needed, expected)
        except DataError:
            raise
        except _H5_ERRORS as e:
            raise DataError(f"{path} is a corrupt HDF5 file ({type(e).__name__}: {_one_line(e)}); expected NYUv2's "
                            f"labeled set with {expected}") from None


def _check_datasets(f, path, needed, expected):
    """The body of :func:`check_nyuv2_mat` on the open file ``f``."""
    import h5py

    missing = [d for d in needed if not isinstance(f.get(d), h5py.Dataset)]
    if missing:
        found = sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))
        raise DataError(f"{path} has no dataset(s) {missing} (found {found}); expected {expected}")
    images = f["images"]
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{path}: images has shape {images.shape}; expected (N, 3, W, H) (h5py order)")
    n, _, w, h = images.shape
    if n == 0:
        raise DataError(f"{path}: images holds no image (shape {images.shape})")
    for name in needed[1:]:
        if f[name].shape != (n, w, h):
            raise DataError(f"{path}: {name} has shape {f[name].shape}; expected {(n, w, h)} like images "
                            f"{images.shape}")
    for name, kinds in (("images", "u"), ("labels", "ui"), ("instances", "ui"), ("depths", "f")):
        if name in needed and f[name].dtype.kind not in kinds:
            raise DataError(f"{path}: {name} has dtype {f[name].dtype}; expected {expected}")
    return int(n), (int(h), int(w))


def _read_sample(path, fields, i):
    """The image and ``fields`` of sample ``i``, opening the file each time (about a millisecond): no handle stays
    open between epochs, and forked workers never share one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            image = np.ascontiguousarray(f["images"][int(i)].transpose(2, 1, 0)).astype(np.uint8)
            return [image] + [np.ascontiguousarray(f[name][int(i)].T) for name in fields]
    except _H5_ERRORS as e:  # a chunk or B-tree corrupt past the header checks: the pipeline's error names the file
        raise DataError(f"{path}: cannot read image {int(i) + 1} (1-based) and its {', '.join(fields) or 'targets'} "
                        f"({type(e).__name__}: {_one_line(e)}); the file is corrupt: re-download it") from None


def nyuv2_source(data_dir, split="train", image_size=(288, 384), num_classes=13, tasks=TASKS,
                 depth_target="metric", check_files=True, mat_path=None, splits_path=None, map40_path=None,
                 map13_path=None) -> Source:
    """The ``pipeline.Source`` of a NYUv2 split; ``*_path``: files that replace the default names in ``data_dir``."""
    import tensorflow as tf

    del check_files  # the .mat's datasets and the mapping files are always checked up front
    tasks = check_tasks(tasks, TASKS, "nyuv2 (the labeled .mat)")
    if depth_target not in ("metric", "inverse"):
        raise ValueError(f"depth_target must be 'metric' (metres) or 'inverse' (1/m) for NYUv2, got "
                         f"{depth_target!r}")
    split_key = _split_key(split)
    h, w = check_image_size(image_size)
    if not os.path.isdir(os.fspath(data_dir)):
        raise FileNotFoundError(f"NYUv2 folder {data_dir} does not exist")
    table, class40 = nyuv2_label_table(data_dir, num_classes, map40_path, map13_path)
    mat = _path(data_dir, "mat", mat_path)
    n, _ = check_nyuv2_mat(mat, tasks)
    indices = read_nyuv2_splits(data_dir, n, splits_path)[split_key]
    if indices.size == 0:
        raise ValueError(f"empty split {split!r}: {_path(data_dir, 'splits', splits_path)} lists no image")

    fields = list(dict.fromkeys(d for t in TASKS if t in tasks for d in _NEEDS[t]))  # labels, instances, depths
    reader = functools.partial(_read_sample, os.fspath(mat), tuple(fields))
    out_types = [tf.uint8] + [{"labels": tf.uint16, "instances": tf.uint8, "depths": tf.float32}[k]
                              for k in fields]
    lut = tf.constant(table)
    c40 = tf.constant(class40)
    stuff = tf.constant(_STUFF_40, tf.int32)

    def decode(row):
        index = row["index"]
        arrays = tf.numpy_function(reader, [index], out_types, stateful=False)
        values = dict(zip(["images"] + fields, arrays))
        out = {"image": resize_image(tf.ensure_shape(values["images"], (None, None, 3)), (h, w))}
        if "labels" in values:
            labels = tf.cast(tf.ensure_shape(values["labels"], (None, None)), tf.int32)
            top = tf.reduce_max(labels)
            check = tf.debugging.Assert(top < len(table), [
                "label id outside 0..894 (the NYUv2 label table) in", mat, "labels of image (0-based)", index,
                "max label", top])
            with tf.control_dependencies([check]):
                labels = tf.identity(labels)
            if "semantic" in tasks:
                out["semantic"] = tf.ensure_shape(tf.gather(lut, resize_nearest(labels[..., None], (h, w))[..., 0]),
                                                  (h, w))
            if "instance" in tasks:
                inst = tf.cast(tf.ensure_shape(values["instances"], (None, None)), tf.int32)
                cls = tf.gather(c40, labels)
                thing = (labels > 0) & (inst > 0) & (cls > 0) & tf.reduce_all(
                    tf.not_equal(cls[..., None], stuff), axis=-1)
                ids = tf.where(thing, labels * 256 + inst, 0)
                out["instance_ids"] = tf.ensure_shape(resize_nearest(ids[..., None], (h, w))[..., 0], (h, w))
        if "depth" in tasks:
            d = metric_depth(tf.ensure_shape(values["depths"], (None, None))[..., None], depth_target == "inverse")
            out["depth"] = tf.ensure_shape(resize_nearest(d, (h, w)), (h, w, 1))
        return out

    return Source(columns={"index": indices.astype(np.int64)}, decode=decode, num_examples=int(indices.size),
                  tasks=tasks, image_size=(h, w), depth_scales_with_zoom=False)


def count(data_dir, split="train"):
    n, _ = check_nyuv2_mat(_path(data_dir, "mat"), ())
    return int(read_nyuv2_splits(data_dir, n)[_split_key(split)].size)


def validate_split(data_dir, split, num_classes, tasks, workers=4, max_errors=20, depth_target=None):
    """The ``.mat``, ``splits.mat``, the class maps, and every image's labels (0..894) and depth (``--check``)."""
    import h5py

    report = SplitReport(split)
    mat = _path(data_dir, "mat")
    try:
        table, _ = nyuv2_label_table(data_dir, num_classes)
        n, (h, w) = check_nyuv2_mat(mat, tasks)
        indices = read_nyuv2_splits(data_dir, n)[_split_key(split)]
    except (OSError, ValueError) as e:
        report.errors.append((mat, error_message(e)))
        return report
    report.examples = int(indices.size)
    needed = {d for t in tasks for d in _NEEDS.get(t, ())}  # the .mat datasets the reader reads for the tasks
    try:
        _validate_images(h5py.File(mat, "r"), mat, indices, needed, table, (h, w), report, max_errors)
    except _H5_ERRORS as e:  # a chunk or B-tree corrupt past the header checks
        report.errors.append((mat, f"{mat} is a corrupt HDF5 file ({type(e).__name__}: {_one_line(e)})"))
    return report


def _validate_images(f, mat, indices, needed, table, size, report, max_errors):
    h, w = size
    with f:
        for i in indices:
            report.add({"size": (w, h)})
            if "labels" in f and "labels" in needed:
                lab = f["labels"][i]
                if lab.max() >= len(table):
                    report.errors.append((mat, f"{mat}: labels of image {i + 1} (1-based) hold id {int(lab.max())} "
                                               f"outside 0..894"))
                else:
                    report.add({"pixels": lab.size, "labelled_pixels": int((table[lab] != 255).sum())})
            if "depths" in f and "depths" in needed:
                d = f["depths"][i]
                report.add({"depth_pixels": d.size, "valid_depth_pixels": int((np.isfinite(d) & (d > 0)).sum())})
            if len(report.errors) >= max_errors:
                break
