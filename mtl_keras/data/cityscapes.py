"""tf.data loader for the CityScapes raw layout (real CityScapes and the synthetic set).

Layout: ``{root}/{type}/{split}/{city}/{city}_{seq:06d}_{frame:06d}_{suffix}`` with

* ``leftImg8bit/..._leftImg8bit.png``: RGB 8-bit;
* ``gtFine/..._gtFine_labelIds.png``: 8-bit labelIds;
* ``gtFine/..._gtFine_instanceIds.png``: 16-bit, ``labelId * 1000 + k`` on instance pixels,
  plain labelId elsewhere;
* ``disparity/..._disparity.png``: 16-bit, ``p > 0`` -> ``d = (p - 1) / 256`` px, ``p == 0``
  invalid;
* ``camera/..._camera.json``: baseline and intrinsics.

Pipeline: file list -> (shard) -> shuffle file names -> decode + resize + map labels (parallel
map) -> (cache) -> (shuffle decoded elements when cached) -> (repeat) -> flip + instance
centroid vectors + depth targets (parallel map) -> batch -> prefetch. Everything runs in TF ops
(no ``py_function``), so the pipeline is deterministic under ``seed``.
"""

from __future__ import annotations

import glob
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data.labels import known_label_mask, label_lookup_table  # noqa: E402

__all__ = ["list_cityscapes_files", "load_cityscapes", "TASKS", "FILE_TYPES"]

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


def _stem(path: str, suffix: str) -> str:
    name = os.path.basename(path)
    return name[: -len(suffix) - 1]  # strip "_" + suffix


def _scan(data_dir: str, split: str, key: str) -> dict:
    folder, suffix = FILE_TYPES[key]
    split_dir = os.path.join(data_dir, folder, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"missing folder {split_dir}: expected {folder}/{split}/{{city}}/"
            f"{{city}}_{{seq}}_{{frame}}_{suffix} files under the CityScapes root {data_dir}")
    files = glob.glob(os.path.join(glob.escape(split_dir), "*", f"*_{suffix}"))
    return {(os.path.basename(os.path.dirname(p)), _stem(p, suffix)): p for p in files}


def list_cityscapes_files(data_dir, split: str = "train", require=_ALL_KEYS) -> list[dict]:
    """Lists the samples of a split of a CityScapes-layout folder.

    Returns a list sorted by (city, stem) of dicts with keys ``"id"`` (``city_seq_frame``),
    ``"city"`` and one path per key in ``require`` (any of ``"image"``, ``"label_ids"``,
    ``"instance_ids"``, ``"disparity"``, ``"camera"``; ``"image"`` is always included).

    Raises ``FileNotFoundError`` naming the folder when the root or a required
    ``{type}/{split}`` folder is missing, or naming the file when an image lacks one of its
    required files (or a required file has no image); ``ValueError`` for an empty split or an
    unknown key.
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
    found = {"image": images}
    found.update({k: _scan(data_dir, split, k) for k in require[1:]})
    for key in require[1:]:
        folder, suffix = FILE_TYPES[key]
        missing = sorted(set(images) - set(found[key]))
        if missing:
            city, stem = missing[0]
            expected = os.path.join(data_dir, folder, split, city, f"{stem}_{suffix}")
            raise FileNotFoundError(
                f"image {images[missing[0]]} has no {key} file: expected {expected} "
                f"({len(missing)} image(s) of split {split!r} lack their {suffix})")
        orphans = sorted(set(found[key]) - set(images))
        if orphans:
            city, stem = orphans[0]
            expected = os.path.join(data_dir, FILE_TYPES["image"][0], split, city,
                                    f"{stem}_{FILE_TYPES['image'][1]}")
            raise FileNotFoundError(
                f"{key} file {found[key][orphans[0]]} has no image: expected {expected} "
                f"({len(orphans)} {suffix} file(s) of split {split!r} without an image)")
    out = []
    for city_stem in sorted(images):
        entry = {"id": city_stem[1], "city": city_stem[0]}
        entry.update({k: found[k][city_stem] for k in require})
        out.append(entry)
    return out


def _read_baseline_fx(camera_path: str) -> float:
    try:
        with open(camera_path) as f:
            cam = json.load(f)
        return float(cam["extrinsic"]["baseline"]) * float(cam["intrinsic"]["fx"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read extrinsic.baseline and intrinsic.fx from {camera_path}: {e}") from e


# ----------------------------------------------------------------------------------------
# TF map functions
# ----------------------------------------------------------------------------------------


def _decode_stage(tasks, image_size, num_classes):
    """Decoding + resizing + label mapping (cacheable, compact dtypes)."""
    h, w = image_size
    lut = tf.constant(label_lookup_table(num_classes), dtype=tf.uint8)
    known = tf.constant(known_label_mask())

    def resize_nearest(x):
        return tf.image.resize(x, (h, w), method="nearest")

    def fn(elem):
        out = {}
        img = tf.io.decode_png(tf.io.read_file(elem["image"]), channels=3)
        img = tf.image.resize(img, (h, w), method="bilinear", antialias=True)
        out["image"] = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
        if "semantic" in tasks:
            path = elem["label_ids"]
            ids = tf.io.decode_png(tf.io.read_file(path), channels=1, dtype=tf.uint8)
            present = tf.math.bincount(tf.reshape(tf.cast(ids, tf.int32), [-1]), minlength=256,
                                       maxlength=256) > 0
            bad = tf.where(tf.logical_and(present, tf.logical_not(known)))[:, 0]
            check = tf.debugging.Assert(
                tf.equal(tf.size(bad), 0),
                ["unknown CityScapes labelId(s) (not in cityscapesscripts' table) in labelIds "
                 "file", path, "unknown ids:", bad], summarize=20)
            with tf.control_dependencies([check]):
                ids = tf.identity(ids)
            sem = tf.gather(lut, tf.cast(resize_nearest(ids)[..., 0], tf.int32))
            out["semantic"] = tf.ensure_shape(sem, (h, w))
        if "instance" in tasks:
            inst = tf.io.decode_png(tf.io.read_file(elem["instance_ids"]), channels=1,
                                    dtype=tf.uint16)
            out["instance_ids"] = tf.ensure_shape(
                tf.cast(resize_nearest(inst)[..., 0], tf.int32), (h, w))
        if "depth" in tasks:
            disp = tf.io.decode_png(tf.io.read_file(elem["disparity"]), channels=1,
                                    dtype=tf.uint16)
            out["disparity_width"] = tf.cast(tf.shape(disp)[1], tf.float32)
            out["disparity"] = tf.ensure_shape(resize_nearest(disp)[..., 0], (h, w))
            if "baseline_fx" in elem:
                out["baseline_fx"] = elem["baseline_fx"]
        out["image"] = tf.ensure_shape(out["image"], (h, w, 3))
        return out

    return fn


def instance_centroid_vectors(instance_ids):
    """(dy, dx) from each pixel to the centroid of its instance, and the instance mask.

    ``instance_ids``: int HxW CityScapes instanceIds (instances are ids >= 1000). Returns
    (vectors float32 HxWx2, mask float32 HxWx1); vectors are 0 outside instances.
    """
    ids = tf.cast(instance_ids, tf.int32)
    shape = tf.shape(ids)
    h, w = shape[0], shape[1]
    is_inst = ids >= 1000
    # non-instance pixels all go to one segment (id -1) that is masked out afterwards
    flat = tf.reshape(tf.where(is_inst, ids, -1), [-1])
    _, seg = tf.unique(flat)
    n = tf.reduce_max(seg) + 1
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float64), tf.range(w, dtype=tf.float64),
                         indexing="ij")
    yy, xx = tf.reshape(yy, [-1]), tf.reshape(xx, [-1])
    count = tf.math.unsorted_segment_sum(tf.ones_like(yy), seg, n)
    cy = tf.math.unsorted_segment_sum(yy, seg, n) / count
    cx = tf.math.unsorted_segment_sum(xx, seg, n) / count
    vec = tf.stack([tf.gather(cy, seg) - yy, tf.gather(cx, seg) - xx], axis=-1)
    mask = tf.reshape(is_inst, [-1, 1])
    vec = tf.where(mask, vec, tf.zeros_like(vec))
    vec = tf.reshape(tf.cast(vec, tf.float32), tf.stack([h, w, 2]))
    return vec, tf.reshape(tf.cast(mask, tf.float32), tf.stack([h, w, 1]))


def _target_stage(tasks, image_size, flip, seed, depth_target, shard_id, num_shards):
    h, w = image_size

    def fn(epoch_index, elem):
        image = elem["image"]
        fields = {k: elem[k] for k in ("semantic", "instance_ids", "disparity") if k in elem}
        if flip:
            # stateless draw keyed on (seed, position in the stream), so deterministic
            key = tf.stack([tf.constant(seed, tf.int64),
                            epoch_index * num_shards + shard_id])
            do_flip = tf.random.stateless_uniform([], seed=key) < 0.5
            image = tf.cond(do_flip, lambda: tf.reverse(image, [1]), lambda: image)
            fields = {k: tf.cond(do_flip, lambda v=v: tf.reverse(v, [1]), lambda v=v: v)
                      for k, v in fields.items()}
        targets = {}
        if "semantic" in tasks:
            targets["semantic"] = tf.ensure_shape(tf.cast(fields["semantic"], tf.int32), (h, w))
        if "instance" in tasks:
            vec, mask = instance_centroid_vectors(fields["instance_ids"])
            targets["instance"] = tf.ensure_shape(vec, (h, w, 2))
            targets["instance_mask"] = tf.ensure_shape(mask, (h, w, 1))
        if "depth" in tasks:
            p = tf.cast(fields["disparity"], tf.float32)[..., None]
            d = (p - 1.0) / 256.0  # disparity in px at the PNG's (full) resolution
            if depth_target == "inverse":
                valid = p > 0
                value = d * (float(w) / elem["disparity_width"])
            else:  # metric depth in metres; d == 0 (p == 1) is at infinity -> invalid
                valid = p > 1
                value = elem["baseline_fx"] / tf.where(valid, d, 1.0)
            targets["depth"] = tf.ensure_shape(tf.where(valid, value, 0.0), (h, w, 1))
            targets["depth_mask"] = tf.ensure_shape(tf.cast(valid, tf.float32), (h, w, 1))
        return tf.cast(image, tf.float32), targets

    return fn


def _check_image_size(image_size):
    try:
        h, w = (int(v) for v in image_size)
        ok = h > 0 and w > 0 and all(float(v) == int(v) for v in image_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image_size must be (height, width) with positive ints, got {image_size!r}")
    return h, w


def load_cityscapes(data_dir, split: str = "train", image_size=(128, 256), batch_size: int = 8,
                    num_classes: int = 19, tasks=("semantic", "instance", "depth"),
                    shuffle=None, seed: int = 0, flip=None, repeat: bool = False,
                    drop_remainder=None, depth_target: str = "inverse", cache=False,
                    num_parallel_calls=tf.data.AUTOTUNE,
                    input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(image, targets)`` batches from a CityScapes-layout folder.

    * ``image``: float32 ``(B, H, W, 3)`` RGB in 0..255 (not normalised).
    * ``targets`` (only for the requested ``tasks``):
      ``"semantic"`` int32 ``(B, H, W)`` training ids, 255 = ignore;
      ``"instance"`` float32 ``(B, H, W, 2)`` (dy, dx) from the pixel to its instance's
      centroid in pixels at the training resolution, 0 outside instances, and
      ``"instance_mask"`` float32 ``(B, H, W, 1)``;
      ``"depth"`` float32 ``(B, H, W, 1)`` inverse depth = disparity in px at the training
      width (``depth_target="inverse"``) or metres (``"metric"``), 0 where invalid, and
      ``"depth_mask"`` float32 ``(B, H, W, 1)``.

    ``shuffle``, ``flip`` default to ``split == "train"``; ``drop_remainder`` defaults to
    ``split == "train"``. ``cache``: False, True (memory) or a file name prefix. The random
    order and flips are deterministic under ``seed``. With ``input_context`` the file list is
    sharded (``num_input_pipelines``, ``input_pipeline_id``) before shuffling and
    ``batch_size`` is the per-replica batch size.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks!r}")
    if depth_target not in ("inverse", "metric"):
        raise ValueError(f"depth_target must be 'inverse' or 'metric', got {depth_target!r}")
    label_lookup_table(num_classes)  # validates num_classes
    h, w = _check_image_size(image_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    is_train = split == "train"
    shuffle = is_train if shuffle is None else bool(shuffle)
    flip = is_train if flip is None else bool(flip)
    drop_remainder = is_train if drop_remainder is None else bool(drop_remainder)

    require = ["image"]
    if "semantic" in tasks:
        require.append("label_ids")
    if "instance" in tasks:
        require.append("instance_ids")
    if "depth" in tasks:
        require.append("disparity")
        if depth_target == "metric":
            require.append("camera")
    files = list_cityscapes_files(data_dir, split, require=require)

    columns = {k: [f[k] for f in files] for k in require if k != "camera"}
    if depth_target == "metric" and "depth" in tasks:
        columns["baseline_fx"] = np.array([_read_baseline_fx(f["camera"]) for f in files],
                                          np.float32)
    ds = tf.data.Dataset.from_tensor_slices(columns)

    shard_id, num_shards = 0, 1
    if input_context is not None:
        num_shards = int(input_context.num_input_pipelines)
        shard_id = int(input_context.input_pipeline_id)
        ds = ds.shard(num_shards, shard_id)
    n = max(1, -(-len(files) // num_shards))
    shuffle_seed = int(seed) * 1009 + shard_id

    if shuffle and not cache:  # shuffle the (cheap) file names before decoding
        ds = ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(_decode_stage(tasks, (h, w), num_classes), num_parallel_calls=num_parallel_calls)
    if cache:
        ds = ds.cache(os.fspath(cache) if isinstance(cache, (str, os.PathLike)) else "")
        if shuffle:
            ds = ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()
    ds = ds.map(_target_stage(tasks, (h, w), flip, int(seed), depth_target, shard_id, num_shards),
                num_parallel_calls=num_parallel_calls)
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
