"""tf.data loader for the CityScapes raw layout (real CityScapes and the synthetic set).

Layout: ``{root}/{type}/{split}/{city}/{city}_{seq:06d}_{frame:06d}_{suffix}`` with

* ``leftImg8bit/..._leftImg8bit.png``: RGB 8-bit;
* ``gtFine/..._gtFine_labelIds.png``: 8-bit labelIds;
* ``gtFine/..._gtFine_instanceIds.png``: 16-bit, ``labelId * 1000 + k`` on instance pixels,
  plain labelId elsewhere;
* ``disparity/..._disparity.png``: 16-bit, ``p > 0`` -> ``d = (p - 1) / 256`` px, ``p == 0``
  invalid;
* ``camera/..._camera.json``: baseline and intrinsics.

Pipeline (``mtl_keras.data.pipeline``): file list (headers checked up front) -> (shard) -> shuffle file names ->
decode + resize + map labels (parallel map) -> (cache) -> (shuffle decoded elements when cached) -> (repeat) ->
instance centroid vectors + depth targets + augmentation (parallel map) -> batch -> prefetch. Everything runs in
TF ops (no ``py_function``), so the pipeline is deterministic under ``seed``.

The **test split** of the real release has no public labels: its ``gtFine`` files (when extracted) hold only void
ids, which load as "ignore everywhere" (semantic 255, no instance pixel), and when ``gtFine/test`` (or
``disparity/test``) is absent altogether the test split still loads, with every target masked out. Either way the
test split is for predictions to submit, not for scores.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data.checks import PNG_IEND  # noqa: E402
from mtl_keras.data.cityscapes_files import (  # noqa: E402,F401  (the layout, re-exported)
    _WITHHELD_ON_TEST,
    FILE_TYPES,
    TASKS,
    _read_baseline_fx,
    check_cityscapes_files,
    list_cityscapes_files,
)
from mtl_keras.labels import known_label_mask, label_lookup_table  # noqa: E402
from mtl_keras.data.pipeline import (  # noqa: E402
    Source,
    centroid_vectors,
    check_image_size,
    check_tasks,
    load_source,
    resize_image,
)
from mtl_keras.tasks import IGNORE_LABEL  # noqa: E402

__all__ = ["list_cityscapes_files", "load_cityscapes", "cityscapes_source", "check_cityscapes_files",
           "instance_centroid_vectors", "TASKS", "FILE_TYPES"]

log = logging.getLogger("mtl_keras")
# The files each task of this reader needs (its targets come from them); metric depth needs "camera" as well.
_TASK_FILES = {"semantic": ("label_ids",), "instance": ("instance_ids",), "depth": ("disparity",)}


# ----------------------------------------------------------------------------------------
# TF map functions
# ----------------------------------------------------------------------------------------


def _read_png(path, what, bit_depth=None):
    """read_file + in-graph checks that name the file: complete PNG (IEND at the end), bit depth."""
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
    """Decoding + resizing + label mapping -> a prepared example (see ``mtl_keras.data.pipeline``)."""
    h, w = image_size
    lut = tf.constant(label_lookup_table(num_classes), dtype=tf.uint8)
    known_np = known_label_mask()
    max_known = int(np.nonzero(known_np)[0].max())
    assert known_np[: max_known + 1].all(), "the fast label check assumes contiguous known ids"
    known = tf.constant(known_np)

    def resize_nearest(x):
        return tf.image.resize(x, (h, w), method="nearest")

    def fn(elem):
        out = {}
        out["image"] = resize_image(tf.io.decode_png(_read_png(elem["image"], "image"), channels=3), (h, w))
        if "semantic" in tasks:
            if "label_ids" in present:
                path = elem["label_ids"]
                ids = tf.io.decode_png(_read_png(path, "labelIds", 8), channels=1, dtype=tf.uint8)
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
                sem = tf.gather(lut, tf.cast(resize_nearest(ids)[..., 0], tf.int32))
            else:  # withheld test labels: ignore everywhere
                sem = tf.fill((h, w), tf.constant(IGNORE_LABEL, tf.uint8))
            out["semantic"] = tf.ensure_shape(sem, (h, w))
        if "instance" in tasks:
            if "instance_ids" in present:
                inst = tf.io.decode_png(_read_png(elem["instance_ids"], "instanceIds", 16), channels=1,
                                        dtype=tf.uint16)
                inst = tf.cast(resize_nearest(inst)[..., 0], tf.int32)
                inst = tf.where(inst >= 1000, inst, 0)  # plain labelIds (incl. groups) are no instance
            else:
                inst = tf.zeros((h, w), tf.int32)
            out["instance_ids"] = tf.ensure_shape(inst, (h, w))
        if "depth" in tasks:
            if "disparity" in present and (depth_target == "inverse" or "baseline_fx" in elem):
                raw = tf.io.decode_png(_read_png(elem["disparity"], "disparity", 16), channels=1, dtype=tf.uint16)
                png_width = tf.cast(tf.shape(raw)[1], tf.float32)
                p = tf.cast(resize_nearest(raw), tf.float32)
                d = (p - 1.0) / 256.0  # disparity in px at the PNG's (full) resolution
                if depth_target == "inverse":
                    valid = p > 0
                    value = d * (float(w) / png_width)  # px at the training width
                else:  # metric depth in metres; d == 0 (p == 1) is at infinity -> invalid
                    valid = p > 1
                    value = elem["baseline_fx"] / tf.where(valid, d, 1.0)
                depth = tf.where(valid, value, float("nan"))
            else:
                depth = tf.fill((h, w, 1), float("nan"))
            out["depth"] = tf.ensure_shape(depth, (h, w, 1))
        return out

    return fn


def instance_centroid_vectors(instance_ids):
    """(dy, dx) from each pixel to the centroid of its instance, and the instance mask.

    ``instance_ids``: int HxW CityScapes instanceIds (instances are ids >= 1000). Returns
    (vectors float32 HxWx2, mask float32 HxWx1); vectors are 0 outside instances.
    """
    ids = tf.cast(instance_ids, tf.int32)
    return centroid_vectors(tf.where(ids >= 1000, ids, 0))


def _check_image_size(image_size):  # kept for callers of the former private helper
    return check_image_size(image_size)


def cityscapes_source(data_dir, split="train", image_size=(128, 256), num_classes=19,
                      tasks=("semantic", "instance", "depth"), depth_target="inverse", check_files=True,
                      dataset_name="cityscapes") -> Source:
    """The rows and decode function of a CityScapes-layout split (see ``mtl_keras.data.pipeline.Source``)."""
    tasks = check_tasks(tasks, TASKS, dataset_name)
    if depth_target not in ("inverse", "metric"):
        raise ValueError(f"depth_target must be 'inverse' or 'metric', got {depth_target!r}")
    label_lookup_table(num_classes)  # validates num_classes
    h, w = check_image_size(image_size)

    require = ["image"] + [key for task in TASKS if task in tasks for key in _TASK_FILES[task]]
    if depth_target == "metric" and "depth" in tasks:
        require.append("camera")
    optional = _WITHHELD_ON_TEST if split == "test" else ()
    files = list_cityscapes_files(data_dir, split, require=require, check=check_files, optional=optional)
    present = set(files[0])
    withheld = [k for k in require if k not in present]
    if withheld:
        log.warning("CityScapes %s: no %s folder(s) for the test split (CityScapes withholds test labels): "
                    "those targets are masked out everywhere", data_dir,
                    ", ".join(os.path.join(FILE_TYPES[k][0], split) for k in withheld))

    columns = {k: [f[k] for f in files] for k in require if k in present and k != "camera"}
    if depth_target == "metric" and "depth" in tasks and "camera" in present:
        columns["baseline_fx"] = np.array([_read_baseline_fx(f["camera"]) for f in files], np.float32)
    return Source(columns=columns, decode=_decode_stage(tasks, (h, w), num_classes, depth_target, present),
                  num_examples=len(files), tasks=tasks, image_size=(h, w),
                  depth_scales_with_zoom=depth_target == "inverse")


def load_cityscapes(data_dir, split: str = "train", image_size=(128, 256), batch_size: int = 8,
                    num_classes: int = 19, tasks=("semantic", "instance", "depth"),
                    shuffle=None, seed: int = 0, flip=None, repeat: bool = False,
                    drop_remainder=None, depth_target: str = "inverse", cache=False,
                    num_parallel_calls=tf.data.AUTOTUNE,
                    input_context: tf.distribute.InputContext | None = None,
                    scale_range=(1.0, 1.0), crop_size=None, random_crop=None,
                    check_files: bool = True) -> tf.data.Dataset:
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

    ``image_size``: the resolution every file is resized to. Augmentation (``mtl_keras.data.augment``):
    ``flip`` (default: ``split == "train"``), ``scale_range`` (random scale, default none; inverse depth is
    multiplied by the scale, metric depth is not), ``crop_size`` (output size, default ``image_size``; padded with
    the ignore label where the scaled image is smaller), ``random_crop`` (crop position at random; default:
    ``split == "train"``, else centred).

    ``shuffle`` defaults to ``split == "train"``; ``drop_remainder`` defaults to
    ``split == "train"``. ``cache``: False, True (memory) or a file name prefix. The random
    order and the augmentation are deterministic under ``seed``. With ``input_context`` the file list is
    sharded (``num_input_pipelines``, ``input_pipeline_id``) before shuffling and
    ``batch_size`` is the per-replica batch size. ``check_files``: read every PNG header up front (complete
    file, bit depth, size), so that a broken file is reported, by name, before training starts.
    """
    source = cityscapes_source(data_dir, split, image_size, num_classes, tasks, depth_target, check_files)
    return load_source(source, split, batch_size=batch_size, shuffle=shuffle, seed=seed, flip=flip, repeat=repeat,
                       drop_remainder=drop_remainder, cache=cache, num_parallel_calls=num_parallel_calls,
                       input_context=input_context, scale_range=scale_range, crop_size=crop_size,
                       random_crop=random_crop)
