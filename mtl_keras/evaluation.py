"""Streaming metrics of multi-task dense predictions, numpy only (any Keras backend, any array-like input).

Every metric accumulates over the whole split (one confusion matrix; sums and pixel counts for the regressions), so
it does not depend on how the split is batched; the median normal angle is exact to half a histogram bin.
"""

import math

import numpy as np

from mtl_keras.tasks import DEFAULT_TASKS, IGNORE_LABEL, TASKS, validate_tasks

NORMALS_BIN_DEG = 0.01  # width of the angle histogram bins behind the exact streaming median
NORMALS_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
_NORMALS_BINS = int(round(180.0 / NORMALS_BIN_DEG))


# ------------------------------------------------------------------------------------------------ Semantic segmentation

def confusion_matrix(labels, predictions, num_classes, ignore_label=IGNORE_LABEL):
    """Confusion matrix ``M[true, pred]`` (int64 (C, C)) of two label maps, skipping ``ignore_label`` (None: no
    label); any other value outside ``[0, C)`` is an error."""
    num_classes = int(num_classes)
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must have the same shape.")
    labels = labels.reshape(-1).astype(np.int64)
    predictions = predictions.reshape(-1).astype(np.int64)
    if ignore_label is not None:
        keep = labels != int(ignore_label)
        labels = labels[keep]
        predictions = predictions[keep]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"Labels outside [0, {num_classes}) other than the ignore label {ignore_label}: "
                         f"{np.unique(labels[bad]).tolist()}.")
    bad = (predictions < 0) | (predictions >= num_classes)
    if bad.any():
        raise ValueError(f"Predictions outside [0, {num_classes}): {np.unique(predictions[bad]).tolist()}.")
    counts = np.bincount(num_classes * labels + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def segmentation_scores(confusion):
    """``per_class_iou`` (TP / (TP + FP + FN), NaN for a class absent from both sides), ``mean_iou`` (over the
    non-NaN classes, as the CityScapes script averages), ``pixel_accuracy`` and ``mean_class_accuracy`` (over the
    classes in the ground truth) of a confusion matrix ``M[true, pred]``; python floats."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {cm.shape}.")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
        acc = np.where(gt > 0, tp / np.where(gt > 0, gt, 1.0), np.nan)
    total = cm.sum()
    return {
        "mean_iou": _nanmean(iou),
        "per_class_iou": [float(v) for v in iou],
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_class_accuracy": _nanmean(acc),
    }


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# --------------------------------------------------------------------------------------- Streaming multi-task evaluator

def _squeeze_last(x, ndim):  # (B, H, W, 1) -> (B, H, W) for ndim 3
    x = np.asarray(x)
    if x.ndim == ndim + 1 and x.shape[-1] == 1:
        x = x[..., 0]
    return x


def _mask(targets, key, shape):  # targets[key] > 0.5, or all True if the key is absent
    if key not in targets or targets[key] is None:
        return np.ones(shape, dtype=bool)
    mask = _squeeze_last(targets[key], len(shape))
    if mask.shape != shape:
        raise ValueError(f"{key!r} has shape {np.shape(targets[key])}, expected {shape} (+ optional channel 1).")
    return mask > 0.5


def _check_same_shape(task, target, prediction):
    if target.shape != prediction.shape:
        raise ValueError(f"{task}: prediction shape {prediction.shape} does not match target shape {target.shape}. "
                         f"Resize predictions to the target resolution before evaluating.")


class MultiTaskEvaluator:
    """Accumulates the metrics of ``tasks`` (their ``metrics`` in the task table) over a split, batch by batch.

    ``update(targets, predictions)`` takes dicts of (B, H, W, ...) arrays at the targets' resolution, masks under
    each task's ``mask`` key (absent: every finite target); a task without a target is skipped. Depth is the
    paper's "Inverse Depth Mean Error [px]"; a zero normal prediction counts as 90 degrees off. A metric whose mask
    was empty over the whole split is NaN.
    """

    def __init__(self, num_classes, tasks=DEFAULT_TASKS, ignore_label=IGNORE_LABEL):
        self.tasks = validate_tasks(tasks)
        no_metrics = [t for t in self.tasks if not hasattr(self, f"_result_{t}")]
        if no_metrics:
            raise ValueError(f"MultiTaskEvaluator has no metrics for the task(s) {no_metrics} yet.")
        self.num_classes = int(num_classes)
        self.ignore_label = ignore_label
        self.reset()

    def reset(self):
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.num_images = 0
        self._instance_l2_sum = 0.0
        self._instance_l1_sum = 0.0
        self._instance_count = 0
        self._depth_abs_sum = 0.0
        self._depth_count = 0
        self._depth_rel_sum = 0.0
        self._depth_rel_count = 0
        self._normals_angle_sum = 0.0
        self._normals_count = 0
        self._normals_within = np.zeros(len(NORMALS_THRESHOLDS_DEG), dtype=np.int64)
        self._normals_hist = np.zeros(_NORMALS_BINS, dtype=np.int64)

    def update(self, targets, predictions):
        if not isinstance(predictions, dict):
            raise TypeError(f"predictions must be a dict of task outputs, got {type(predictions).__name__}.")
        batch_size = None
        for task in self.tasks:
            if task not in targets or targets[task] is None:
                continue
            if task not in predictions or predictions[task] is None:
                raise ValueError(f"Target for task {task!r} given but the predictions have only "
                                 f"{sorted(predictions)}.")
            n = getattr(self, f"_update_{task}")(targets, predictions[task])
            if batch_size is None:
                batch_size = n
            elif n != batch_size:
                raise ValueError(f"Inconsistent batch sizes across tasks: {batch_size} vs {n} ({task}).")
        if batch_size is None:  # no task of this evaluator in the targets: count from any array given
            arrays = [v for v in list(predictions.values()) + list(targets.values()) if v is not None]
            batch_size = int(np.shape(arrays[0])[0]) if arrays else 0
        self.num_images += batch_size

    def _update_semantic(self, targets, logits):
        labels = _squeeze_last(targets["semantic"], 3)
        if labels.ndim != 3:
            raise ValueError(f"semantic target must be (B,H,W) or (B,H,W,1), got {np.shape(targets['semantic'])}.")
        logits = np.asarray(logits)
        if logits.ndim == 4 and logits.shape[-1] == self.num_classes:
            pred = np.argmax(logits, axis=-1)
        elif logits.ndim == 3 or (logits.ndim == 4 and logits.shape[-1] == 1):  # already a label map
            pred = _squeeze_last(logits, 3)
        else:
            raise ValueError(f"semantic prediction must be (B,H,W,{self.num_classes}) logits or a (B,H,W) label "
                             f"map, got {logits.shape}.")
        _check_same_shape("semantic", labels, pred)
        self.confusion += confusion_matrix(labels, pred, self.num_classes, self.ignore_label)
        return labels.shape[0]

    def _update_instance(self, targets, vectors):
        true = np.asarray(targets["instance"], dtype=np.float64)
        pred = np.asarray(vectors, dtype=np.float64)
        if true.ndim != 4 or true.shape[-1] != 2:
            raise ValueError(f"instance target must be (B,H,W,2), got {true.shape}.")
        _check_same_shape("instance", true, pred)
        mask = _mask(targets, TASKS["instance"].mask, true.shape[:3]) & np.isfinite(true).all(axis=-1)
        err = pred[mask] - true[mask]  # (N, 2)
        self._instance_l2_sum += float(np.sqrt((err ** 2).sum(axis=-1)).sum())
        self._instance_l1_sum += float(np.abs(err).sum())
        self._instance_count += int(mask.sum())
        return true.shape[0]

    def _update_depth(self, targets, depth):
        true = _squeeze_last(np.asarray(targets["depth"], dtype=np.float64), 3)
        pred = _squeeze_last(np.asarray(depth, dtype=np.float64), 3)
        if true.ndim != 3:
            raise ValueError(f"depth target must be (B,H,W) or (B,H,W,1), got {np.shape(targets['depth'])}.")
        _check_same_shape("depth", true, pred)
        mask = _mask(targets, TASKS["depth"].mask, true.shape) & np.isfinite(true)
        t = true[mask]
        abs_err = np.abs(pred[mask] - t)
        self._depth_abs_sum += float(abs_err.sum())
        self._depth_count += int(t.size)
        pos = t > 0
        self._depth_rel_sum += float((abs_err[pos] / t[pos]).sum())
        self._depth_rel_count += int(pos.sum())
        return true.shape[0]

    def _update_normals(self, targets, normals):
        true = np.asarray(targets["normals"], dtype=np.float64)
        pred = np.asarray(normals, dtype=np.float64)
        if true.ndim != 4 or true.shape[-1] != 3:
            raise ValueError(f"normals target must be (B,H,W,3), got {true.shape}.")
        _check_same_shape("normals", true, pred)
        true_norm = np.sqrt((true ** 2).sum(axis=-1))
        mask = _mask(targets, TASKS["normals"].mask, true.shape[:3])
        mask &= np.isfinite(true_norm) & (true_norm > 1e-6)
        t = true[mask] / true_norm[mask][:, None]
        p = pred[mask]
        p_norm = np.sqrt((p ** 2).sum(axis=-1))
        p = np.where(np.isfinite(p_norm)[:, None], p, 0.0) / np.maximum(np.nan_to_num(p_norm), 1e-12)[:, None]
        angle = np.degrees(np.arccos(np.clip((p * t).sum(axis=-1), -1.0, 1.0)))
        self._normals_angle_sum += float(angle.sum())
        self._normals_count += int(angle.size)
        for i, threshold in enumerate(NORMALS_THRESHOLDS_DEG):
            self._normals_within[i] += int((angle < threshold).sum())
        bins = np.minimum((angle / NORMALS_BIN_DEG).astype(np.int64), _NORMALS_BINS - 1)
        self._normals_hist += np.bincount(bins, minlength=_NORMALS_BINS)
        return true.shape[0]

    def _normals_median(self):
        """Median angle from the histogram: the centre of the middle value's bin (mean of two for an even count)."""
        n = self._normals_count
        if not n:
            return math.nan
        cumulative = np.cumsum(self._normals_hist)
        lo, hi = (n - 1) // 2, n // 2  # 0-based ranks of the middle value(s)
        bin_lo, bin_hi = np.searchsorted(cumulative, [lo + 1, hi + 1])
        return float((bin_lo + bin_hi + 1) * 0.5 * NORMALS_BIN_DEG)

    def result(self):
        """Flat dict of python floats (a list for per-class IoU) in the task table's order, plus ``num_images``."""
        out = {}
        for task in self.tasks:
            values, metrics = getattr(self, f"_result_{task}")(), TASKS[task].metrics
            if set(values) != set(metrics):
                raise RuntimeError(f"MultiTaskEvaluator computes {sorted(values)} for {task!r}, the task table lists "
                                   f"{sorted(metrics)}")
            out.update((key, values[key]) for key in metrics)
        out["num_images"] = float(self.num_images)
        return out

    def _result_semantic(self):
        scores = segmentation_scores(self.confusion)
        return {"semantic_miou": scores["mean_iou"], "semantic_pixel_accuracy": scores["pixel_accuracy"],
                "semantic_mean_class_accuracy": scores["mean_class_accuracy"],
                "semantic_per_class_iou": scores["per_class_iou"]}

    def _result_instance(self):
        n = self._instance_count
        return {"instance_mean_error_px": self._instance_l2_sum / n if n else math.nan,
                "instance_mean_l1_px": self._instance_l1_sum / n if n else math.nan}

    def _result_depth(self):
        n, n_rel = self._depth_count, self._depth_rel_count
        return {"depth_mean_error_px": self._depth_abs_sum / n if n else math.nan,
                "depth_rel_error": self._depth_rel_sum / n_rel if n_rel else math.nan}

    def _result_normals(self):
        n = self._normals_count
        out = {"normals_mean_angle_deg": self._normals_angle_sum / n if n else math.nan,
               "normals_median_angle_deg": self._normals_median()}
        for threshold, count in zip(NORMALS_THRESHOLDS_DEG, self._normals_within):  # 11.25 -> normals_within_11_25
            out["normals_within_" + f"{threshold:g}".replace(".", "_")] = float(count) / n if n else math.nan
        return out


# ----------------------------------------------------------------------------------------------- Whole-model evaluation

def _to_numpy_dict(d):
    return {k: (None if v is None else np.asarray(v)) for k, v in d.items()}


def evaluate_model(model, dataset, num_classes, tasks=None, max_batches=None, ignore_label=IGNORE_LABEL):
    """:meth:`MultiTaskEvaluator.result` of ``model`` over ``dataset`` (``(images, targets, ...)`` tuples or dicts
    with ``"images"`` / ``"image"`` beside the targets); ``tasks`` default to the model's outputs."""
    evaluator = MultiTaskEvaluator(num_classes, tasks, ignore_label) if tasks is not None else None
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, dict):  # {"image(s)": ..., task targets...}
            key = "images" if "images" in batch else "image"
            images, targets = batch[key], {k: v for k, v in batch.items() if k != key}
        else:
            images, targets = batch[0], batch[1]
        images = np.asarray(images, dtype=np.float32)
        predictions = (model.predict_on_batch(images) if hasattr(model, "predict_on_batch")
                       else model(images, training=False))
        if not isinstance(predictions, dict):
            names = evaluator.tasks if evaluator is not None else None
            if names is None or len(names) != 1:
                raise ValueError("The model returned a single output; pass exactly one task in `tasks` or make the "
                                 "model return a dict {task: output}.")
            predictions = {names[0]: predictions}
        if evaluator is None:
            evaluator = MultiTaskEvaluator(num_classes, [t for t in TASKS if t in predictions],
                                           ignore_label)
        evaluator.update(_to_numpy_dict(targets), _to_numpy_dict(predictions))
    if evaluator is None:
        raise ValueError("Cannot infer the tasks from an empty dataset; pass `tasks`.")
    return evaluator.result()
