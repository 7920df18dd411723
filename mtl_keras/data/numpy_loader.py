"""TensorFlow-free loaders (``keras.utils.PyDataset``) of the CityScapes raw layout and of folder datasets, for the
JAX and PyTorch backends without TensorFlow. Without augmentation the batches equal ``load_dataset``'s bit for bit:
the image resize re-implements TF's antialiased bilinear ``ScaleAndTranslate`` (same float32 span weights, rows then
columns, round half to even; OpenCV's resizes differ by up to 28 grey levels) and label maps use TF's half-pixel
nearest indices.

Batches are pure functions of ``(seed, epoch, index)``: epoch ``e``'s order is ``default_rng([seed, e])``'s
permutation, example ``k`` is mirrored when ``default_rng([seed, e, k, 1]).random() < 0.5`` (seed sequences ignore
trailing zeros). Keras 3.15's ``fit`` calls ``on_epoch_end`` once before the first epoch too, so ``initial_epoch=k``
resumes the data of an uninterrupted run (pass ``shuffle=False`` to ``fit``); it draws at most ``len(ds)`` batches
per epoch, so ``steps_per_epoch=S`` cuts ``len(ds) == S`` full batches from an endless stream of passes. Keep
``workers=1`` for batch-exact runs (Keras keeps the batches it prefetched while building the model). Not supported:
metric depth, random scale and crop, caching, sharding (use tf.data).
"""

from __future__ import annotations

import functools
import os

import cv2
import keras
import numpy as np

import mtl_keras.data.folder as folder
from mtl_keras.data.checks import DataError, check_image_size, check_tasks, imread_label, imread_png
from mtl_keras.data.cityscapes import _PNG_EXPECT, _TASK_FILES, TASKS, list_task_files
from mtl_keras.labels import IGNORE_INDEX, known_label_mask, label_lookup_table

_FLIP_STREAM = 1  # last word of the flip seeds (non-zero: see the module docstring)
_F32 = np.float32


@functools.lru_cache(maxsize=64)
def _triangle_spans(out_size: int, in_size: int):
    """TF's ``ScaleAndTranslate`` spans of one axis (triangle kernel, antialias, no translation) in float32:
    ``(indices int (out_size, span), weights float32 (out_size, span))``; taps past the input's end weigh 0."""
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
    """``pipeline.resize_image`` in numpy: any HxWx3 image (0..255) -> uint8 ``image_size`` x 3."""
    h, w = (int(v) for v in image_size)
    out = _resize_triangle(image, h, w)
    return np.clip(np.rint(out), 0.0, 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def nearest_indices(out_size: int, in_size: int):
    """The source index of each output index of ``tf.image.resize(method="nearest")`` along one axis:
    ``min(floor((i + 0.5) * (in / out)), in - 1)`` in float32."""
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
    """``pipeline.centroid_vectors`` in numpy."""
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


def _disparity_depth(raw, image_size):
    """``cityscapes.disparity_depth`` (inverse depth) in numpy."""
    h, w = image_size
    p = resize_nearest_numpy(raw, (h, w)).astype(_F32)[..., None]
    d = (p - _F32(1.0)) / _F32(256.0)  # disparity in px at the PNG's (full) resolution
    value = d * (_F32(w) / _F32(raw.shape[1]))  # px at the training width
    return np.where(p > 0, value, _F32(np.nan)).astype(_F32)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class CityscapesPyDataset(keras.utils.PyDataset):
    """``(image, targets)`` batches of a CityScapes-layout split (the arguments of ``load_dataset``).

    ``shuffle``, ``flip`` and ``drop_remainder`` default to ``split == "train"``. ``steps_per_epoch``: batches per
    epoch from an endless stream of passes (None: one pass). ``initial_epoch``: the first data epoch (``fit``'s when
    resuming). ``check_files``: read every PNG header up front. ``**kwargs``: ``keras.utils.PyDataset``'s
    (``workers``, ...). ``ds[i]`` is batch ``i`` of the current ``ds.epoch``.
    """

    def __init__(self, data_dir, split="train", image_size=(128, 256), batch_size=8, num_classes=19,
                 tasks=TASKS, shuffle=None, flip=None, seed=0, drop_remainder=None, steps_per_epoch=None,
                 initial_epoch=0, depth_target="inverse", check_files=True, **kwargs):
        super().__init__(**kwargs)
        if depth_target != "inverse":
            raise ValueError(f"depth_target must be 'inverse' in the TensorFlow-free loader, got {depth_target!r} "
                             f"(metric depth: the tf.data loader mtl_keras.data.load_cityscapes)")
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
        files = list_task_files(self.data_dir, split, self.tasks, check_files)
        self._present = set(files[0])
        return files

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

    def _read(self, entry):
        """(BGR image, {task: its map at the file's size}) of one sample; withheld targets are left out."""
        image = imread_png(entry["image"], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        maps = {task: imread_label(entry[key], *_PNG_EXPECT[key]) for task, key in _TASK_FILES.items()
                if task in self.tasks and key in self._present}
        if "semantic" in maps and int(maps["semantic"].max()) > self._max_known:  # one max: is the file clean?
            bad = np.nonzero((np.bincount(maps["semantic"].reshape(-1), minlength=256) > 0) & ~self._known)[0]
            raise DataError(f"unknown CityScapes labelId(s) (not in cityscapesscripts' table, ids 0..33) in labelIds "
                            f"file {entry['label_ids']}: unknown ids {bad.tolist()}")
        if "instance" in maps:  # plain labelIds (incl. groups) are no instance
            maps["instance"] = np.where(maps["instance"] >= 1000, maps["instance"], 0)
        return image, maps

    def prepared(self, example):
        """Example ``example`` (index into ``files``) at the training size before flips and targets (the prepared
        example of ``mtl_keras.data.pipeline``); a withheld target is ignored (semantic) or invalid everywhere."""
        h, w = self.image_size
        image, maps = self._read(self.files[example])
        out = {"image": resize_image_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (h, w))}
        if "semantic" in self.tasks:
            out["semantic"] = (self._lut[resize_nearest_numpy(maps["semantic"], (h, w))] if "semantic" in maps
                               else np.full((h, w), IGNORE_INDEX, np.uint8))
        if "instance" in self.tasks:
            out["instance_ids"] = (resize_nearest_numpy(maps["instance"], (h, w)).astype(np.int32) if "instance" in maps
                                   else np.zeros((h, w), np.int32))
        if "depth" in self.tasks:
            out["depth"] = (_disparity_depth(maps["depth"], (h, w)) if "depth" in maps
                            else np.full((h, w, 1), np.nan, _F32))
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


def load_cityscapes_numpy(data_dir, split="train", **kwargs) -> CityscapesPyDataset:
    return CityscapesPyDataset(data_dir, split, **kwargs)


class FolderPyDataset(CityscapesPyDataset):
    """The batches of ``load_dataset("folder", ...)`` without augmentation, with the order, flips and epochs of
    :class:`CityscapesPyDataset`."""

    def __init__(self, data_dir, split="train", image_size=(128, 256), batch_size=8, num_classes=None, tasks=None,
                 **kwargs):
        super().__init__(data_dir, split, image_size, batch_size, num_classes, tasks, **kwargs)

    def _check_data(self, tasks, num_classes):
        self.classes = folder.read_classes(self.data_dir)
        num_classes = folder.checked_num_classes(self.data_dir, self.classes, num_classes)
        self._lut, self._valid = folder.label_table(self.classes)
        present = folder.folder_tasks(self.data_dir)
        return check_tasks(present if tasks is None else tasks, present, f"the folder dataset {self.data_dir}"), \
            num_classes

    def _list_files(self, split, check_files):
        return folder.list_folder_files(self.data_dir, split, self.tasks, check=check_files)

    def _read(self, entry):
        image = folder.read_image(entry["image"])
        maps = {t: imread_label(entry[t], *folder.FOLDERS[t][1:], size=image.shape[1::-1]) for t in self.tasks}
        if "semantic" in maps:
            bad = np.unique(maps["semantic"][~self._valid[maps["semantic"]]])
            if bad.size:
                raise DataError(f"{entry['semantic']}: label values {bad[:10].tolist()} are neither class ids nor the "
                                f"ignore label {self.classes.ignore_label}")
        return image, maps
