"""Ways to combine the per-task losses into one training loss, behind one interface.

Every weighting is a layer whose ``call`` takes ``{task: scalar loss}`` and returns the weighted total, added once
with ``add_loss`` (which ``tf.distribute`` divides by the replicas: no other scaling may happen). ``log_values()``:
``{task}_weight`` (the factor in front of the task's loss) and, where the method has one, ``{task}_sigma2``.
"""

import keras
import numpy as np
from keras import ops

# aggregate is re-exported: the pure-function form of every gradient method (README).
from mtl_keras.gradient_methods import GRADIENT_METHODS, aggregate, build_gradient_method, renamed_hint  # noqa: F401
from mtl_keras.tasks import TASK_TYPES, validate_tasks


class LossWeighting(keras.layers.Layer):
    """Base class: a fixed set of ``tasks`` and the total ``sum_i w_i L_i + r`` of the method."""

    def __init__(self, tasks, **kwargs):
        # Loss weights stay float32 under mixed precision: they are tiny scalars that must not lose precision.
        kwargs["dtype"] = keras.config.floatx()
        super().__init__(**kwargs)
        self.tasks = validate_tasks(tasks)

    def weight_vector(self):
        """The (K,) factors in front of the task losses, for the subclasses that keep them as one vector."""
        raise NotImplementedError

    def weighted_total(self, task_losses):
        weights = self.weight_vector()
        return sum(weights[i] * task_losses[t] for i, t in enumerate(self.tasks))

    def task_weights(self):
        """{task: effective weight} as tensors."""
        weights = self.weight_vector()
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def _state_variable(self, name, shape, initializer, dtype=None):
        """A non-trainable variable that replicas keep identical (the first replica's value)."""
        return self.add_weight(name=name, shape=shape, initializer=initializer, dtype=dtype, trainable=False,
                               aggregation="only_first_replica")

    def log_values(self):
        return {f"{t}_weight": w for t, w in self.task_weights().items()}

    def observe(self, task_losses):
        """Called with each training step's losses (no gradient); methods that adapt between epochs record here."""

    def on_epoch_end(self):
        """Called once per training epoch by ``WeightingEpochCallback``."""

    def call(self, task_losses, training=None, observed_losses=None):
        """The weighted total of ``{task: loss}``, also added with ``add_loss``. In training, ``observed_losses``
        (default ``task_losses``; the cross-replica mean under tf.distribute) feed the adaptive statistics."""
        missing = [t for t in self.tasks if t not in task_losses]
        if missing:
            raise ValueError(f"{type(self).__name__} expects losses for tasks {self.tasks}; missing {missing}.")
        task_losses = {t: ops.cast(task_losses[t], keras.config.floatx()) for t in self.tasks}
        if training:
            observed = task_losses if observed_losses is None else observed_losses
            self.observe({t: ops.stop_gradient(ops.cast(observed[t], keras.config.floatx())) for t in self.tasks})
        total = self.weighted_total(task_losses)
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
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): a learnable ``s = log sigma^2`` per
    task; ``exp(-s) L + s/2`` for classification, ``0.5 exp(-s) L + s/2`` for regression. The total can be negative.

    Args:
        tasks: task names.
        task_types: optional ``{task: "classification" | "regression"}``; defaults from ``mtl_keras.tasks``.
        initial_log_variance: a float, or ``{task: float}`` (the paper's Fig. 6: any value in [-2, 5] converges alike).
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
        # created here, not lazily, so that an optimizer built before the first step knows them
        self.log_variances = {
            t: self.add_weight(name=f"{t}_log_variance", shape=(),
                               initializer=keras.initializers.Constant(self.initial_log_variance[t]),
                               trainable=True, dtype=keras.config.floatx())
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
        return {t: ops.convert_to_tensor(w, keras.config.floatx()) for t, w in self.fixed_weights.items()}

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


class EpochStatisticsWeighting(LossWeighting):
    """Base of the weightings that adapt from per-epoch statistics of the task losses (DWA, MT-UNet): running sums
    in variables (checkpointed), turned into the epoch's mean and variance by ``on_epoch_end``."""

    def __init__(self, tasks, **kwargs):
        super().__init__(tasks, **kwargs)
        n = len(self.tasks)
        zeros = keras.initializers.Zeros()
        self.loss_sum = self._state_variable("loss_sum", (n,), zeros)
        self.loss_square_sum = self._state_variable("loss_square_sum", (n,), zeros)
        self.loss_count = self._state_variable("loss_count", (), zeros)
        self.epochs_seen = self._state_variable("epochs_seen", (), zeros)

    def observe(self, task_losses):
        values = ops.stack([task_losses[t] for t in self.tasks])
        self.loss_sum.assign_add(values)
        self.loss_square_sum.assign_add(values * values)
        self.loss_count.assign_add(1.0)

    def _epoch_statistics(self):
        """(mean, variance) of each task's step losses over the epoch just ended (numpy), then reset."""
        count = max(float(ops.convert_to_numpy(self.loss_count)), 1.0)
        mean = ops.convert_to_numpy(self.loss_sum) / count
        variance = np.maximum(ops.convert_to_numpy(self.loss_square_sum) / count - mean ** 2, 0.0)
        for v in (self.loss_sum, self.loss_square_sum):
            v.assign(np.zeros(v.shape, v.dtype))
        self.loss_count.assign(0.0)
        self.epochs_seen.assign(self.epochs_seen + 1.0)
        return mean, variance


@keras.saving.register_keras_serializable(package="mtl_keras")
class DWAWeighting(EpochStatisticsWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-end multi-task learning with attention", CVPR 2019):
    ``K softmax(r / T)`` of the ratios of the last two epochs' mean losses; 1 during the first two epochs."""

    def __init__(self, tasks, temperature=2.0, **kwargs):
        super().__init__(tasks, **kwargs)
        self.temperature = float(temperature)
        n = len(self.tasks)
        ones = keras.initializers.Ones()
        self.current_weights = self._state_variable("task_weights", (n,), ones)
        self.previous_mean_losses = self._state_variable("previous_mean_losses", (2, n), ones)
        self.built = True

    @staticmethod
    def weights_from_losses(last, before_last, temperature):
        """The DWA weights from two epochs' mean losses (numpy), summing to the number of tasks."""
        ratio = np.asarray(last, "float64") / np.maximum(np.asarray(before_last, "float64"), 1e-12)
        e = np.exp((ratio - ratio.max()) / temperature)
        return len(ratio) * e / e.sum()

    def on_epoch_end(self):
        mean, _ = self._epoch_statistics()
        history = ops.convert_to_numpy(self.previous_mean_losses)
        history = np.stack([history[1], mean])  # [L(t-2), L(t-1)] for the next epoch
        self.previous_mean_losses.assign(history.astype(keras.config.floatx()))
        if float(ops.convert_to_numpy(self.epochs_seen)) >= 2:
            self.current_weights.assign(
                self.weights_from_losses(history[1], history[0], self.temperature).astype(keras.config.floatx()))

    def weight_vector(self):
        return self.current_weights

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="mtl_keras")
class MTUNetWeighting(EpochStatisticsWeighting):
    """MT-UNet's learned, variance-normalised weighting (Eq. 5): ``p_i = W_i a_i / sum_j W_j a_j``,
    ``a_i = (sigma_i(t-1) + eps) / (sigma_i(t-2) + eps)``.

    Where the paper is vague: ``sigma_i(t)`` is the variance of the step losses in epoch t averaged over ``window``
    epochs (``a = 1`` for two epochs); ``W = exp(omega)``; ``omega`` takes a plain gradient step at the paper's
    separate rate (1e-3) each training step with the losses held fixed, outside the model's optimiser.
    """

    def __init__(self, tasks, weight_learning_rate=1e-3, window=3, epsilon=1e-8, **kwargs):
        super().__init__(tasks, **kwargs)
        self.weight_learning_rate = float(weight_learning_rate)
        self.window = int(window)
        self.epsilon = float(epsilon)
        n = len(self.tasks)
        zeros, ones = keras.initializers.Zeros(), keras.initializers.Ones()
        self.log_w = self._state_variable("log_w", (n,), zeros)
        self.alpha = self._state_variable("alpha", (n,), ones)
        self.variance_history = self._state_variable("variance_history", (self.window + 1, n), zeros)
        self.built = True

    def normalised_weights(self):
        w = ops.exp(self.log_w) * self.alpha
        return w / ops.sum(w)

    def observe(self, task_losses):
        super().observe(task_losses)
        losses = ops.stack([task_losses[t] for t in self.tasks])
        p = self.normalised_weights()
        total = ops.sum(p * losses)
        self.log_w.assign_sub(self.weight_learning_rate * p * (losses - total))

    def on_epoch_end(self):
        _, variance = self._epoch_statistics()
        epochs = int(float(ops.convert_to_numpy(self.epochs_seen)))
        history = ops.convert_to_numpy(self.variance_history)
        history = np.concatenate([history[1:], variance[None]], axis=0)  # oldest first, newest last
        self.variance_history.assign(history.astype(keras.config.floatx()))
        if epochs >= 2:
            self.alpha.assign(self.alpha_from_variances(history, epochs, self.window, self.epsilon)
                              .astype(keras.config.floatx()))

    @staticmethod
    def alpha_from_variances(history, epochs_seen, window, epsilon):
        """``a_i`` from ``history`` (window + 1, tasks) of epoch variances, newest last (fewer epochs at the start)."""
        history = np.asarray(history, "float64")
        available = min(epochs_seen, window + 1)
        rows = history[len(history) - available:]
        sigma_last = rows[-min(window, len(rows)):].mean(axis=0)
        previous = rows[:-1]
        sigma_before = previous[-min(window, len(previous)):].mean(axis=0)
        return (sigma_last + epsilon) / (sigma_before + epsilon)

    def weight_vector(self):
        return self.normalised_weights()

    def get_config(self):
        return {**super().get_config(), "weight_learning_rate": self.weight_learning_rate, "window": self.window,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="mtl_keras")
class GradientWeighting(LossWeighting):
    """A method of ``mtl_keras.gradient_methods`` for the trainer (``mtl_keras.gradient_training``): the method's
    state and the step counter that seeds its randomness live in this layer's variables (checkpointed, identical on
    every replica). Called on losses (evaluation), the total is ``sum_k w_k L_k`` with the last step's weights.
    """

    def __init__(self, tasks, method="pcgrad", rep_grad=False, seed=0, options=None, **kwargs):
        super().__init__(tasks, **kwargs)
        self.method_name = str(method)
        self.options = dict(options or {})
        self.rep_grad = bool(rep_grad)
        self.seed = int(seed)
        self.method = build_gradient_method(self.method_name, len(self.tasks), **self.options)
        if self.rep_grad and not self.method.supports_rep_grad:
            raise ValueError(f"Weighting {self.method_name!r} is defined on parameter gradients only; drop --rep_grad.")
        n = len(self.tasks)
        self.step = self._state_variable("step", (), "zeros", dtype="int32")
        self.last_weights = self._state_variable("last_weights", (n,), "ones")
        self.state_variables = {}
        self.num_params = None
        self.built = True

    def build_state(self, num_params):
        """Creates the method's state variables for ``num_params`` (P) shared values; the trainer calls it once."""
        if self.num_params is not None:
            if int(num_params) != self.num_params:
                raise ValueError(f"{self.method_name}: state built for {self.num_params} shared values, now "
                                 f"{num_params}.")
            return
        self.num_params = int(num_params)
        for name, value in self.method.initial_state(self.num_params).items():
            value = np.asarray(value)
            initializer = keras.initializers.Constant(value) if value.ndim == 0 else _ArrayInitializer(value)
            self.state_variables[name] = self._state_variable(f"state_{name}", value.shape, initializer,
                                                              dtype=str(value.dtype))

    def _state(self):
        return {k: v.value for k, v in self.state_variables.items()}

    def direction(self, gradients, losses):
        """The direction (P,) from ``gradients`` (K, P) (or (S, K, P)) and ``losses`` (K,); advances the state.

        A non-finite step (a float16 overflow, which ``LossScaleOptimizer`` skips) leaves the state as it was and
        returns NaN, so that the optimiser sees the overflow whatever the method would make of it.
        """
        gradients = ops.convert_to_tensor(gradients)
        losses = ops.cast(losses, gradients.dtype)
        finite = ops.logical_and(ops.all(ops.isfinite(gradients)), ops.all(ops.isfinite(losses)))
        safe_gradients = ops.where(finite, gradients, ops.zeros_like(gradients))
        safe_losses = ops.where(finite, losses, ops.ones_like(losses))
        direction, weights, state = self.method.aggregate(safe_gradients, safe_losses, self._state(),
                                                          self.step.value, self.seed)
        self._after_aggregate(weights, state, finite)
        return ops.where(finite, direction, ops.full_like(direction, float("nan")))

    def loss_weights(self, losses):
        """Loss-only methods: this step's weights (K,); advances the state (not on non-finite losses)."""
        finite = ops.all(ops.isfinite(losses))
        weights, state = self.method.loss_weights(ops.where(finite, losses, ops.ones_like(losses)), self._state(),
                                                  self.step.value, self.seed)
        self._after_aggregate(weights, state, finite)
        return weights

    def _assign_state(self, state, finite):
        for k, v in self.state_variables.items():
            v.assign(ops.where(finite, ops.cast(state[k], v.dtype), v.value))

    def _after_aggregate(self, weights, state, finite):
        self._assign_state(state, finite)
        if weights is not None:
            self.last_weights.assign(ops.where(finite, ops.cast(weights, self.last_weights.dtype),
                                               self.last_weights.value))
        self.step.assign(self.step.value + ops.cast(finite, "int32"))

    def after_step(self, losses_before, losses_after):
        """FAMO-like methods: update from the losses before and after this step's update."""
        finite = ops.logical_and(ops.all(ops.isfinite(losses_before)), ops.all(ops.isfinite(losses_after)))
        state = self.method.after_step(losses_before, ops.where(finite, losses_after, losses_before), self._state(),
                                       self.step.value)
        self._assign_state(state, finite)

    def weight_vector(self):
        return self.last_weights

    def get_config(self):
        return {**super().get_config(), "method": self.method_name, "rep_grad": self.rep_grad, "seed": self.seed,
                "options": dict(self.options)}


class _ArrayInitializer(keras.initializers.Initializer):
    """Initialises a variable to a given numpy array (the method's initial state)."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def __call__(self, shape, dtype=None):
        return ops.cast(ops.reshape(ops.convert_to_tensor(self.value), shape), dtype or self.value.dtype)

    def get_config(self):
        return {"value": self.value.tolist()}


class WeightingEpochCallback(keras.callbacks.Callback):
    """Lets epoch-adaptive weightings (DWA, MT-UNet) update at the end of each training epoch."""

    def __init__(self, weighting):
        super().__init__()
        self.weighting = weighting

    def on_epoch_end(self, epoch, logs=None):
        self.model  # noqa: B018 - on JAX, reading Callback.model writes the training state back to the variables
        self.weighting.on_epoch_end()


WEIGHTINGS = {
    "uncertainty": UncertaintyWeightingLayer,
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
    "dwa": DWAWeighting,
    "mtunet": MTUNetWeighting,
}


def weighting_names():
    """Every ``--weighting`` name: the loss weightings, then the gradient methods (sorted)."""
    return list(WEIGHTINGS) + sorted(n for n in GRADIENT_METHODS if n not in WEIGHTINGS)


def build_weighting(name, tasks, rep_grad=False, seed=0, options=None, **kwargs):
    """The weighting ``name`` for ``tasks``: a loss weighting of ``WEIGHTINGS`` (``kwargs`` are its arguments) or a
    gradient method of ``mtl_keras.gradient_methods`` (``options`` are its options)."""
    if name in WEIGHTINGS:
        if rep_grad:
            raise ValueError(f"--rep_grad applies to gradient weightings; {name!r} weights the losses.")
        return WEIGHTINGS[name](tasks, **kwargs)
    if name in GRADIENT_METHODS:
        return GradientWeighting(tasks, method=name, rep_grad=rep_grad, seed=seed, options=options, **kwargs)
    raise ValueError(f"Unknown weighting {name!r}{renamed_hint(name)}. Valid: {', '.join(weighting_names())}.")
