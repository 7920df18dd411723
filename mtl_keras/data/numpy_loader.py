"""TensorFlow-free loaders (``keras.utils.PyDataset``) of the CityScapes raw layout and of folder datasets, for
training and evaluation on the JAX and PyTorch backends without TensorFlow (numpy, OpenCV and Keras only).

**Same values as the tf.data loader.** Without augmentation the batches equal ``load_dataset``'s bit for bit: the
image resize re-implements ``tf.image.resize(method="bilinear", antialias=True)`` (TF's ``ScaleAndTranslate`` with
the triangle kernel: the same float32 span weights, rows then columns, then round-half-to-even), and label maps use
TF's half-pixel-centre nearest-neighbour indices. OpenCV's resizes differ from TF's by up to 28 grey levels
(``INTER_AREA`` / ``INTER_LINEAR``) or pick other pixels (``INTER_NEAREST``, ``INTER_NEAREST_EXACT``).

**Order and flips**: examples sorted by file name; with ``shuffle`` data epoch ``e`` is in the order
``np.random.default_rng([seed, e]).permutation(n)``; example ``k`` of epoch ``e`` is mirrored when
``np.random.default_rng([seed, e, k, 1]).random() < 0.5`` (the trailing 1 keeps that stream apart from the
permutation's: numpy's seed sequences ignore trailing zeros). Every batch is a pure function of
``(seed, epoch, index)``, so worker threads or processes cannot change it.

**Epochs.** ``epoch`` advances in ``on_epoch_end``. Keras 3.15's ``fit`` also calls it once before the first epoch
(after building the model), so Keras epoch ``i`` of ``fit`` reads data epoch ``initial_epoch + i + 1``: a run resumed
with ``fit(initial_epoch=k)`` on a dataset made with ``initial_epoch=k`` reads the same data as the uninterrupted
run. Pass ``shuffle=False`` to ``fit`` (it would permute the batch indices with Python's ``random``).

**steps_per_epoch.** Keras 3.15 cannot draw more than ``len(ds)`` batches from a finite PyDataset in one epoch, and
an infinite one never ends a plain ``for`` loop. So with ``steps_per_epoch=S`` the dataset stays finite,
``len(ds) == S``, and serves an endless stream of passes cut into full batches (as ``repeat()`` before ``batch()``):
batch ``i`` of epoch ``e`` holds stream elements ``(e S + i) B ... (e S + i + 1) B - 1``, element ``q`` being example
``order(q // n)[q % n]`` of pass ``q // n``.

**workers > 1**: Keras 3.15 keeps the batches it prefetched while ``fit`` builds the model, so the first epoch then
depends on timing; keep ``workers=1`` where a run must be reproducible batch for batch.

Not supported (use the tf.data loaders): metric depth, random scale and crop, caching, sharding over replicas.
"""

from __future__ import annotations

import functools
import logging
import os

import cv2
import keras
import numpy as np

import mtl_keras.data.folder as folder
from mtl_keras.data.checks import PNG_IEND, DataError, check_image_size, check_tasks
from mtl_keras.data.cityscapes import (
    _PNG_EXPECT,
    _WITHHELD_ON_TEST,
    FILE_TYPES,
    TASKS,
    check_cityscapes_files,
    list_cityscapes_files,
)
from mtl_keras.labels import IGNORE_INDEX, known_label_mask, label_lookup_table

log = logging.getLogger("mtl_keras")

_TASK_FILES = {"semantic": "label_ids", "instance": "instance_ids", "depth": "disparity"}
_FLIP_STREAM = 1  # last word of the flip seeds (non-zero: see the module docstring)

_F32 = np.float32


# ----------------------------------------------------------------------------------------------------------------
# Resizing as TensorFlow does it
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _triangle_spans(out_size: int, in_size: int):
    """TF's ``ScaleAndTranslate`` spans (triangle kernel, antialias, no translation) of one axis, in float32.

    Returns ``(indices int (out_size, span), weights float32 (out_size, span))``; taps past the end of the input have
    weight 0 (their index is clamped to stay valid).
    """
    scale = _F32(out_size) / _F32(in_size)  # tf.image.resize: float32 new_size / old_size
    inv_scale = _F32(1.0 / np.float64(scale))  # the kernel: const float inv_scale = 1.0 / scale
    kernel_scale = max(inv_scale, _F32(1.0))  # antialias: widen the kernel when downsampling
    span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)  # triangle radius 1
    one_over_kernel_scale = _F32(1.0) / kernel_scale
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, span), _F32)
    for x in range(out_size):
        sample = (_F32(x) + _F32(0.5)) * inv_scale
        if sample < 0 or sample > in_size:  # cannot happen without translation; as TF: an empty span
            continue
        start = int(np.ceil(sample - kernel_scale - _F32(0.5)))
        end = int(np.floor(sample + kernel_scale - _F32(0.5)))
        start = min(max(start, 0), in_size - 1)
        end = min(max(end, 0), in_size - 1) + 1
        taps, total = [], _F32(0.0)
        for source in range(start, end):
            pos = abs((_F32(source) + _F32(0.5) - sample) * one_over_kernel_scale)
            w = _F32(1.0) - pos if pos < 1.0 else _F32(0.0)
            total = _F32(total + w)
            taps.append(w)
        if abs(total) >= 1000.0 * np.finfo(_F32).tiny:
            weights[x, : len(taps)] = np.array(taps, _F32) * (_F32(1.0) / total)
        starts[x] = start
    indices = np.minimum(starts[:, None] + np.arange(span), in_size - 1)
    return indices, weights


def _resize_triangle(image, out_h: int, out_w: int):
    """float32 ``tf.image.resize(image, (out_h, out_w), "bilinear", antialias=True)`` of an HxWxC array."""
    x = np.asarray(image)
    if x.dtype not in (np.uint8, np.uint16, _F32):
        x = x.astype(_F32)
    rows, row_w = _triangle_spans(int(out_h), x.shape[0])
    inter = np.zeros((int(out_h),) + x.shape[1:], _F32)
    term = np.empty_like(inter)
    tail = (1,) * (x.ndim - 1)
    for k in range(rows.shape[1]):  # rows first, taps in order (TF's GatherRows); uint -> float32 is exact
        np.multiply(row_w[:, k].reshape((-1,) + tail), x[rows[:, k]], out=term)
        inter += term
    cols, col_w = _triangle_spans(int(out_w), x.shape[1])
    out = np.zeros((int(out_h), int(out_w)) + x.shape[2:], _F32)
    tail = (1,) * (x.ndim - 2)
    for k in range(cols.shape[1]):  # then columns (TF's GatherColumns)
        out += col_w[:, k].reshape((1, -1) + tail) * inter[:, cols[:, k]]
    return out


def resize_image_numpy(image, image_size):
    """Any HxWx3 image (0..255) -> uint8 ``image_size`` x 3, as ``pipeline.resize_image``: TF's antialiased
    bilinear (triangle) resize, rounded half to even, clipped."""
    h, w = (int(v) for v in image_size)
    out = _resize_triangle(image, h, w)
    return np.clip(np.rint(out), 0.0, 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def nearest_indices(out_size: int, in_size: int):
    """Source index of each output index of ``tf.image.resize(method="nearest")`` along one axis:
    ``min(floor((i + 0.5) * (in / out)), in - 1)`` in float32 (TF's half-pixel-centre nearest neighbour)."""
    scale = _F32(in_size) / _F32(out_size)
    idx = np.floor((np.arange(out_size, dtype=_F32) + _F32(0.5)) * scale).astype(np.int64)
    idx = np.minimum(idx, in_size - 1)
    idx.setflags(write=False)
    return idx


def resize_nearest_numpy(array, image_size):
    """HxW(xC) array -> ``image_size``, picking the pixels ``tf.image.resize(method="nearest")`` picks."""
    h, w = (int(v) for v in image_size)
    a = np.asarray(array)
    return a[nearest_indices(h, a.shape[0])][:, nearest_indices(w, a.shape[1])]


def centroid_vectors_numpy(segment_ids):
    """(dy, dx) from each pixel to the centroid of its segment, and the mask of segment pixels (numpy version of
    ``pipeline.centroid_vectors``).

    ``segment_ids``: int HxW, ``0`` = no instance, any other value = one instance. Returns (vectors float32 HxWx2,
    mask float32 HxWx1); vectors are 0 outside instances. Centroids are means of pixel indices (float64).
    """
    ids = np.asarray(segment_ids)
    h, w = ids.shape
    mask = ids != 0
    vec = np.zeros((h, w, 2), _F32)
    ys, xs = np.nonzero(mask)  # row-major, the order of ids[mask]
    if ys.size:
        _, seg = np.unique(ids[mask], return_inverse=True)
        seg = seg.reshape(-1)
        count = np.bincount(seg).astype(np.float64)
        yf, xf = ys.astype(np.float64), xs.astype(np.float64)
        cy = np.bincount(seg, weights=yf) / count
        cx = np.bincount(seg, weights=xf) / count
        vec[ys, xs, 0] = (cy[seg] - yf).astype(_F32)
        vec[ys, xs, 1] = (cx[seg] - xf).astype(_F32)
    return vec, mask[..., None].astype(_F32)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _read_png(path, flags):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 45 or data[-12:] != PNG_IEND:
        raise DataError(f"{path} is a truncated or corrupt PNG: it does not end with the IEND chunk "
                        f"({len(data)} bytes; re-extract or re-download it)")
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise DataError(f"{path}: OpenCV cannot decode the PNG; the file is corrupt: re-extract or re-download it")
    return array


def _read_label_png(path, key, expect=_PNG_EXPECT):
    what, depth = expect[key][:2]
    dtype = np.uint8 if depth == 8 else np.uint16
    array = _read_png(path, cv2.IMREAD_UNCHANGED)
    if array.dtype != dtype or array.ndim != 2:
        raise DataError(f"{path}: expected a single-channel {depth}-bit {what} PNG, got {array.dtype} with shape "
                        f"{array.shape}")
    return array


def _disparity_depth(raw, image_size):
    """``cityscapes.disparity_depth`` (inverse depth) in numpy."""
    h, w = image_size
    p = resize_nearest_numpy(raw, (h, w)).astype(_F32)[..., None]
    d = (p - _F32(1.0)) / _F32(256.0)  # disparity in px at the PNG's (full) resolution
    value = d * (_F32(w) / _F32(raw.shape[1]))  # px at the training width
    return np.where(p > 0, value, _F32(np.nan)).astype(_F32)


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class CityscapesPyDataset(keras.utils.PyDataset):
    """``(image, targets)`` batches of a CityScapes-layout split, without TensorFlow (see the module docstring).

    ``data_dir``: the CityScapes root (``leftImg8bit/``, ``gtFine/``, ``disparity/``). ``image_size``: (H, W) every
    file is resized to. ``tasks``: any of ``"semantic"``, ``"instance"``, ``"depth"`` (a comma-separated string is
    accepted). ``num_classes``: 19 (trainIds) or 7 (categories). ``shuffle``, ``flip`` and ``drop_remainder`` default
    to ``split == "train"``. ``seed``: non-negative int; the order and the flips are functions of
    ``(seed, epoch, index)``. ``steps_per_epoch``: batches per epoch drawn from an endless stream of passes (see
    "More steps per epoch than one pass"); ``None``: one pass per epoch. ``initial_epoch``: the first data epoch (set
    it to ``fit``'s ``initial_epoch`` when resuming). ``depth_target``: only ``"inverse"``. ``check_files``: read
    every PNG header up front (complete file, bit depth, size) so that a broken file is named before training.
    ``**kwargs``: ``workers``, ``use_multiprocessing``, ``max_queue_size`` of ``keras.utils.PyDataset``.

    ``len(ds)``: batches per epoch; ``ds[i]``: batch ``i`` of the current ``ds.epoch``; iterating yields ``len(ds)``
    batches; ``ds.on_epoch_end()`` moves to the next epoch.
    """

    def __init__(self, data_dir, split="train", image_size=(128, 256), batch_size=8, num_classes=19,
                 tasks=TASKS, shuffle=None, flip=None, seed=0, drop_remainder=None, steps_per_epoch=None,
                 initial_epoch=0, depth_target="inverse", check_files=True, **kwargs):
        super().__init__(**kwargs)
        if depth_target != "inverse":
            if depth_target == "metric":
                raise ValueError("depth_target='metric' is not supported by the TensorFlow-free loader "
                                 "(mtl_keras.data.numpy_loader); use the tf.data loader "
                                 "mtl_keras.data.load_cityscapes(..., depth_target='metric')")
            raise ValueError(f"depth_target must be 'inverse' (or 'metric' with the tf.data loader), "
                             f"got {depth_target!r}")
        self.data_dir = os.fspath(data_dir)
        self.tasks, self.num_classes = self._check_data(tasks, num_classes)
        self.image_size = check_image_size(image_size)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.epoch = _check_int(initial_epoch, "initial_epoch", 0)
        self.steps_per_epoch = None if steps_per_epoch is None else _check_int(steps_per_epoch, "steps_per_epoch", 1)
        is_train = split == "train"
        self.split = split
        self.shuffle = is_train if shuffle is None else bool(shuffle)
        self.flip = is_train if flip is None else bool(flip)
        self.drop_remainder = is_train if drop_remainder is None else bool(drop_remainder)
        self.files = self._list_files(split, check_files)
        self.num_examples = len(self.files)
        if self.steps_per_epoch is None and self.drop_remainder and self.num_examples < self.batch_size:
            raise ValueError(f"split {split!r} of {self.data_dir} has {self.num_examples} example(s), fewer than "
                             f"batch_size={self.batch_size}: with drop_remainder=True there is no batch (pass "
                             f"drop_remainder=False or a smaller batch_size)")

    def _check_data(self, tasks, num_classes):
        tasks = tuple(dict.fromkeys(check_tasks(tasks, TASKS, "cityscapes")))
        self._lut = label_lookup_table(num_classes)  # validates num_classes
        known = known_label_mask()
        self._max_known = int(np.nonzero(known)[0].max())
        assert known[: self._max_known + 1].all(), "the fast label check assumes contiguous known ids"
        self._known = known
        return tasks, num_classes

    def _list_files(self, split, check_files):
        require = [_TASK_FILES[t] for t in TASKS if t in self.tasks]
        optional = _WITHHELD_ON_TEST if split == "test" else ()
        files = list_cityscapes_files(self.data_dir, split, require=require, optional=optional)
        self._present = set(files[0])
        withheld = [k for k in require if k not in self._present]
        if withheld:
            log.warning("CityScapes %s: no %s folder(s) for the test split (CityScapes withholds test labels): "
                        "those targets are masked out everywhere", self.data_dir,
                        ", ".join(os.path.join(FILE_TYPES[k][0], split) for k in withheld))
        if check_files:
            check_cityscapes_files(files)
        return files

    # ---- order and augmentation: pure functions of (seed, epoch, index) ----

    def order(self, epoch):
        """The example indices of data epoch ``epoch`` in the order they are served."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)

    def flipped(self, epoch, example):
        """Whether example ``example`` (index into ``files``) is mirrored in data epoch ``epoch``."""
        if not self.flip:
            return False
        return bool(np.random.default_rng([self.seed, int(epoch), int(example), _FLIP_STREAM]).random() < 0.5)

    def batch_elements(self, index, epoch=None):
        """``[(data epoch, example index), ...]`` of batch ``index`` of epoch ``epoch`` (default: the current)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for a dataset of {len(self)} batches")
        epoch = self.epoch if epoch is None else int(epoch)
        n, b = self.num_examples, self.batch_size
        if self.steps_per_epoch is None:
            order = self.order(epoch)
            return [(epoch, int(k)) for k in order[index * b: min((index + 1) * b, n)]]
        first = (epoch * self.steps_per_epoch + index) * b  # position in the endless stream of passes
        out, orders = [], {}
        for q in range(first, first + b):
            p = q // n
            if p not in orders:
                orders[p] = self.order(p)
            out.append((p, int(orders[p][q % n])))
        return out

    # ---- PyDataset ----

    def __len__(self):
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_remainder else -(-n // b)

    @property
    def num_batches(self):
        return len(self)

    def __getitem__(self, index):
        examples = [self.example(k, self.flipped(e, k)) for e, k in self.batch_elements(index)]
        images = np.stack([im for im, _ in examples])
        targets = {key: np.stack([t[key] for _, t in examples]) for key in examples[0][1]}
        return images, targets

    def on_epoch_end(self):
        self.epoch += 1

    # ---- one example ----

    def prepared(self, example):
        """Example ``example`` (index into ``files``) at the training size, before flips and targets: ``"image"``
        uint8 HxWx3, ``"semantic"`` uint8 HxW, ``"instance_ids"`` int32 HxW (ids >= 1000, else 0), ``"depth"`` float32
        HxWx1 inverse depth, NaN = invalid (the prepared example of ``mtl_keras.data.pipeline``)."""
        entry = self.files[example]
        h, w = self.image_size
        image = _read_png(entry["image"], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        out = {"image": resize_image_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (h, w))}
        if "semantic" in self.tasks:
            if "label_ids" in self._present:
                ids = _read_label_png(entry["label_ids"], "label_ids")
                if int(ids.max()) > self._max_known:  # known ids are 0..33: one max tells whether the file is clean
                    hist = np.bincount(ids.reshape(-1), minlength=256)
                    bad = np.nonzero((hist > 0) & ~self._known)[0]
                    raise DataError(f"unknown CityScapes labelId(s) (not in cityscapesscripts' table, ids 0..33) "
                                    f"in labelIds file {entry['label_ids']}: unknown ids {bad.tolist()}")
                out["semantic"] = self._lut[resize_nearest_numpy(ids, (h, w))]
            else:  # withheld test labels: ignore everywhere
                out["semantic"] = np.full((h, w), IGNORE_INDEX, np.uint8)
        if "instance" in self.tasks:
            if "instance_ids" in self._present:
                inst = resize_nearest_numpy(_read_label_png(entry["instance_ids"], "instance_ids"), (h, w))
                inst = inst.astype(np.int32)
                out["instance_ids"] = np.where(inst >= 1000, inst, 0)  # plain labelIds (incl. groups): no instance
            else:
                out["instance_ids"] = np.zeros((h, w), np.int32)
        if "depth" in self.tasks:
            if "disparity" in self._present:
                out["depth"] = _disparity_depth(_read_label_png(entry["disparity"], "disparity"), (h, w))
            else:
                out["depth"] = np.full((h, w, 1), np.nan, _F32)
        return out

    def example(self, example, flip=False):
        """``(image float32 HxWx3, targets)`` of example ``example`` (index into ``files``), mirrored if ``flip``."""
        prep = self.prepared(example)
        if flip:
            prep = {k: v[:, ::-1] for k, v in prep.items()}
        targets = {}
        if "semantic" in prep:
            targets["semantic"] = prep["semantic"].astype(np.int32)
        if "instance_ids" in prep:
            targets["instance"], targets["instance_mask"] = centroid_vectors_numpy(prep["instance_ids"])
        if "depth" in prep:
            valid = np.isfinite(prep["depth"])
            targets["depth"] = np.where(valid, prep["depth"], _F32(0.0)).astype(_F32)
            targets["depth_mask"] = valid.astype(_F32)
        return prep["image"].astype(_F32), targets

    def __repr__(self):
        return (f"CityscapesPyDataset({self.data_dir!r}, split={self.split!r}, image_size={self.image_size}, "
                f"batch_size={self.batch_size}, tasks={self.tasks}, examples={self.num_examples}, "
                f"batches={len(self)}, epoch={self.epoch})")


def load_cityscapes_numpy(data_dir, split="train", **kwargs) -> CityscapesPyDataset:
    return CityscapesPyDataset(data_dir, split, **kwargs)


class FolderPyDataset(CityscapesPyDataset):
    """The TensorFlow-free loader of a folder dataset (``mtl_keras.data.folder``): the batches of
    ``load_dataset("folder", ...)`` without augmentation, the order, flips and epochs of :class:`CityscapesPyDataset`."""

    _EXPECT = {task: (what, depth) for task, (_, what, depth) in folder.FOLDERS.items()}

    def __init__(self, data_dir, split="train", image_size=(128, 256), batch_size=8, num_classes=None, tasks=None,
                 **kwargs):
        super().__init__(data_dir, split, image_size, batch_size, num_classes, tasks, **kwargs)

    def _check_data(self, tasks, num_classes):
        self.classes = folder.read_classes(self.data_dir)
        num_classes = folder.checked_num_classes(self.data_dir, self.classes, num_classes)
        self._lut = folder.label_table(self.classes)[0]
        present = folder.folder_tasks(self.data_dir)
        return check_tasks(present if tasks is None else tasks, present, f"the folder dataset {self.data_dir}"), \
            num_classes

    def _list_files(self, split, check_files):
        return folder.list_folder_files(self.data_dir, split, self.tasks, check=check_files)

    def prepared(self, example):
        entry = self.files[example]
        h, w = self.image_size
        image = cv2.imread(entry["image"], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise DataError(f"{entry['image']}: cannot decode the image (expected an RGB PNG or JPG)")
        out = {"image": resize_image_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (h, w))}
        maps = {t: _read_label_png(entry[t], t, self._EXPECT) for t in self.tasks}
        for task, array in maps.items():
            if array.shape != image.shape[:2]:
                raise DataError(f"{entry[task]}: {self._EXPECT[task][0]} is {array.shape[1]}x{array.shape[0]} but its "
                                f"image is {image.shape[1]}x{image.shape[0]}")
        if "semantic" in maps:
            bad = np.unique(maps["semantic"][~folder.label_table(self.classes)[1][maps["semantic"]]])
            if bad.size:
                raise DataError(f"{entry['semantic']}: label values {bad[:10].tolist()} are neither class ids nor the "
                                f"ignore label {self.classes.ignore_label}")
            out["semantic"] = self._lut[resize_nearest_numpy(maps["semantic"], (h, w))]
        if "instance" in maps:
            out["instance_ids"] = resize_nearest_numpy(maps["instance"], (h, w)).astype(np.int32)
        if "depth" in maps:
            out["depth"] = _disparity_depth(maps["depth"], (h, w))
        return out
