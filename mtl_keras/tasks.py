"""The tasks the zoo predicts: one table, :data:`TASKS`, that losses, evaluation, pictures, data and export read.

A new task is a new row plus its data reader (and, for a new kind of loss, target or metric, that one function).
The loss family (``type``) sets the form of the uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018):
``exp(-s)`` for classification, ``0.5 * exp(-s)`` for regression, with ``s = log sigma^2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

IGNORE_LABEL = 255

TASK_KINDS = ("classification", "regression")
# How the data pipeline (mtl_keras.data.pipeline) turns a prepared example's field into the target (and its mask):
TARGET_RULES = (
    "labels",  # integer class ids -> int32 (H, W); no mask key: pixels labelled IGNORE_LABEL are left out
    "centroid_vectors",  # instance ids (0 = none) -> (dy, dx) to the instance centroid + mask of instance pixels
    "finite",  # float (H, W, K), NaN = invalid -> 0 where invalid + mask of the pixels finite in every channel
)
# How a target's values change when mtl_keras.data.augment zooms the image by (sy, sx) (random scale):
ZOOM_RULES = (
    "unchanged",  # class ids, unit normals, ...: only resampled
    "offsets",  # (dy, dx) pixel offsets -> (sy dy, sx dx)
    "depth",  # -> sx * value when the data's depth scales with a zoom (AugmentConfig.depth_scales_with_zoom:
    #          disparity, inverse depth in px), else unchanged (metric depth)
)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the zoo (a row of :data:`TASKS`)."""

    name: str  # key of the task everywhere: model outputs, targets, losses, metric prefixes, --tasks
    type: str  # "classification" or "regression": the form of the uncertainty weighting
    channels: int | None  # output channels of the head; None = one per class (num_classes)
    loss: str  # key of mtl_keras.losses.LOSSES
    mask: str | None  # target key of the pixel mask; None = the pixels whose label is not IGNORE_LABEL
    target_rule: str  # one of TARGET_RULES
    example_key: str  # the field of a prepared example (mtl_keras.data.pipeline) the target is made from
    example_dtype: str  # its dtype in a prepared example
    example_channels: int | None  # its channel axis (None: an (H, W) map)
    cache_dtype: str  # its dtype in a prepared cache file (mtl_keras.data.prepared)
    output_name: str  # the serving output name (mtl_keras.export)
    metrics: tuple  # the keys MultiTaskEvaluator.result() reports for the task
    display_name: str  # the title of its tiles in prediction panels
    default: bool  # among the tasks used when none are named (DEFAULT_TASKS)
    # Augmentation (mtl_keras.data.augment) of the target:
    pad_value: float = 0.0  # where a crop is padded (a 'labels' target: IGNORE_LABEL; its mask key pads with 0)
    zoom: str = "unchanged"  # one of ZOOM_RULES
    flip_signs: tuple | None = None  # per-channel factors under a horizontal flip (None: values unchanged)

    def output_channels(self, num_classes):
        """Channels of the task's head for ``num_classes`` semantic classes."""
        return int(num_classes) if self.channels is None else self.channels


TASKS = {task.name: task for task in (
    Task("semantic", "classification", channels=None, loss="cross_entropy", mask=None, target_rule="labels",
         example_key="semantic", example_dtype="uint8", example_channels=None, cache_dtype="uint8",
         output_name="semantic_logits",
         metrics=("semantic_miou", "semantic_pixel_accuracy", "semantic_mean_class_accuracy",
                  "semantic_per_class_iou"),
         display_name="semantic", default=True, pad_value=IGNORE_LABEL, zoom="unchanged", flip_signs=None),
    Task("instance", "regression", channels=2, loss="l1", mask="instance_mask", target_rule="centroid_vectors",
         example_key="instance_ids", example_dtype="int32", example_channels=None, cache_dtype="uint16",
         output_name="instance_vectors", metrics=("instance_mean_error_px", "instance_mean_l1_px"),
         display_name="instance vectors", default=True, pad_value=0.0, zoom="offsets", flip_signs=(1.0, -1.0)),
    Task("depth", "regression", channels=1, loss="l1", mask="depth_mask", target_rule="finite",
         example_key="depth", example_dtype="float32", example_channels=1, cache_dtype="float32",
         output_name="depth", metrics=("depth_mean_error_px", "depth_rel_error"),
         display_name="inverse depth", default=True, pad_value=0.0, zoom="depth", flip_signs=None),
    # optional fourth task where the data has surface normals (NYUv2 .npy release)
    Task("normals", "regression", channels=3, loss="cosine", mask="normals_mask", target_rule="finite",
         example_key="normals", example_dtype="float32", example_channels=3, cache_dtype="float32",
         output_name="normals",
         metrics=("normals_mean_angle_deg", "normals_median_angle_deg", "normals_within_11_25",
                  "normals_within_22_5", "normals_within_30"),
         display_name="surface normals", default=False, pad_value=0.0, zoom="unchanged",
         flip_signs=(-1.0, 1.0, 1.0)),
)}


class _FieldView(Mapping):
    """``{task name: one field of its row}``, read from :data:`TASKS` at each access (a task added later shows)."""

    def __init__(self, field):
        self._field = field

    def __getitem__(self, name):
        return getattr(TASKS[name], self._field)

    def __iter__(self):
        return iter(TASKS)

    def __len__(self):
        return len(TASKS)

    def __repr__(self):
        return repr(dict(self))


# TASK_TYPES follows TASKS; the tuples are fixed at import.
TASK_TYPES = _FieldView("type")  # {"semantic": "classification", "instance": "regression", ...}
TASK_NAMES = tuple(TASKS)
DEFAULT_TASKS = tuple(name for name, task in TASKS.items() if task.default)


def check_table(tasks=None):
    """Raises ValueError when a row of the table (default :data:`TASKS`) is inconsistent."""
    tasks = TASKS if tasks is None else tasks
    for name, task in tasks.items():
        problems = []
        if task.name != name:
            problems.append(f"name {task.name!r} under key {name!r}")
        if task.type not in TASK_KINDS:
            problems.append(f"type {task.type!r} not in {TASK_KINDS}")
        if task.target_rule not in TARGET_RULES:
            problems.append(f"target_rule {task.target_rule!r} not in {TARGET_RULES}")
        if (task.mask is None) != (task.target_rule == "labels"):
            problems.append("only a 'labels' target has no mask key (its mask is the ignore label)")
        if task.channels is not None and task.channels < 1:
            problems.append(f"channels {task.channels!r}")
        if task.zoom not in ZOOM_RULES:
            problems.append(f"zoom {task.zoom!r} not in {ZOOM_RULES}")
        if task.target_rule == "labels" and task.pad_value != IGNORE_LABEL:
            problems.append(f"a 'labels' target pads with IGNORE_LABEL ({IGNORE_LABEL}), not {task.pad_value!r}")
        if task.zoom == "offsets" and task.channels != 2:
            problems.append("'offsets' under zoom are 2 channels (dy, dx)")
        if task.flip_signs is not None and (task.channels is None or len(task.flip_signs) != task.channels):
            problems.append(f"flip_signs {task.flip_signs!r}: one per channel of a fixed-channel task")
        if not task.metrics or any(not m.startswith(f"{name}_") for m in task.metrics):
            problems.append(f"metrics {task.metrics!r} must be named {name}_...")
        if problems:
            raise ValueError(f"task {name!r}: " + "; ".join(problems))
    for field in ("output_name", "example_key"):
        values = [getattr(task, field) for task in tasks.values()]
        if len(set(values)) != len(values):
            raise ValueError(f"two tasks share a {field}: {values}")


check_table()


def validate_tasks(tasks):
    """Returns ``tasks`` as a tuple in canonical order; raises ValueError on an empty or unknown task list."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}. Valid tasks: {', '.join(TASKS)}.")
    if not tasks:
        raise ValueError(f"At least one task is needed. Valid tasks: {', '.join(TASKS)}.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"Duplicate task in {tasks}.")
    return tuple(t for t in TASKS if t in tasks)


def task_channels(task, num_classes):
    """Output channels of ``task``'s head for ``num_classes`` classes."""
    return TASKS[task].output_channels(num_classes)
