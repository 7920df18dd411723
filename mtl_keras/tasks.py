"""The tasks the zoo predicts, their output channels and their loss family.

The loss family decides the form of the uncertainty weighting (seed 002): classification tasks are weighted by
``exp(-s)``, regression tasks by ``0.5 * exp(-s)``, with ``s = log sigma^2``.
"""

TASK_TYPES = {
    "semantic": "classification",
    "instance": "regression",
    "depth": "regression",
    "normals": "regression",  # optional fourth task where the data has surface normals (NYUv2 .npy release)
}
TASK_NAMES = tuple(TASK_TYPES)
IGNORE_LABEL = 255


def validate_tasks(tasks):
    """Returns ``tasks`` as a tuple in canonical order; raises ValueError on an empty or unknown task list."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASK_TYPES]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}. Valid tasks: {', '.join(TASK_NAMES)}.")
    if not tasks:
        raise ValueError(f"At least one task is needed. Valid tasks: {', '.join(TASK_NAMES)}.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"Duplicate task in {tasks}.")
    return tuple(t for t in TASK_NAMES if t in tasks)


def task_channels(task, num_classes):
    """Output channels of a task head: C logits, a 2-vector (dy, dx), 1 inverse-depth value or a 3-vector normal."""
    return {"semantic": num_classes, "instance": 2, "depth": 1, "normals": 3}[task]
