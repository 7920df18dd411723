"""Joint augmentation of an image and its dense targets in TF ops (inside ``tf.data``).

A random scale ``s`` in ``scale_range`` (the image becomes ``round(H s) x round(W s)``, exact factors ``sy``, ``sx``),
a crop of ``crop_size`` at a random position or centred (an axis shorter than the crop is padded: image 0, each task
its ``pad_value``, masks 0, so padded pixels count in no loss), then a horizontal flip with probability 1/2. The image
is resized bilinearly, targets by nearest neighbour, and each task's row of ``mtl_keras.tasks.TASKS`` says how its
values change (``zoom``, ``flip_signs``): instance vectors, computed before on the whole instance, become
``(sy dy, sx dx)`` and a flip negates ``dx``.

Depth under random scale: a zoom multiplies the focal length in pixels, not the scene's distance, so a disparity
``B f / Z`` becomes ``sx d`` (``depth_scales_with_zoom``) while metric depth stays. MTAN's ``RandomScaleCrop``
divides metric depth by ``s`` ("camera moved closer"), which a resize does not do. Every draw is a stateless function
of ``(seed, key)``, ``key`` being the element's position in the stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mtl_keras.data.checks import check_image_size
from mtl_keras.tasks import TASKS

__all__ = ["AugmentConfig", "augment_example", "PAD_VALUES"]


class _PadValues(Mapping):
    """``{key: padding value}``: the image's 0 and each task's ``pad_value``, read from ``TASKS`` at each access.
    Other keys (the masks) pad with 0."""

    def __getitem__(self, key):
        return 0.0 if key == "image" else TASKS[key].pad_value

    def __iter__(self):
        yield "image"
        yield from TASKS

    def __len__(self):
        return 1 + len(TASKS)


PAD_VALUES = _PadValues()


@dataclasses.dataclass
class AugmentConfig:
    """Validated augmentation settings. ``scale_range``: ``(min, max)`` of the random scale (``(1, 1)``: none);
    ``crop_size``: ``(height, width)`` of the output, None = the input size; ``random_crop``: place the crop (and
    padding) at random, else centred; ``depth_scales_with_zoom``: ``depth`` is a disparity, multiplied by ``sx``."""

    flip: bool = False
    scale_range: tuple = (1.0, 1.0)
    crop_size: tuple | None = None
    random_crop: bool = True
    depth_scales_with_zoom: bool = True

    def __post_init__(self):
        self.flip = bool(self.flip)
        try:
            lo, hi = (float(v) for v in self.scale_range)
        except (TypeError, ValueError):
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {self.scale_range!r}") from None
        if not (0.0 < lo <= hi) or hi > 16.0:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max <= 16, got {self.scale_range!r}")
        self.scale_range = (lo, hi)
        if self.crop_size is not None and len(tuple(self.crop_size)) > 0:
            self.crop_size = check_image_size(self.crop_size, "crop_size")
        else:
            self.crop_size = None
        self.random_crop = bool(self.random_crop)
        self.depth_scales_with_zoom = bool(self.depth_scales_with_zoom)

    def output_size(self, image_size):
        return tuple(self.crop_size) if self.crop_size is not None else tuple(image_size)

    def is_identity(self, image_size):
        return (not self.flip and self.scale_range == (1.0, 1.0)
                and self.output_size(image_size) == tuple(image_size))


def _random_values(seed, key):
    """Four uniforms in [0, 1): flip, scale, crop y, crop x; a stateless function of (seed, key)."""
    import tensorflow as tf

    rng_seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(key, tf.int64)])
    return tf.random.stateless_uniform([4], seed=rng_seed, dtype=tf.float32)


def _window(size, out, u):
    """(crop start, pad before, pad after) along one axis: a window of ``out`` over ``size`` (pad if smaller)."""
    import tensorflow as tf

    diff = size - out
    start = tf.cast(tf.floor(u * tf.cast(tf.maximum(diff, 0) + 1, tf.float32)), tf.int32)
    start = tf.minimum(start, tf.maximum(diff, 0))
    before = tf.cast(tf.floor(u * tf.cast(tf.maximum(-diff, 0) + 1, tf.float32)), tf.int32)
    before = tf.minimum(before, tf.maximum(-diff, 0))
    after = tf.maximum(-diff, 0) - before
    return start, before, after


def _is_label_map(key):
    """A ``"labels"`` target: an HxW map, given a channel axis while it is augmented."""
    return key in TASKS and TASKS[key].target_rule == "labels"


def augment_example(image, targets, seed, key, config: AugmentConfig):
    """``(image float32 HxWx3 with static H, W, targets)`` augmented to the output size of ``config``; ``key``: an
    int64 scalar tensor (the element's position in the stream)."""
    import tensorflow as tf

    h, w = (int(v) for v in image.shape[:2])
    oh, ow = config.output_size((h, w))
    if config.is_identity((h, w)):
        return image, targets
    u = _random_values(seed, key)
    fields = {"image": image, **{k: v[..., None] if _is_label_map(k) else v for k, v in targets.items()}}

    if config.scale_range != (1.0, 1.0) or (oh, ow) != (h, w):
        lo, hi = config.scale_range
        s = lo + (hi - lo) * u[1]
        sh = tf.maximum(tf.cast(tf.round(h * s), tf.int32), 1)
        sw = tf.maximum(tf.cast(tf.round(w * s), tf.int32), 1)
        sy = tf.cast(sh, tf.float32) / float(h)
        sx = tf.cast(sw, tf.float32) / float(w)
        if config.scale_range != (1.0, 1.0):
            scaled = {}
            for k, v in fields.items():
                if k == "image":
                    v = tf.image.resize(v, tf.stack([sh, sw]), method="bilinear", antialias=True)
                else:
                    v = tf.image.resize(v, tf.stack([sh, sw]), method="nearest")
                zoom = TASKS[k].zoom if k in TASKS else "unchanged"
                if zoom == "offsets":
                    v = v * tf.stack([sy, sx])
                elif zoom == "depth" and config.depth_scales_with_zoom:
                    v = v * sx
                scaled[k] = v
            fields = scaled
        uy, ux = (u[2], u[3]) if config.random_crop else (0.5, 0.5)
        y0, pad_top, pad_bottom = _window(sh, oh, uy)
        x0, pad_left, pad_right = _window(sw, ow, ux)
        out = {}
        for k, v in fields.items():
            pad = PAD_VALUES.get(k, 0)
            v = tf.pad(v, [[pad_top, pad_bottom], [pad_left, pad_right], [0, 0]],
                       constant_values=tf.cast(pad, v.dtype))
            v = v[y0:y0 + oh, x0:x0 + ow]
            out[k] = tf.ensure_shape(v, (oh, ow, v.shape[-1]))
        fields = out

    if config.flip:
        do_flip = u[0] < 0.5

        def flipped(k, v):
            v = tf.reverse(v, [1])
            signs = TASKS[k].flip_signs if k in TASKS else None
            if signs is not None:
                v = v * tf.constant(signs, v.dtype)
            return v

        fields = {k: tf.cond(do_flip, lambda k=k, v=v: flipped(k, v), lambda v=v: v) for k, v in fields.items()}

    image = fields.pop("image")
    out = {k: (v[..., 0] if _is_label_map(k) else v) for k, v in fields.items()}
    return image, out
