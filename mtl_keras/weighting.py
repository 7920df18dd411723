"""Ways to combine the per-task losses into one training loss, behind one interface.

Every weighting is a layer whose ``call`` takes ``{task: scalar loss}``, returns the weighted total and adds it with
``add_loss`` (once: the trainer divides ``add_loss`` terms by the number of replicas under ``tf.distribute``, so no
other scaling may happen; see ``shared/reference/keras3-notes.md``). ``log_values()`` gives the scalars that the
trainer logs each step under the same names for every weighting: ``{task}_weight`` (the factor in front of the
task's loss) and, where the method has one, ``{task}_sigma2``.
"""

import keras
from keras import ops

from mtl_keras.tasks import TASK_TYPES, validate_tasks


class LossWeighting(keras.layers.Layer):
    """Base class: a fixed set of ``tasks`` and the total ``sum_i w_i L_i + r`` of the method."""

    def __init__(self, tasks, **kwargs):
        # Loss weights stay float32 under mixed precision: they are tiny scalars that must not lose precision.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.tasks = validate_tasks(tasks)

    def weighted_total(self, task_losses):
        raise NotImplementedError

    def task_weights(self):
        """{task: effective weight} as tensors."""
        raise NotImplementedError

    def log_values(self):
        return {f"{t}_weight": w for t, w in self.task_weights().items()}

    def call(self, task_losses):
        missing = [t for t in self.tasks if t not in task_losses]
        if missing:
            raise ValueError(f"{type(self).__name__} expects losses for tasks {self.tasks}; missing {missing}.")
        total = self.weighted_total({t: ops.cast(task_losses[t], "float32") for t in self.tasks})
        self.add_loss(total)
        return total

    def compute_output_shape(self, input_shape):
        return ()

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return {**config, "tasks": list(self.tasks)}


@keras.saving.register_keras_serializable(package="mtl_keras")
class UncertaintyWeightingLayer(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, seed 002).

    One learnable ``s_i = log sigma_i^2`` per task. The total is

        sum over classification tasks of  exp(-s) * L + s / 2      (softmax with temperature sigma^2)
      + sum over regression tasks of      0.5 * exp(-s) * L + s / 2  (Gaussian likelihood)

    i.e. ``1/sigma^2`` and ``1/(2 sigma^2)`` in front of the losses and ``log sigma`` as the regulariser. We learn
    ``log sigma^2`` (not ``log sigma``) as the paper does. The total can be negative once a loss is small: that is
    expected (it is a negative log likelihood up to constants), not a bug.

    Args:
        tasks: task names.
        task_types: optional ``{task: "classification" | "regression"}``; defaults from ``mtl_keras.tasks``.
        initial_log_variance: a float for every task, or ``{task: float}``. Seed 001 (Fig. 6) shows that any value
            in [-2, 5] converges to the same solution.
    """

    def __init__(self, tasks, task_types=None, initial_log_variance=0.0, **kwargs):
        super().__init__(tasks, **kwargs)
        task_types = dict(task_types or {})
        self.task_types = {t: task_types.get(t, TASK_TYPES[t]) for t in self.tasks}
        bad = {t: k for t, k in self.task_types.items() if k not in ("classification", "regression")}
        if bad:
            raise ValueError(f"task_types must be 'classification' or 'regression', got {bad}.")
        if isinstance(initial_log_variance, dict):
            unknown = set(initial_log_variance) - set(self.tasks)
            if unknown:
                raise ValueError(f"initial_log_variance names unknown tasks {sorted(unknown)}; tasks: {self.tasks}.")
            self.initial_log_variance = {t: float(initial_log_variance.get(t, 0.0)) for t in self.tasks}
        else:
            self.initial_log_variance = {t: float(initial_log_variance) for t in self.tasks}
        # Created here, not lazily, so that an optimizer built before the first step knows them.
        self.log_variances = {
            t: self.add_weight(name=f"{t}_log_variance", shape=(),
                               initializer=keras.initializers.Constant(self.initial_log_variance[t]),
                               trainable=True, dtype="float32")
            for t in self.tasks}
        self.built = True

    def _factor(self, task):
        return 1.0 if self.task_types[task] == "classification" else 0.5

    def weighted_total(self, task_losses):
        total = 0.0
        for t in self.tasks:
            s = self.log_variances[t]
            total = total + self._factor(t) * ops.exp(-s) * task_losses[t] + 0.5 * s
        return total

    def sigma_squared(self):
        """{task: sigma^2 = exp(s)}."""
        return {t: ops.exp(self.log_variances[t]) for t in self.tasks}

    def task_weights(self):
        return {t: self._factor(t) * ops.exp(-self.log_variances[t]) for t in self.tasks}

    def log_values(self):
        values = super().log_values()
        values.update({f"{t}_sigma2": v for t, v in self.sigma_squared().items()})
        return values

    def get_config(self):
        return {**super().get_config(), "task_types": dict(self.task_types),
                "initial_log_variance": dict(self.initial_log_variance)}


@keras.saving.register_keras_serializable(package="mtl_keras")
class FixedWeighting(LossWeighting):
    """``sum_i w_i L_i`` with constant weights (e.g. the paper's 0.89 / 0.01 / 0.1)."""

    def __init__(self, tasks, task_weights=None, **kwargs):
        super().__init__(tasks, **kwargs)
        if task_weights is None:
            task_weights = {t: 1.0 for t in self.tasks}
        elif not isinstance(task_weights, dict):
            task_weights = list(task_weights)
            if len(task_weights) != len(self.tasks):
                raise ValueError(f"task_weights has {len(task_weights)} values for {len(self.tasks)} tasks "
                                 f"{self.tasks}.")
            task_weights = dict(zip(self.tasks, task_weights))
        missing = [t for t in self.tasks if t not in task_weights]
        if missing:
            raise ValueError(f"task_weights lacks tasks {missing}.")
        self.fixed_weights = {t: float(task_weights[t]) for t in self.tasks}

    def weighted_total(self, task_losses):
        return sum(self.fixed_weights[t] * task_losses[t] for t in self.tasks)

    def task_weights(self):
        return {t: ops.convert_to_tensor(w, "float32") for t, w in self.fixed_weights.items()}

    def get_config(self):
        return {**super().get_config(), "task_weights": dict(self.fixed_weights)}


@keras.saving.register_keras_serializable(package="mtl_keras")
class EqualWeighting(FixedWeighting):
    """The unweighted sum of the task losses."""

    def __init__(self, tasks, **kwargs):
        kwargs.pop("task_weights", None)
        super().__init__(tasks, task_weights=None, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("task_weights")
        return config


WEIGHTINGS = {
    "uncertainty": UncertaintyWeightingLayer,
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
}


def build_weighting(name, tasks, **kwargs):
    """The weighting ``name`` (one of ``WEIGHTINGS``) for ``tasks``."""
    if name not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {name!r}. Valid: {', '.join(WEIGHTINGS)}.")
    return WEIGHTINGS[name](tasks, **kwargs)
