"""The tf.data pipeline shared by every dataset format.

A format supplies a :class:`Source`: per-example columns and a ``decode`` (TF ops) from a row to a *prepared
example* at the training size, in compact dtypes: ``"image"`` uint8 HxWx3 RGB, ``"semantic"`` uint8 HxW (255 =
ignore), ``"instance_ids"`` int32 HxW (0 = none), ``"depth"`` float32 HxWx1 and ``"normals"`` float32 HxWx3 (NaN =
invalid). A prepared cache (``mtl_keras.data.prepared``) stores these and enters after the decode step.
:func:`load_source` then runs: shard, shuffle rows, decode, cache, shuffle, repeat, targets + augmentation, batch.

The batches are the contract of every loader: ``(image float32 (B,H,W,3) RGB 0..255, targets)`` with, for the
requested tasks, ``"semantic"`` int32 (B,H,W), ``"instance"`` (dy, dx) to the instance centroid in px, ``"depth"``,
``"normals"``, each regression target 0 where invalid with its ``"*_mask"`` (B,H,W,1) (``mtl_keras.tasks``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from mtl_keras.data.augment import AugmentConfig, augment_example
from mtl_keras.tasks import TARGET_RULES, TASKS


@dataclasses.dataclass
class Source:
    """What a format hands to :func:`load_source`: ``columns`` (equal-length lists, one row per example),
    ``decode(row) -> prepared example``; ``depth_scales_with_zoom``: ``depth`` is a disparity (scales under zoom)."""

    columns: dict
    decode: Callable
    num_examples: int
    tasks: tuple
    image_size: tuple
    depth_scales_with_zoom: bool = True


def centroid_vectors(segment_ids):
    """``segment_ids`` int HxW (0 = none) -> (float32 HxWx2 (dy, dx) from each pixel to its segment's centroid, 0
    outside segments; float32 HxWx1 mask). Centroids are means of pixel indices in float64."""
    import tensorflow as tf

    ids = tf.cast(segment_ids, tf.int64)
    shape = tf.shape(ids)
    h, w = shape[0], shape[1]
    is_inst = tf.not_equal(ids, 0)
    flat = tf.reshape(tf.where(is_inst, ids, tf.constant(0, tf.int64)), [-1])
    _, seg = tf.unique(flat)
    n = tf.reduce_max(seg) + 1
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float64), tf.range(w, dtype=tf.float64), indexing="ij")
    yy, xx = tf.reshape(yy, [-1]), tf.reshape(xx, [-1])
    count = tf.math.unsorted_segment_sum(tf.ones_like(yy), seg, n)
    cy = tf.math.unsorted_segment_sum(yy, seg, n) / count
    cx = tf.math.unsorted_segment_sum(xx, seg, n) / count
    vec = tf.stack([tf.gather(cy, seg) - yy, tf.gather(cx, seg) - xx], axis=-1)
    mask = tf.reshape(is_inst, [-1, 1])
    vec = tf.where(mask, vec, tf.zeros_like(vec))
    vec = tf.reshape(tf.cast(vec, tf.float32), tf.stack([h, w, 2]))
    return vec, tf.reshape(tf.cast(mask, tf.float32), tf.stack([h, w, 1]))


def _label_target(value, task, h, w):
    import tensorflow as tf

    return {task.name: tf.ensure_shape(tf.cast(value, tf.int32), (h, w))}


def _centroid_vector_target(value, task, h, w):
    import tensorflow as tf

    vec, mask = centroid_vectors(value)
    return {task.name: tf.ensure_shape(vec, (h, w, task.channels)), task.mask: tf.ensure_shape(mask, (h, w, 1))}


def _finite_target(value, task, h, w):
    import tensorflow as tf

    value = tf.cast(value, tf.float32)
    valid = tf.reduce_all(tf.math.is_finite(value), axis=-1, keepdims=True)
    return {task.name: tf.ensure_shape(tf.where(valid, value, 0.0), (h, w, task.channels)),
            task.mask: tf.ensure_shape(tf.cast(valid, tf.float32), (h, w, 1))}


# mtl_keras.tasks.TARGET_RULES -> fn(prepared field, task, h, w) -> {target key: tensor}
TARGET_BUILDERS = {"labels": _label_target, "centroid_vectors": _centroid_vector_target, "finite": _finite_target}
if set(TARGET_BUILDERS) != set(TARGET_RULES):
    raise ImportError(f"mtl_keras.data.pipeline builds the targets {sorted(TARGET_BUILDERS)}, the task table names "
                      f"{sorted(TARGET_RULES)}")


def prepared_to_targets(example, tasks):
    """A prepared example -> ``(image float32 HxWx3, targets)`` of the loader contract (before augmentation)."""
    import tensorflow as tf

    image = tf.cast(example["image"], tf.float32)
    h, w = (int(v) for v in image.shape[:2])
    targets = {}
    for task in TASKS.values():
        if task.name in tasks:
            targets.update(TARGET_BUILDERS[task.target_rule](example[task.example_key], task, h, w))
    return tf.ensure_shape(image, (h, w, 3)), targets


def shuffled_epochs(ds, num_elements, seed, repeat):
    """``ds`` (``num_elements`` long, one shape) in a new order each epoch, epoch ``e``'s a stateless function of
    ``(seed, e)``; forever when ``repeat``. Not ``shuffle(reshuffle_each_iteration=True)``: its iterators share one
    generator, and Keras' ``fit`` makes one more in a fresh run (to build the model) than in a resumed one."""
    import tensorflow as tf

    whole = ds.batch(int(num_elements))
    seed = tf.constant(int(seed), tf.int64)

    def permuted(epoch):
        def permute(batch):
            size = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]
            order = tf.random.experimental.stateless_shuffle(tf.range(size), seed=tf.stack([seed, epoch]))
            return tf.nest.map_structure(lambda column: tf.gather(column, order), batch)

        return whole.map(permute).unbatch()

    epochs = tf.data.Dataset.range(2 ** 62 if repeat else 1)
    return epochs.flat_map(permuted)


def load_source(source: Source, split, batch_size=8, shuffle=None, seed=0, flip=None, repeat=False,
                drop_remainder=None, cache=False, num_parallel_calls=None, input_context=None,
                scale_range=(1.0, 1.0), crop_size=None, random_crop=None):
    """The ``(image, targets)`` batches of ``source``. Shuffling, flips, random crop positions and dropping the last
    partial batch default to on for the ``train`` split only. ``cache``: False, True (memory) or a file prefix.
    ``input_context``: shard the rows first; ``batch_size`` is then per replica. ``num_parallel_calls``: None =
    ``tf.data.AUTOTUNE``."""
    import tensorflow as tf

    is_train = split == "train"
    augment = AugmentConfig(flip=is_train if flip is None else bool(flip),
                            scale_range=(1.0, 1.0) if scale_range is None else scale_range, crop_size=crop_size,
                            random_crop=is_train if random_crop is None else bool(random_crop),
                            depth_scales_with_zoom=source.depth_scales_with_zoom)
    shuffle = is_train if shuffle is None else bool(shuffle)
    drop_remainder = is_train if drop_remainder is None else bool(drop_remainder)
    num_parallel_calls = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    shard_id, num_shards = (0, 1) if input_context is None else (int(input_context.input_pipeline_id),
                                                                 int(input_context.num_input_pipelines))
    n = max(1, -(-int(source.num_examples) // num_shards))
    shuffle_seed = int(seed) * 1009 + shard_id
    ds = tf.data.Dataset.from_tensor_slices(source.columns)
    if num_shards > 1:
        ds = ds.shard(num_shards, shard_id)
    repeated = shuffle and not cache
    if repeated:  # shuffle the (cheap) rows before decoding
        ds = shuffled_epochs(ds, n, shuffle_seed, repeat)
    ds = ds.map(source.decode, num_parallel_calls=num_parallel_calls)
    if cache:
        ds = ds.cache(os.fspath(cache) if isinstance(cache, (str, os.PathLike)) else "")
        if shuffle:
            ds, repeated = shuffled_epochs(ds, n, shuffle_seed, repeat), True
    if repeat and not repeated:
        ds = ds.repeat()
    ds = ds.enumerate()

    def to_batch_element(index, example):
        image, targets = prepared_to_targets(example, source.tasks)
        key = index * num_shards + shard_id  # position in the global stream: distinct over shards
        return augment_example(image, targets, int(seed), key, augment)

    ds = ds.map(to_batch_element, num_parallel_calls=num_parallel_calls)
    ds = ds.batch(int(batch_size), drop_remainder=bool(drop_remainder))
    return ds.prefetch(tf.data.AUTOTUNE)


def resize_image(image, image_size):
    """Any HxWx3 image (0..255) -> uint8 ``image_size`` x 3: antialiased bilinear, rounded."""
    import tensorflow as tf

    h, w = image_size
    image = tf.image.resize(image, (h, w), method="bilinear", antialias=True)
    return tf.ensure_shape(tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8), (h, w, 3))


def metric_depth(depth, inverse=False):
    """Depth in metres -> metres or (``inverse``) 1/m, NaN where not finite or <= 0."""
    import tensorflow as tf

    valid = tf.math.is_finite(depth) & (depth > 0.0)
    if inverse:
        depth = 1.0 / tf.where(valid, depth, 1.0)
    return tf.where(valid, depth, float("nan"))


def resize_nearest(x, image_size):
    """An HxWxC map at ``image_size`` (nearest neighbour: labels, ids, depth)."""
    import tensorflow as tf

    return tf.image.resize(x, tuple(image_size), method="nearest")
