"""Joint augmentation of an image and every dense target, in TensorFlow ops (runs inside ``tf.data``).

One example is ``(image float32 HxWx3 in 0..255, targets)`` with any of the keys

============== ============== =============== ======================= =================== =============
key            shape          resize          random scale by s       horizontal flip     padding value
============== ============== =============== ======================= =================== =============
image          HxWx3 float    bilinear        resized                 mirrored            0
semantic       HxW int        nearest         resized                 mirrored            255 (ignore)
instance       HxWx2 (dy,dx)  nearest         dy * sy, dx * sx        mirrored, dx -> -dx 0
depth          HxWx1          nearest         see below               mirrored            0
normals        HxWx3 (x,y,z)  nearest         unchanged               mirrored, x -> -x   0
``*_mask``     HxWx1          nearest         resized                 mirrored            0 (invalid)
============== ============== =============== ======================= =================== =============

A task's row of ``mtl_keras.tasks.TASKS`` says how its target is treated: ``pad_value``, ``zoom`` (values under
random scale: ``"unchanged"``, ``"offsets"`` = (dy, dx) times (sy, sx), ``"depth"`` = see below), ``flip_signs``
(per-channel factors under a flip) and, for a ``"labels"`` target, an HxW map without a channel axis. A key that
is neither the image nor a task (the masks) pads with 0 and is only resampled and mirrored.

The steps, all optional: **random scale** (one factor ``s`` drawn uniformly in ``scale_range``; the image becomes
``round(H s) x round(W s)``, so the exact factors are ``sy = round(H s) / H`` and ``sx = round(W s) / W``), then a
**crop** of ``crop_size`` (default: the input size) at a random position (``random_crop``) or in the centre, where
an axis that is shorter than the crop is padded (image 0, semantic 255, every mask 0, so padded pixels count in no
loss), then a **random horizontal flip** with probability 1/2.

Instance vectors point from a pixel to its instance's centroid, computed before augmentation on the whole
instance, so a crop that cuts an instance keeps vectors that point to the centroid of the whole (scaled) instance,
possibly outside the crop; they scale with the image (``(dy, dx) -> (sy dy, sx dx)``) and a flip negates ``dx``.

**Depth under random scale.** Scaling the image by ``s`` at a fixed output size is a zoom: the focal length in
pixels becomes ``s f`` while the scene stays where it is. Stereo disparity ``d = B f / Z`` in pixels therefore
becomes ``sx d`` (``depth_scales_with_zoom=True``: CityScapes' inverse depth in px and the disparity of the
CityScapes ``.npy`` release), and metric depth ``Z`` (or ``1/Z`` in 1/m) does not change
(``depth_scales_with_zoom=False``: CityScapes ``--depth_target metric``, NYUv2). This differs from the
"camera moved closer" approximation of MTAN's ``RandomScaleCrop``, which divides metric depth by ``s``: that is not
what a resize of a perspective image does (the relative depths of near and far objects would change). Surface
normals are unchanged by a zoom.

Every random draw is a stateless function of ``(seed, key)`` (``key`` = the element's position in the stream), so
the augmented stream is the same on every run with the same seed, whatever the parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtl_keras.data.checks import check_image_size
from mtl_keras.tasks import TASKS

__all__ = ["AugmentConfig", "augment_example", "PAD_VALUES"]


class _PadValues(Mapping):
    """``{key: padding value}``: the image's 0 and each task's ``pad_value`` in ``mtl_keras.tasks.TASKS`` (read at
    each access, so a task added to the table shows). Other keys (the masks) pad with 0: padded pixels are invalid
    everywhere."""

    def __getitem__(self, key):
        return 0.0 if key == "image" else TASKS[key].pad_value

    def __iter__(self):
        yield "image"
        yield from TASKS

    def __len__(self):
        return 1 + len(TASKS)

    def __repr__(self):
        return repr(dict(self))


PAD_VALUES = _PadValues()


class AugmentConfig:
    """Validated augmentation settings.

    ``flip``: random horizontal flips (p = 1/2). ``scale_range``: ``(min, max)`` of the random scale factor
    (``(1, 1)``: none). ``crop_size``: ``(height, width)`` of the output, or ``None`` for the input size.
    ``random_crop``: place the crop (and the padding, where the scaled image is smaller) at random, else centred.
    ``depth_scales_with_zoom``: multiply ``depth`` by ``sx`` under random scale (disparity); else leave it.
    """

    def __init__(self, flip=False, scale_range=(1.0, 1.0), crop_size=None, random_crop=True,
                 depth_scales_with_zoom=True):
        self.flip = bool(flip)
        try:
            lo, hi = (float(v) for v in scale_range)
        except (TypeError, ValueError):
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range!r}") from None
        if not (0.0 < lo <= hi) or hi > 16.0:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max <= 16, got {scale_range!r}")
        self.scale_range = (lo, hi)
        if crop_size is not None and len(tuple(crop_size)) == 0:
            crop_size = None
        if crop_size is not None:
            crop_size = check_image_size(crop_size, "crop_size")
        self.crop_size = crop_size
        self.random_crop = bool(random_crop)
        self.depth_scales_with_zoom = bool(depth_scales_with_zoom)

    def output_size(self, image_size):
        return tuple(self.crop_size) if self.crop_size is not None else tuple(image_size)

    def is_identity(self, image_size):
        return (not self.flip and self.scale_range == (1.0, 1.0)
                and self.output_size(image_size) == tuple(image_size))

    def __repr__(self):
        return (f"AugmentConfig(flip={self.flip}, scale_range={self.scale_range}, crop_size={self.crop_size}, "
                f"random_crop={self.random_crop}, depth_scales_with_zoom={self.depth_scales_with_zoom})")


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


def _channels_last(key, x):
    return x[..., None] if _is_label_map(key) else x


def augment_example(image, targets, seed, key, config: AugmentConfig):
    """Augments one example; returns ``(image, targets)`` with the output size of ``config``.

    ``image``: float32 HxWx3 (static H, W); ``targets``: dict with any of the keys of the module docstring.
    ``seed``: int; ``key``: int64 scalar tensor (e.g. the element's position in the stream).
    """
    import tensorflow as tf

    h, w = (int(v) for v in image.shape[:2])
    oh, ow = config.output_size((h, w))
    if config.is_identity((h, w)):
        return image, targets
    u = _random_values(seed, key)
    fields = {"image": image}
    fields.update({k: _channels_last(k, v) for k, v in targets.items()})

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
