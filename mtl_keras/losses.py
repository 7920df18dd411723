"""Per-task losses as means over the labelled pixels of the batch (Kendall, Gal & Cipolla, CVPR 2018), in
``keras.ops``; a batch without labels gives 0, never NaN. Plain functions, not ``keras.losses.Loss``: under
``tf.distribute`` a ``Loss`` would divide by the replicas once more than the weighting's ``add_loss``.
"""

import keras
from keras import ops

from mtl_keras import distribution
from mtl_keras.tasks import IGNORE_LABEL, TASKS


def masked_mean(values, mask):
    """sum(values * mask) / max(sum(mask), 1), broadcast together. Under tf.distribute each of R replicas returns
    ``R * local_sum / global_count``, whose summed gradients (Keras divides by R) are the one-device mean's."""
    mask = ops.cast(mask, values.dtype)
    total = ops.sum(values * mask)
    count = distribution.cross_replica_sum(ops.sum(ops.broadcast_to(mask, ops.shape(values))))
    return distribution.replicas_in_sync() * total / ops.maximum(count, 1.0)


def semantic_cross_entropy(labels, logits, ignore_label=IGNORE_LABEL):
    """Softmax cross entropy over the pixels not labelled ``ignore_label``; labels (B, H, W), logits (B, H, W, C)."""
    logits = ops.cast(logits, keras.config.floatx())
    labels = ops.cast(labels, "int32")
    valid = ops.not_equal(labels, ignore_label)
    num_classes = ops.shape(logits)[-1]
    # Ignored pixels get a placeholder class so the per-pixel loss stays finite; the mask then drops them.
    safe_labels = ops.where(valid, labels, ops.zeros_like(labels))
    safe_labels = ops.clip(safe_labels, 0, num_classes - 1)
    per_pixel = ops.sparse_categorical_crossentropy(safe_labels, logits, from_logits=True)
    return masked_mean(per_pixel, valid)


def _masked_dense_inputs(targets, predictions, mask):
    """Targets and predictions (B, H, W, K) in floatx and the (B, H, W) mask; invalid targets (NaN depth) become 0,
    since a NaN behind a mask still turns the gradient into NaN."""
    predictions = ops.cast(predictions, keras.config.floatx())
    targets = ops.cast(targets, keras.config.floatx())
    mask = ops.cast(mask, keras.config.floatx())
    if len(mask.shape) == len(targets.shape):
        mask = ops.squeeze(mask, axis=-1)
    targets = ops.where(ops.expand_dims(mask, -1) > 0, targets, ops.zeros_like(targets))
    return targets, predictions, mask


def masked_l1(targets, predictions, mask):
    """Per-pixel L1 norm over channels (Kendall et al.) averaged where ``mask`` (B, H, W[, 1]) is 1."""
    targets, predictions, mask = _masked_dense_inputs(targets, predictions, mask)
    return masked_mean(ops.sum(ops.abs(targets - predictions), axis=-1), mask)


def normals_cosine(targets, predictions, mask, eps=1e-6):
    """1 - cosine similarity of surface normals (B, H, W, 3) averaged where ``mask`` is 1; both are normalised here,
    and a zero prediction has loss 1 with a finite gradient."""
    targets, predictions, mask = _masked_dense_inputs(targets, predictions, mask)
    pred_unit = predictions / ops.sqrt(ops.sum(ops.square(predictions), axis=-1, keepdims=True) + eps)
    target_unit = targets / ops.maximum(ops.sqrt(ops.sum(ops.square(targets), axis=-1, keepdims=True)), eps)
    cosine = ops.sum(pred_unit * target_unit, axis=-1)
    return masked_mean(1.0 - cosine, mask)


# The loss functions the task table (mtl_keras.tasks.TASKS, field ``loss``) names. A task whose ``mask`` is None
# (class ids) is called as ``fn(labels, logits, ignore_label)``, any other as ``fn(targets, predictions, mask)``.
LOSSES = {"cross_entropy": semantic_cross_entropy, "l1": masked_l1, "cosine": normals_cosine}
_unknown = {t.name: t.loss for t in TASKS.values() if t.loss not in LOSSES}
if _unknown:
    raise ImportError(f"mtl_keras.tasks names losses that mtl_keras.losses.LOSSES lacks: {_unknown}")


def task_loss(task, targets, predictions, ignore_label=IGNORE_LABEL):
    """The loss of ``task`` from the pipeline's target dict and the model's outputs (no mask: every pixel valid)."""
    spec = TASKS[task]
    loss = LOSSES[spec.loss]
    if spec.mask is None:
        return loss(targets[task], predictions[task], ignore_label)
    mask = targets.get(spec.mask)
    if mask is None:
        mask = ops.ones_like(ops.cast(targets[task][..., :1], keras.config.floatx()))
    return loss(targets[task], predictions[task], mask)
