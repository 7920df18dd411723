"""The trainer (an inference model plus a loss weighting, trained with ``fit`` on ``(images, {task: target})``
batches; the inference model stays the separate, exported object), Kendall et al.'s optimiser and the callbacks."""

import logging
import sys
import time

import keras
import numpy as np
from keras import ops

from mtl_keras import distribution, gradient_training
from mtl_keras.losses import task_loss
from mtl_keras.tasks import IGNORE_LABEL, validate_tasks
from mtl_keras.weighting import GradientWeighting, LossWeighting

log = logging.getLogger("mtl_keras")

JACOBIAN_MODES = ("loop", "batched")
# Variables Kendall et al.'s SGD does not decay: batch norm, biases and the loss weights (decaying log sigma^2 towards 0
# would bias the learned task weights).
NO_WEIGHT_DECAY = ["log_variance", "gamma", "beta", "moving_", "bias"]


@keras.saving.register_keras_serializable(package="mtl_keras")
class MultiTaskTrainer(keras.Model):
    """Adds the per-task losses, weighted by ``weighting``, to an inference model's outputs; logs ``loss``,
    ``{task}_loss`` and the weighting's ``log_values()``. With a ``GradientWeighting`` the step takes per-task
    gradients (``mtl_keras.gradient_training``): ``jacobian_mode`` "loop" (K backward passes after one forward pass)
    or "batched" (one vectorised Jacobian pass, JAX only)."""

    def __init__(self, model, weighting, ignore_label=IGNORE_LABEL, jacobian_mode="loop", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(weighting, LossWeighting):
            raise TypeError(f"weighting must be a mtl_keras LossWeighting, got {type(weighting).__name__}.")
        outputs = tuple(model.output.keys()) if isinstance(model.output, dict) else ()
        missing = [t for t in weighting.tasks if t not in outputs]
        if missing:
            raise ValueError(f"The weighting has tasks {weighting.tasks} but the model outputs {outputs}.")
        self.inference_model = model
        self.loss_weighting = weighting
        self.tasks = validate_tasks(weighting.tasks)
        self.ignore_label = ignore_label
        self.task_loss_trackers = [keras.metrics.Mean(name=f"{t}_loss") for t in self.tasks]
        self.weight_trackers = [keras.metrics.Mean(name=n) for n in weighting.log_values()]
        if jacobian_mode not in JACOBIAN_MODES:
            raise ValueError(f"jacobian_mode must be one of {JACOBIAN_MODES}, got {jacobian_mode!r}.")
        if jacobian_mode == "batched" and keras.config.backend() != "jax":
            raise ValueError("jacobian_mode 'batched' (one vectorised Jacobian pass) needs KERAS_BACKEND=jax; "
                             "use 'loop' (K backward passes) here.")
        self.jacobian_mode = jacobian_mode
        self.partition = None
        if isinstance(weighting, GradientWeighting):
            if keras.config.backend() not in ("tensorflow", "jax"):
                raise ValueError(f"Gradient weightings ({weighting.method_name}) need KERAS_BACKEND=tensorflow or "
                                 f"jax (now {keras.config.backend()}); the loss weightings run on every backend.")
            self.partition = gradient_training.SharedPartition(model, self.tasks)
            weighting.build_state(self.partition.num_shared)
            if weighting.rep_grad:
                self.partition.split_models()  # fails now, not at the first step, if the model cannot split
        # Every variable exists now: a backup may be loaded before the first step.
        self.built = True

    def call(self, images, training=None):
        return self.inference_model(images, training=training)

    def _random_states(self):
        """The random-number states of the layers (Dropout's SeedGenerator): Keras leaves them out of saved weights,
        yet a resumed run must restore them to draw the uninterrupted run's masks."""
        return [v for v in self.variables if v.path.endswith("seed_generator_state")]

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for i, state in enumerate(self._random_states()):
            store[f"random_state_{i}"] = keras.ops.convert_to_numpy(state)

    def load_own_variables(self, store):
        keys = list(store.keys())
        super().load_own_variables({k: store[k] for k in keys if not k.startswith("random_state_")})
        states = self._random_states()
        saved = [k for k in keys if k.startswith("random_state_")]
        if len(saved) == len(states):  # a file written before the states were saved: the layers keep theirs
            for i, state in enumerate(states):
                state.assign(store[f"random_state_{i}"])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError("MultiTaskTrainer needs targets: the dataset must yield (images, {task: target}).")
        missing = [t for t in self.tasks if t not in y]
        if missing:
            raise ValueError(f"The dataset's targets lack tasks {missing}; it gives {sorted(y)}.")
        task_losses = {t: task_loss(t, y, y_pred, self.ignore_label) for t in self.tasks}
        # Cross-replica reductions happen before the weighting layer is called: MirroredStrategy switches replica
        # threads at each one, and the layer's add_loss list is shared by the replicas, so nothing may switch
        # between its call and the read of self.losses below.
        global_losses = {t: distribution.cross_replica_mean(v) for t, v in task_losses.items()}
        total = self.loss_weighting(task_losses, training=training, observed_losses=global_losses)  # add_loss inside
        for tracker, t in zip(self.task_loss_trackers, self.tasks):
            tracker.update_state(global_losses[t])
        for tracker, value in zip(self.weight_trackers, self.loss_weighting.log_values().values()):
            tracker.update_state(value)
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        if not any(term is total for term in self.loss_weighting.losses):
            # JAX's trainer runs compute_loss in a stateless scope that drops the add_loss terms made there: added
            # explicitly (no tf.distribute replica scaling to match), and only then, so that it never counts twice.
            loss = loss + total
        return loss

    def task_loss(self, task, y, y_pred):
        return task_loss(task, y, y_pred, self.ignore_label)

    def record_step(self, global_losses, x, y, y_pred):
        """Updates the logged metrics after a gradient-weighting step (``global_losses``: (K,), replica means)."""
        weights = self.loss_weighting.last_weights
        total = ops.sum(ops.cast(weights, "float32") * ops.cast(global_losses, "float32"))
        for k, tracker in enumerate(self.task_loss_trackers):
            tracker.update_state(global_losses[k])
        for tracker, value in zip(self.weight_trackers, self.loss_weighting.log_values().values()):
            tracker.update_state(value)
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        self._loss_tracker.update_state(total, sample_weight=batch)
        return self.get_metrics_result()

    if keras.config.backend() == "jax":

        def train_step(self, state, data):
            if self.partition is None:
                return super().train_step(state, data)
            return gradient_training.jax_train_step(self, state, data)

    if keras.config.backend() == "tensorflow":
        def train_step(self, data):
            if self.partition is not None:
                logs = gradient_training.tensorflow_train_step(self, data)
            else:
                logs = super().train_step(data)
            if distribution.is_multi_worker(self.distribute_strategy):
                # Keras reduces each log with strategy.reduce(MEAN, axis=0) there, which fails on rank-0 values
                # (tensorflow/tensorflow#72388); shape (1,) reduces to the same scalar.
                logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
            return logs

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            # Keras 3.15 reduces the first batch across replicas to build the model symbolically, an eager
            # cross-worker reduce that fails under MultiWorkerMirroredStrategy; only the optimizer needs building.
            if distribution.is_multi_worker(self.distribute_strategy):
                if self.optimizer is not None and not self.optimizer.built:
                    with self.distribute_strategy.scope():
                        self.optimizer.build(self.trainable_variables)
                return
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.inference_model),
            "weighting": keras.saving.serialize_keras_object(self.loss_weighting),
            "ignore_label": self.ignore_label,
            "jacobian_mode": self.jacobian_mode,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        weighting = keras.saving.deserialize_keras_object(config.pop("weighting"))
        return cls(model, weighting, **config)


def kendall_sgd(learning_rate=2.5e-3, total_steps=50_000, power=0.9, momentum=0.9, weight_decay=1e-4,
                schedule=None):
    """Kendall et al.'s optimiser: SGD, Nesterov momentum 0.9, lr 2.5e-3 with (1 - step/total)^0.9 decay, wd 1e-4.
    Keras decays ``w -= lr * wd * w`` (decoupled from the momentum, unlike PyTorch's L2 term). ``schedule``: another
    learning-rate schedule in place of the polynomial decay (``learning_rate`` and ``power`` then unused)."""
    if schedule is None:
        schedule = keras.optimizers.schedules.PolynomialDecay(
            learning_rate, decay_steps=max(int(total_steps), 1), end_learning_rate=0.0, power=power)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=momentum, nesterov=True,
                                     weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)
    return optimizer


@keras.saving.register_keras_serializable(package="mtl_keras")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``initial_learning_rate * gamma ** floor(step / decay_steps)``: torch's ``StepLR(step_size, gamma)`` stepped
    once per epoch, with ``decay_steps = step_size * steps_per_epoch`` (``step`` counts the updates done, so the
    first step of epoch ``step_size`` is the first at the lower rate)."""

    def __init__(self, initial_learning_rate, decay_steps, gamma=0.5):
        super().__init__()
        if int(decay_steps) < 1:
            raise ValueError(f"StepDecay's decay_steps must be >= 1, got {decay_steps}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = int(decay_steps)
        self.gamma = float(gamma)

    def __call__(self, step):
        drops = ops.floor_divide(ops.cast(step, "int64"), self.decay_steps)
        return self.initial_learning_rate * ops.power(ops.cast(self.gamma, "float32"), ops.cast(drops, "float32"))

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="mtl_keras")
class AdamL2(keras.optimizers.Adam):
    """``torch.optim.Adam(weight_decay=l2)``: the coupled L2 term ``g + l2 * w`` enters the moments (Keras' own
    ``weight_decay`` is AdamW's decoupled decay, a different update). Every variable is decayed, as torch's Adam over
    ``model.parameters()`` (LibMTL: batch norm, biases and a weighting's parameters too); ``l2 = 0`` is Keras' Adam."""

    def __init__(self, l2=0.0, **kwargs):
        super().__init__(**kwargs)
        if not float(l2) >= 0:
            raise ValueError(f"AdamL2's l2 must be >= 0, got {l2}.")
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2:
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


class ResumableTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback with per-batch summaries continuing at ``initial_step`` + 1 in a resumed run
    (Keras counts them from 0 in every ``fit``, writing over the interrupted run's steps)."""

    def __init__(self, log_dir, initial_step=0, **kwargs):
        super().__init__(log_dir, **kwargs)
        self.initial_step = int(initial_step)

    def on_train_begin(self, logs=None):
        done = getattr(self, "_global_train_batch", 0)  # a second fit of the same run (a mid-epoch resume's) goes on
        super().on_train_begin(logs)
        self._global_train_batch = max(self.initial_step, done)


class WeightingHistory(keras.callbacks.Callback):
    """Records the weighting's ``log_values()`` every ``every`` steps as ``{"step": [...], name: [...]}``."""

    def __init__(self, weighting, every=1):
        super().__init__()
        self.weighting = weighting
        self.every = max(int(every), 1)
        self.history = {"step": []}
        self._step = 0

    def resume(self, history, step):
        """Continues a resumed run's record: its points so far (``history``) and the step it resumes after."""
        self.history = {k: list(v) for k, v in history.items()} if history else {"step": []}
        self.history.setdefault("step", [])
        self._step = int(step)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every:
            return
        self.model  # noqa: B018 - on JAX, reading Callback.model writes the training state back to the variables
        self.history["step"].append(self._step)
        for name, value in self.weighting.log_values().items():
            self.history.setdefault(name, []).append(float(ops.convert_to_numpy(value)))


class EpochLogLine(keras.callbacks.Callback):
    """One line per epoch, for a log written to a file, in place of Keras' progress bar (which redraws itself with
    carriage returns and escape codes on every POSIX system, terminal or not: a file grows by a redraw per step)::

        epoch 3/10, step 150/500: loss=1.234 semantic_loss=0.9812 depth_loss=0.2531; semantic_weight=0.5312
        semantic_sigma2=0.9412; 41.2 images/s; elapsed 0:01:02, ETA 0:02:25

    (one line). The losses and metrics are the epoch's means, as Keras logs them; the weighting's ``log_values()``
    (each task's weight, and sigma^2 under uncertainty weighting) are read at the epoch's end: what the run has now.
    images/s counts ``batch_size`` (the global batch) images per step over the epoch's steps, the epoch-end work
    (backups) left out; elapsed is since this ``fit`` began; the ETA is the remaining epochs at the mean length of
    this fit's epochs after the first (which traces the step). Written with the ``mtl_keras`` logger, as the run's
    other lines are; printed where no handler would show it (this line replaces Keras' output: it must not vanish).
    """

    def __init__(self, batch_size, weighting=None):
        super().__init__()
        self.batch_size = int(batch_size)
        self.weighting = weighting
        self._fit_start = self._previous_end = self._epoch_start = self._last_step_end = None
        self._steps = 0
        self._epoch_seconds = []

    @staticmethod
    def interactive():
        """Whether Keras' progress bar has a screen to redraw: stdout is a terminal, or a notebook's kernel runs
        (IPython renders the carriage returns; its stdout is no terminal)."""
        try:
            terminal = bool(sys.stdout is not None and sys.stdout.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            terminal = False
        return terminal or "ipykernel" in sys.modules

    def on_train_begin(self, logs=None):
        self._fit_start = self._previous_end = time.perf_counter()
        self._epoch_seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start, self._last_step_end, self._steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        self._last_step_end = time.perf_counter()
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self._epoch_seconds.append(now - self._previous_end)
        self._previous_end = now
        model = self.model  # on JAX, reading Callback.model writes the training state back to the variables
        weighting = self.weighting if self.weighting is not None else getattr(model, "loss_weighting", None)
        values = weighting.log_values() if weighting is not None else {}
        weights = {name: self._as_float(value) for name, value in values.items()}
        self._write(self.line(epoch, logs or {}, weights, now))

    def line(self, epoch, logs, weights, now):
        """The line of epoch ``epoch`` (0-based): ``logs`` Keras' epoch logs, ``weights`` the weighting's values."""
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        where = f"epoch {epoch + 1}/{epochs}"
        if steps:
            where += f", step {(epoch + 1) * steps}/{epochs * steps}"
        values = {name: self._as_float(value) for name, value in logs.items() if name not in weights}
        values = {name: value for name, value in values.items() if value is not None}
        order = ["loss"] * ("loss" in values) + [name for name in values if name != "loss"]
        parts = [" ".join(f"{name}={values[name]:.4g}" for name in order)]
        if weights:
            parts.append(" ".join(f"{name}={value:.4g}" for name, value in weights.items() if value is not None))
        seconds = (self._last_step_end or now) - self._epoch_start
        parts.append(f"{self._steps * self.batch_size / seconds:.1f} images/s" if self._steps and seconds > 0
                     else "no steps timed")
        later = self._epoch_seconds[1:] or self._epoch_seconds
        remaining = max((epochs or 0) - (epoch + 1), 0)
        eta = remaining * sum(later) / len(later)
        parts.append(f"elapsed {self._clock(now - self._fit_start)}, ETA {self._clock(eta)}")
        return f"{where}: " + "; ".join(part for part in parts if part)

    @staticmethod
    def _write(line):
        if log.isEnabledFor(logging.INFO) and log.hasHandlers():
            log.info("%s", line)
        else:
            print(line, flush=True)

    @staticmethod
    def _as_float(value):
        """A log value as a float (a multi-worker run logs shape-(1,) values); None for anything else."""
        try:
            return float(np.mean(ops.convert_to_numpy(value)))
        except (TypeError, ValueError):
            return None

    @staticmethod
    def _clock(seconds):
        """``H:MM:SS``."""
        minutes, seconds = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}"
