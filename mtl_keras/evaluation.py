"""Evaluation of multi-task dense predictions, numpy only (any Keras backend, any array-like input).

Targets and predictions are dicts of (B, H, W, ...) arrays keyed by task (``mtl_keras.tasks``), masks under the
task's ``mask`` key (1 = valid). Semantic predictions are logits (B, H, W, C) or label maps; normals are normalised
here (a zero prediction counts as 90 degrees off). Predictions must have the targets' resolution: resize them before
:meth:`MultiTaskEvaluator.update`.

Every metric streams over the whole split (one confusion matrix; sums and pixel counts for the regressions), so the
result does not depend on how the split is cut into batches. The median normal angle streams through a histogram of
``NORMALS_BIN_DEG`` bins: exact to half a bin over the whole split.
"""

import math

import numpy as np

# TASKS and DEFAULT_TASKS re-exported: the task table is the one list of tasks (each has _update_/_result_ here).
from mtl_keras.tasks import DEFAULT_TASKS, IGNORE_LABEL, TASKS  # noqa: F401
NORMALS_BIN_DEG = 0.01  # width of the angle histogram bins behind the exact streaming median
NORMALS_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
_NORMALS_BINS = int(round(180.0 / NORMALS_BIN_DEG))


def _threshold_key(t):
    """``11.25`` -> ``"normals_within_11_25"`` (fraction of valid pixels with an angle error below 11.25 deg)."""
    return "normals_within_" + f"{t:g}".replace(".", "_")


# ------------------------------------------------------------------------------------------------ Semantic segmentation

def confusion_matrix(labels, predictions, num_classes, ignore_label=IGNORE_LABEL):
    """Confusion matrix ``M[true, pred]`` (int64, shape (C, C)) of integer label maps of equal shape.

    Pixels whose label equals ``ignore_label`` are skipped (``ignore_label=None`` skips nothing). Any other label,
    or any prediction, outside ``[0, num_classes)`` raises ValueError naming the offending values.
    Computed with one ``np.bincount`` over ``num_classes * label + prediction``.
    """
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
    """Scores of a confusion matrix ``M[true, pred]``.

    Returns a dict of python floats:

    * ``per_class_iou``: list, ``IoU_c = TP / (TP + FP + FN)``; a class with zero union (absent from both the
      ground truth and the prediction) is ``nan``. A class that is predicted but never present gets IoU 0.
    * ``mean_iou``: mean of the non-NaN per-class IoUs, i.e. over the classes present in the ground truth OR in the
      prediction. This is what the CityScapes script does (it averages over classes with a non-NaN score).
      ``nan`` if no class has a non-zero union.
    * ``pixel_accuracy``: ``trace / total`` (``nan`` for an empty matrix).
    * ``mean_class_accuracy``: mean over classes present in the ground truth of ``TP / (TP + FN)``.
    """
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

def _squeeze_last(x, ndim):
    """Drops a trailing singleton channel so that ``x`` has ``ndim`` dimensions, e.g. (B,H,W,1) -> (B,H,W)."""
    x = np.asarray(x)
    if x.ndim == ndim + 1 and x.shape[-1] == 1:
        x = x[..., 0]
    return x


def _mask(targets, key, shape):
    """Boolean mask of shape ``shape`` from ``targets[key]`` (> 0.5), or all True if the key is absent."""
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
    """Accumulates multi-task metrics over a whole split, batch by batch.

    ``update(targets, predictions)`` adds a batch: a task missing from ``targets`` is skipped, one with a target but
    no prediction raises. ``result()`` is a flat dict of floats with each task's ``metrics`` of the task table:

    * semantic: mIoU, pixel accuracy, mean class accuracy, per-class IoU (see :func:`segmentation_scores`);
    * instance: mean over instance pixels of ``||v_pred - v_true||_2`` and of the L1 norm (the loss's form), px;
    * depth: mean ``|d_pred - d_true|`` of inverse depth over valid pixels (the paper's "Inverse Depth Mean Error
      [px]") and the mean relative error over pixels with ``d_true > 0``;
    * normals: mean / median angle in degrees, and the fraction of pixels within 11.25 / 22.5 / 30 degrees;

    plus ``num_images``. A metric whose mask was empty over the whole split is NaN; a missing mask means every pixel
    whose target is finite. ``tasks`` default to ``DEFAULT_TASKS``.
    """

    def __init__(self, num_classes, tasks=DEFAULT_TASKS, ignore_label=IGNORE_LABEL):
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}. Valid tasks: {', '.join(TASKS)}.")
        self.tasks = tuple(t for t in TASKS if t in tasks)
        if not self.tasks:
            raise ValueError("At least one task is needed.")
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

    # -- update --------------------------------------------------------------------------------------------------

    def update(self, targets, predictions):
        """Adds one batch. ``targets`` / ``predictions``: dicts of (B,H,W,...) arrays (numpy or tensors)."""
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

    # -- result --------------------------------------------------------------------------------------------------

    def result(self):
        """Flat dict of python floats (lists for per-class values); NaN where a metric had no pixel.

        The keys of each task are its ``metrics`` in the task table (``mtl_keras.tasks``), in that order."""
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
        for threshold, count in zip(NORMALS_THRESHOLDS_DEG, self._normals_within):
            out[_threshold_key(threshold)] = float(count) / n if n else math.nan
        return out


# ----------------------------------------------------------------------------------------------- Whole-model evaluation

def _to_numpy_dict(d):
    return {k: (None if v is None else np.asarray(v)) for k, v in d.items()}


def _predict(model, images):
    if hasattr(model, "predict_on_batch"):
        return model.predict_on_batch(images)
    return model(images, training=False)


def evaluate_model(model, dataset, num_classes, tasks=None, max_batches=None, ignore_label=IGNORE_LABEL):
    """Evaluates ``model`` over ``dataset`` and returns :meth:`MultiTaskEvaluator.result`.

    ``model``: a Keras model (or any object with ``predict_on_batch(images)`` or ``__call__(images, training=False)``)
    returning a dict ``{task: output}``; a model returning a single array is accepted when exactly one task is
    evaluated. ``dataset``: a ``tf.data.Dataset`` or any iterable of ``(images, targets)`` pairs (numpy arrays or
    tensors; extra tuple elements such as sample weights are ignored), or of dicts holding the images under
    ``"images"`` / ``"image"`` next to the targets. ``tasks``: the tasks to evaluate; ``None``
    means the model's output keys of the first batch. ``max_batches``: stop after that many batches.
    """
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
        predictions = _predict(model, images)
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


# -------------------------------------------------------------------------------------- Multi-task relative performance

def delta_m(multi_task, single_task, higher_is_better):
    """Average relative change of a multi-task model over single-task baselines, in percent.

    ``Delta_m = (1/T) * sum_i (-1)^{l_i} * (M_m,i - M_b,i) / M_b,i * 100``, with ``l_i = 1`` if higher is better
    for metric ``i`` and ``0`` otherwise; ``M_m`` are the multi-task metrics, ``M_b`` the single-task baselines and
    the sum runs over the ``T`` metrics named in ``higher_is_better`` (``{metric: bool}``).

    Sign: a NEGATIVE Delta_m means the multi-task model is better (the convention of the MTAN / LibMTL papers).
    E.g. mIoU 0.55 vs 0.50 (higher better) gives -10 %, depth error 1.1 vs 1.0 (lower better) gives +10 %,
    together Delta_m = 0.

    Raises KeyError for a metric missing in either dict and ValueError for a zero or non-finite baseline or a
    non-finite multi-task value.
    """
    if not higher_is_better:
        raise ValueError("higher_is_better must name at least one metric.")
    missing = [k for k in higher_is_better if k not in multi_task or k not in single_task]
    if missing:
        raise KeyError(f"Metrics missing from multi_task or single_task: {missing}.")
    total = 0.0
    for name, higher in higher_is_better.items():
        m, b = float(multi_task[name]), float(single_task[name])
        if not math.isfinite(b) or b == 0.0:
            raise ValueError(f"Baseline of {name!r} must be finite and non-zero, got {b}.")
        if not math.isfinite(m):
            raise ValueError(f"Multi-task value of {name!r} must be finite, got {m}.")
        sign = -1.0 if higher else 1.0
        total += sign * (m - b) / b
    return total / len(higher_is_better) * 100.0
