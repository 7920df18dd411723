"""One training run from a ``TrainConfig`` (``experiments/train.py`` is its command line), as five steps sharing a
:class:`Run`: :func:`prepare`, :func:`build`, :func:`start`, :func:`fit` and :func:`finish`. The README lists the
files of the output folder."""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

import keras
import numpy as np

from mtl_keras import checkpointing, distribution, platform
from mtl_keras import export as serving_export
from mtl_keras.atomic_files import atomic_path, write_json_atomically, write_text_atomically
from mtl_keras.config import TrainConfig, read_json
from mtl_keras.data import datasets
from mtl_keras.evaluation import evaluate_model
from mtl_keras.presets import build_model, load_model, save_to_preset
from mtl_keras.run_lock import RunLock
from mtl_keras.tasks import validate_tasks
from mtl_keras.training import (AdamL2, EpochLogLine, MultiTaskTrainer, ResumableTensorBoard, StepDecay,
                                WeightingHistory, kendall_sgd)
from mtl_keras.visualize import plot_task_weights, save_prediction_panel
from mtl_keras.weighting import WeightingEpochCallback, build_weighting

log = logging.getLogger("mtl_keras")

AUTO_CACHE_BYTES = 2 * 1024 ** 3

# Settings that may change when an interrupted run is started again: where things are written or read, how much is
# evaluated, and how the same computation is placed (another machine may resume with another strategy).
RESUME_MAY_CHANGE = ("output_dir", "data_dir", "backbone_weights", "val_batches", "num_sample_images", "export",
                     "strategy", "cpu_replicas", "jit_compile", "deterministic", "overwrite")

# What a finished run leaves in its folder: removed when --overwrite replaces it, as its training starts.
RUN_OUTPUTS = ("metrics.json", "metrics_untrained.json", "task_weights.png", "model.keras", "preset", "samples", "eval",
               "export", "logs", "checkpoints")


@dataclasses.dataclass
class Run:
    """What the steps of one run share. :func:`prepare` fills the first fields, each later step its own."""

    config: TrainConfig
    strategy: object
    out: str  # the output folder; a non-chief worker's own temporary folder
    tasks: tuple
    chief: bool = True
    num_workers: int = 1
    replaces_finished_run: bool = False
    backbone_weights: dict = dataclasses.field(default_factory=dict)
    started: float = 0.0
    data_dir: str = ""  # prepare: the data
    num_train: int = 0
    epochs: int = 0
    steps_per_epoch: int = 0
    data_kwargs: dict = dataclasses.field(default_factory=dict)
    augment: dict = dataclasses.field(default_factory=dict)
    use_tf_data: bool = True
    val_ds: object = None
    model: keras.Model = None  # build
    weighting: object = None
    trainer: MultiTaskTrainer = None
    jit_compile: bool = False
    initial_epoch: int = 0
    initial_step: int = 0  # a preempted run's steps into epoch initial_epoch + 1
    metric_states: tuple = ()  # ... and that epoch's running metrics then
    train_ds: object = None  # start
    untrained: dict = None
    callbacks: list = dataclasses.field(default_factory=list)
    history: WeightingHistory = None
    backup: checkpointing.EpochBackup = None
    preemption: checkpointing.PreemptionGuard = None
    fit_seconds: float = 0.0  # fit

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    @property
    def backup_dir(self):
        return os.path.join(self.out, "backup")


def run_training(config: TrainConfig, verbose=None):
    """Trains, evaluates and exports; returns the dict written to ``metrics.json``. Only the chief writes the output
    folder; a run started again on it resumes after its last epoch and ends with an uninterrupted run's weights.
    ``verbose``: :func:`fit`'s."""
    previous_policy = keras.mixed_precision.global_policy().name
    try:
        with output_lock(config):
            if config.precision != "float32":
                keras.mixed_precision.set_global_policy(config.precision)
            run = prepare(config)
            build(run)
            start(run)
            fit(run, verbose=verbose)
            return finish(run)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def output_lock(config):
    """The output folder's lock (``OUTPUT_DIR/run.lock``), to hold from before :func:`prepare` reads the folder until
    the run ends: a second process on the folder is refused in one line, before it reads or writes anything there.
    Only the chief writes the folder, so only it locks it (the other workers keep their own folders)."""
    if not distribution.is_chief():
        return contextlib.nullcontext()
    return RunLock(config.output_dir, name="--output_dir")


def prepare(config):
    """Checks the output folder and the settings, creates the strategy, seeds, plans the steps and opens the
    validation data. Writes nothing: a run that fails before :func:`start` leaves the folder as it was."""
    started = time.time()
    if config.deterministic:
        distribution.enable_determinism()
    strategy = distribution.create_strategy(config.strategy, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"--batch_size {config.batch_size} (global) must be divisible by the {replicas} replicas.")
    _, _, num_workers = distribution.task_info()
    chief = distribution.is_chief()
    run = Run(config, strategy, config.output_dir if chief else _worker_dir(config), validate_tasks(config.tasks),
              chief=chief, num_workers=num_workers, started=started)
    if chief:
        run.replaces_finished_run = check_output_dir(config, run.out)
        check_resumable(config, run.out, run.backup_dir)
    run.backbone_weights = _backbone_weights_argument(config, run.backup_dir)  # a missing file fails before any work
    keras.utils.set_random_seed(config.seed)
    _prepare_data(run)
    return run


def _prepare_data(run):
    config = run.config
    run.data_dir = resolve_data_dir(config)
    run.num_train = datasets.count_examples(config.dataset, run.data_dir, "train")
    run.epochs, run.steps_per_epoch = plan_steps(config, run.num_train)
    run.data_kwargs = dict(image_size=tuple(int(v) for v in config.image_size), num_classes=config.num_classes,
                           tasks=run.tasks, seed=config.seed)
    if config.depth_target:
        run.data_kwargs["depth_target"] = config.depth_target
    if tuple(config.scale_range) != (1.0, 1.0):
        run.augment["scale_range"] = tuple(config.scale_range)
    if config.crop_size:
        run.augment["crop_size"] = tuple(config.crop_size)
    run.use_tf_data = platform.tensorflow_available()
    if run.use_tf_data:
        run.val_ds = datasets.load_dataset(config.dataset, run.data_dir, "val", batch_size=config.batch_size,
                                           shuffle=False, flip=False, **run.data_kwargs)
        if config.val_batches:
            run.val_ds = run.val_ds.take(config.val_batches)
    else:
        run.val_ds = _numpy_dataset(run, "val", max_batches=config.val_batches)


def resolve_data_dir(config):
    """The folder to read; a generated dataset (``synthetic``) is generated once, when absent."""
    entry = datasets.dataset_entry(config.dataset)  # validates the name
    if entry.generate is not None:
        return entry.generate(config)
    if not config.data_dir:
        raise ValueError(f"--data_dir is required with --dataset {config.dataset}.")
    if not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f"--data_dir {config.data_dir!r} is not a folder (expected the root of the "
                                f"{config.dataset} dataset; see datasets/{config.dataset}.md).")
    return config.data_dir


def plan_steps(config, num_train_images):
    """(epochs, steps_per_epoch) with ``epochs * steps_per_epoch == --steps`` exactly when --steps is given; an epoch
    is at most one pass over the training split (the largest divisor of --steps that fits)."""
    batches_per_pass = max(num_train_images // config.batch_size, 1)
    if config.steps > 0:
        steps_per_epoch = max(d for d in range(1, min(config.steps, batches_per_pass) + 1) if config.steps % d == 0)
        return config.steps // steps_per_epoch, steps_per_epoch
    return (config.epochs or 10), batches_per_pass


def check_output_dir(config, out):
    """Refuses an output folder that is a file or holds a finished run (``metrics.json``, no backups) without
    ``--overwrite``; an unfinished one is resumed. Returns True when a finished run is there (to be replaced)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out} is a file; expected a folder for the run (new or to resume).")
    metrics = os.path.join(out, "metrics.json")
    finished = os.path.isfile(metrics) and not checkpointing.read_state(os.path.join(out, "backup")).get("backups")
    if finished and not config.overwrite:
        raise ValueError(f"--output_dir {out} holds a finished run ({metrics}); choose another --output_dir, or pass "
                         f"--overwrite to replace it.")
    return finished


def check_resumable(config, out, backup_dir):
    """Refuses to resume the backups in ``out`` under other training settings than they were made with (the run would
    silently continue a different one)."""
    saved_path = os.path.join(out, "config.json")
    if not checkpointing.read_state(backup_dir).get("backups") or not os.path.exists(saved_path):
        return
    try:
        saved = read_json(saved_path)
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, got a JSON {type(saved).__name__}")
    except (OSError, ValueError) as e:
        log.warning("Cannot read %s (%s): resuming without comparing the settings.", saved_path, e)
        return
    differing = config.differences(saved, ignore=RESUME_MAY_CHANGE)
    if differing:
        now = json.loads(config.to_json())
        changes = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in differing)
        raise ValueError(
            f"{out} holds an interrupted run (backups in {backup_dir}) made with other settings ({changes}). "
            f"Start it again with the same settings to resume it, choose another --output_dir, or delete "
            f"{backup_dir} to start this run from scratch there.")


def _backbone_weights_argument(config, backup_dir):
    """``{"backbone_weights": ...}`` for a new run from ImageNet weights; ``{}`` otherwise and when resuming."""
    weights = config.backbone_weights
    if not weights or checkpointing.read_state(backup_dir).get("backups"):
        return {}
    if weights != "imagenet" and not os.path.isfile(os.path.expanduser(weights)):
        raise ValueError(f"--backbone_weights {weights}: no such file (expected 'imagenet' or a keras.applications "
                         f"ResNet50/101 .h5 file).")
    return {"backbone_weights": weights if weights == "imagenet" else os.path.expanduser(weights)}


def _worker_dir(config):
    """Where a non-chief worker keeps its own backups: outside the shared output folder, stable across restarts."""
    task_type, index, _ = distribution.task_info()
    key = hashlib.sha256(os.path.abspath(config.output_dir).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mtl_keras_{key}_{task_type}{index}")


def _numpy_dataset(run, split, max_batches=0, **kwargs):
    config = run.config
    loader = datasets.dataset_entry(config.dataset).numpy_loader
    if loader is None or run.augment or run.data_kwargs.get("depth_target", "inverse") != "inverse":
        readable = ", ".join(name for name, entry in datasets.DATASETS.items() if entry.numpy_loader is not None)
        raise ValueError(f"Without TensorFlow, only --dataset {readable} with inverse depth and no --scale_range / "
                         f"--crop_size can be read (got --dataset {config.dataset}); install tensorflow for the "
                         f"tf.data pipelines.")
    kwargs.update({k: v for k, v in run.data_kwargs.items() if k != "depth_target"})
    kwargs.update(flip=config.flip if split == "train" else False, shuffle=split == "train")
    dataset = loader(run.data_dir, split, batch_size=config.batch_size, **kwargs)
    if max_batches:
        return [dataset[i] for i in range(min(max_batches, len(dataset)))]
    return dataset


def build(run, make_optimizer=None):
    """The model, its weighting and the compiled trainer under the run's strategy, restored when the run resumes.
    ``make_optimizer(config, total_steps)``: :func:`build_optimizer` when None."""
    config, replicas = run.config, run.replicas
    # Unset: XLA on JAX; off on TensorFlow (its XLA is 1.6 to 4.2x slower here on CPU, benchmarks/README.md) and torch.
    run.jit_compile = keras.config.backend() == "jax" if config.jit_compile is None else bool(config.jit_compile)
    if run.jit_compile and replicas > 1 and keras.config.backend() == "tensorflow":
        log.warning("--jit_compile is off under %d replicas (XLA fails with add_loss across devices).", replicas)
        run.jit_compile = False
    with run.strategy.scope():
        # Training crops of another size than the evaluation images: a model that takes any image size.
        height, width = (int(v) for v in config.image_size)
        crop = tuple(config.crop_size)
        input_shape = (height, width, 3) if not crop or crop == (height, width) else (None, None, 3)
        run.model = build_model(config.model, tasks=run.tasks, num_classes=config.num_classes,
                                input_shape=input_shape, **dict(config.model_overrides), **run.backbone_weights)
        if config.sync_batchnorm and replicas > 1:
            # Without it each replica keeps its own moving statistics: workers would end with different weights.
            distribution.set_synchronized_batchnorm(run.model)
        run.weighting = build_loss_weighting(config, run.tasks)
        _check_gradient_samples(config, run.weighting, replicas)
        run.trainer = MultiTaskTrainer(run.model, run.weighting, jacobian_mode=config.jacobian_mode)
        optimizer = make_optimizer(config, run.total_steps) if make_optimizer else build_optimizer(
            config, run.total_steps, run.steps_per_epoch)
        run.trainer.compile(optimizer=optimizer, jit_compile=run.jit_compile)
        point = checkpointing.restore_point(run.trainer, run.backup_dir)
        run.initial_epoch, run.initial_step, run.metric_states = point.epoch, point.step, point.metric_states
    return run


def build_loss_weighting(config, tasks):
    kwargs = {}
    if config.weighting == "uncertainty":
        kwargs["initial_log_variance"] = config.initial_log_variance
    elif config.weighting == "dwa":
        kwargs["temperature"] = config.dwa_temperature
    elif config.weighting == "mtunet":
        kwargs["weight_learning_rate"] = config.weight_learning_rate
    elif config.weighting == "fixed":
        if len(config.task_weights) != len(tasks):
            raise ValueError(f"--task_weights needs one value per task {tasks}, got {list(config.task_weights)}.")
        kwargs["task_weights"] = [float(w) for w in config.task_weights]
    else:  # a gradient method: its options, rep_grad and the run's seed (for its random draws)
        return build_weighting(config.weighting, tasks, rep_grad=config.rep_grad, seed=config.seed,
                               options=dict(config.weighting_options))
    if config.weighting_options:
        raise ValueError(f"--weighting_options applies to gradient weightings; {config.weighting!r} has its own flags.")
    return build_weighting(config.weighting, tasks, rep_grad=config.rep_grad, **kwargs)


def _check_gradient_samples(config, weighting, replicas):
    samples = getattr(getattr(weighting, "method", None), "gradient_samples", 1)
    per_replica = config.batch_size // replicas
    if samples > 1 and per_replica < samples:
        raise ValueError(f"--weighting {config.weighting} cuts each replica's batch into {samples} gradient samples: "
                         f"--batch_size must give each of the {replicas} replica(s) at least {samples} images "
                         f"(now {per_replica}).")
    if samples > 1 and replicas > 1 and per_replica % samples:
        log.warning("--weighting %s cuts each replica's batch into %d gradient samples: with %d per replica "
                    "(not a multiple of %d) the parts differ from the one-device parts of the global batch.",
                    config.weighting, samples, per_replica, samples)


def build_optimizer(config, total_steps, steps_per_epoch=None):
    """``--optimizer`` with ``--lr_schedule``: poly decays to 0 over ``total_steps``; step multiplies by
    ``--lr_step_gamma`` every ``--lr_step_epochs`` epochs of ``steps_per_epoch`` steps (needed then)."""
    if config.lr_schedule == "step":
        if not steps_per_epoch:
            raise ValueError("--lr_schedule step needs the steps per epoch (build_optimizer(..., steps_per_epoch)).")
        schedule = StepDecay(config.learning_rate, config.lr_step_epochs * int(steps_per_epoch),
                             gamma=config.lr_step_gamma)
    else:
        schedule = keras.optimizers.schedules.PolynomialDecay(
            config.learning_rate, decay_steps=max(total_steps, 1), end_learning_rate=0.0, power=config.lr_power)
    if config.optimizer == "sgd":
        step = schedule if config.lr_schedule == "step" else None  # poly: kendall_sgd's own, as before
        return kendall_sgd(config.learning_rate, total_steps, power=config.lr_power, momentum=config.momentum,
                           weight_decay=config.weight_decay, schedule=step)
    if config.optimizer == "adam":
        if config.adam_l2:
            return AdamL2(l2=config.adam_l2, learning_rate=schedule)
        return keras.optimizers.Adam(schedule)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}. Valid: adam, sgd.")


def start(run):
    """The folder becomes the run's (a finished run's outputs there are removed), then the training data, the
    untrained network's metrics (read back when resuming) and the callbacks."""
    config = run.config
    os.makedirs(run.out, exist_ok=True)
    if run.chief:
        for path in [os.path.join(run.out, name) for name in RUN_OUTPUTS if run.replaces_finished_run]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        write_text_atomically(os.path.join(run.out, "config.json"), config.to_json())
    log.info("model %s: %d parameters; %d epochs x %d steps; global batch %d = %d replica(s) x %d%s; %s", config.model,
             run.model.count_params(), run.epochs, run.steps_per_epoch, config.batch_size, run.replicas,
             config.batch_size // run.replicas, f" over {run.num_workers} workers" if run.num_workers > 1 else "",
             config.precision)
    run.train_ds = train_dataset(run)
    untrained_path = os.path.join(run.out, "metrics_untrained.json")
    if run.chief and run.initial_epoch == 0 and run.initial_step == 0:
        run.untrained = evaluate_model(_local_copy(run.model), run.val_ds, config.num_classes, run.tasks)
        write_json_atomically(untrained_path, _to_jsonable(run.untrained))
    elif run.chief:
        with open(untrained_path) as f:
            run.untrained = json.load(f)
    run.callbacks = distribution.callbacks_outside_distribution(run.strategy, _run_callbacks(run))
    return run


def train_dataset(run, skip=None):
    """The repeated training batches; a resumed run skips those already seen (an uninterrupted run's order).
    ``skip``: the batches to skip (default: the restored point's, epochs and steps)."""
    config = run.config
    skip = run.initial_epoch * run.steps_per_epoch + run.initial_step if skip is None else int(skip)
    cache = {"cache": True} if run.use_tf_data and cache_training_examples(config, run.num_train) else {}

    def load(batch_size, **context):
        return datasets.load_dataset(config.dataset, run.data_dir, "train", batch_size=batch_size, flip=config.flip,
                                     repeat=True, **context, **cache, **run.augment, **run.data_kwargs).skip(skip)

    # TensorFlow's workers each read their own shard of the files at the per-replica batch size
    if run.num_workers > 1 and distribution.is_multi_worker(run.strategy):
        return run.strategy.distribute_datasets_from_function(
            lambda context: load(context.get_per_replica_batch_size(config.batch_size), input_context=context))
    if run.use_tf_data:  # Keras splits each global batch over the local replicas (on JAX: over the processes)
        return load(config.batch_size)
    epoch, step = divmod(skip, run.steps_per_epoch)
    dataset = _numpy_dataset(run, "train", steps_per_epoch=run.steps_per_epoch, initial_epoch=epoch)
    return SkipBatches(dataset, step) if step else dataset


class SkipBatches(keras.utils.PyDataset):
    """A PyDataset without its first ``skip`` batches of the current epoch: a mid-epoch resume's first epoch."""

    def __init__(self, dataset, skip):
        super().__init__()
        self.dataset, self.skip = dataset, int(skip)

    def __len__(self):
        return len(self.dataset) - self.skip

    def __getitem__(self, index):
        return self.dataset[index + self.skip]

    def on_epoch_end(self):
        self.dataset.on_epoch_end()


def cache_training_examples(config, num_train_images):
    """Whether the decoded training examples stay in memory (``--cache``; ``auto``: under ``AUTO_CACHE_BYTES`` at
    about 20 bytes per pixel, the float32 image and the targets)."""
    if config.cache == "auto":
        height, width = (int(v) for v in config.image_size)
        return num_train_images * height * width * 20 < AUTO_CACHE_BYTES
    return config.cache == "memory"


def _run_callbacks(run):
    # About 500 points for the sigma^2 plot: reading the loss weights syncs with the device, so not every step.
    run.history = WeightingHistory(run.weighting, every=max(run.total_steps // 500, 1))
    recorded = {}
    resumed_steps = run.initial_epoch * run.steps_per_epoch + run.initial_step
    if resumed_steps:
        recorded = checkpointing.read_history(run.backup_dir, run.initial_epoch, run.steps_per_epoch, run.initial_step)
        run.history.resume(recorded.get("weighting"), resumed_steps)
    run.backup = checkpointing.EpochBackup(run.backup_dir, epoch_logs=recorded.get("epoch_logs"),
                                           weighting_history=run.history)
    # The guard comes first: it raises before a diverged epoch is backed up. The backup comes after every callback
    # that changes the training state at an epoch's end (DWA's weights from the epoch's losses; an architecture's
    # schedule, e.g. LTB's branching temperature): a run resumed from it goes on as the uninterrupted run did.
    callbacks = [checkpointing.DivergenceGuard(run.backup_dir), run.history, WeightingEpochCallback(run.weighting)]
    callbacks += list(getattr(run.model, "training_callbacks", lambda epochs: [])(run.epochs))
    callbacks.append(run.backup)
    if run.chief:
        os.makedirs(os.path.join(run.out, "checkpoints"), exist_ok=True)
        callbacks.append(checkpointing.LastWeights(os.path.join(run.out, "checkpoints", "last.weights.h5")))
        if run.use_tf_data:  # Keras' TensorBoard callback writes with tf.summary
            callbacks.append(ResumableTensorBoard(os.path.join(run.out, "logs"),
                                                  initial_step=resumed_steps,
                                                  update_freq=max(run.steps_per_epoch // 4, 1)))
    # Last: at an epoch's end it stops only after the other callbacks (the epoch's backup among them) have run.
    point = (run.initial_epoch, run.initial_step, run.metric_states)
    if run.num_workers > 1 and keras.config.backend() == "tensorflow":  # all workers stop at one step: TF's handler
        run.preemption = checkpointing.WorkerPreemptionGuard(run.backup, run.steps_per_epoch,
                                                             run.strategy.cluster_resolver, *point)
    elif run.num_workers > 1:  # JAX's processes: its coordination service's preemption sync point
        run.preemption = checkpointing.JaxProcessPreemptionGuard(run.backup, run.steps_per_epoch, *point)
    else:
        run.preemption = checkpointing.PreemptionGuard(run.backup, run.steps_per_epoch, *point)
    callbacks.append(run.preemption)
    return callbacks


def fit(run, callbacks=(), verbose=None):
    """Trains from the restored epoch to the planned one, with the run's callbacks and ``callbacks``. ``verbose``
    None: Keras' progress bar on a terminal (or in a notebook), else one log line per epoch (``EpochLogLine``: a log
    written to a file gets no bar redrawn at every step); a number: Keras' own ``verbose`` (0: silent)."""
    callbacks = list(callbacks)
    if verbose is None:
        verbose = 1 if EpochLogLine.interactive() else 0
        if not verbose:
            callbacks.append(EpochLogLine(run.config.batch_size, run.weighting))
    fit_start = time.time()
    # shuffle=False: the datasets shuffle themselves, by (seed, epoch); Keras would reorder a PyDataset's batches.
    options = dict(callbacks=[*run.callbacks, *callbacks], verbose=verbose, shuffle=False)
    first_epoch, dataset = run.initial_epoch, run.train_ds
    with distribution.fit_scope(run.strategy), run.preemption or contextlib.nullcontext(), _lost_workers(run):
        if run.initial_step and first_epoch < run.epochs:
            # A mid-epoch resume: Keras' epochs all have steps_per_epoch steps, so the rest of this one is a fit of
            # its own, and the next epochs read on from a dataset that skips to their start.
            run.trainer.fit(dataset, epochs=first_epoch + 1, initial_epoch=first_epoch,
                            steps_per_epoch=run.steps_per_epoch - run.initial_step, **options)
            first_epoch += 1
            dataset = train_dataset(run, skip=first_epoch * run.steps_per_epoch)
        if first_epoch < run.epochs:
            run.trainer.fit(dataset, epochs=run.epochs, initial_epoch=first_epoch,
                            steps_per_epoch=run.steps_per_epoch, **options)
    run.fit_seconds = time.time() - fit_start
    return run


@contextlib.contextmanager
def _lost_workers(run):
    """Under several TensorFlow workers, a worker that dies (or stops answering) makes the others' next collective
    fail once the coordination service misses its heartbeats: the run stops in one line with the preemption's status
    (75: a scheduler restarts every worker, and they resume from their last backups) instead of a traceback."""
    if run.num_workers == 1 or keras.config.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError) as e:
        cause = " ".join(str(e).split("[type.googleapis")[0].split())
        cause = cause.split("Collective ops is aborted by: ")[-1][:300]
        message = (f"Training stopped: lost contact with the other workers ({type(e).__name__}: {cause}). The "
                   f"backups are kept: start every worker again to resume from the last one (exit status "
                   f"{checkpointing.PREEMPTED_EXIT_CODE}).")
        log.error("%s", message)
        raise checkpointing.Preempted(message) from None


def finish(run):
    """Removes the backups; on the chief, evaluates, draws, saves and exports the model and writes ``metrics.json``.
    Returns the results (a worker's: its weights digest)."""
    config = run.config
    digest = weights_digest(run.trainer)
    log.info("weights digest %s", digest)
    if not run.chief:
        checkpointing.remove_backups(run.backup_dir)
        return {"chief": False, "weights_digest": digest, "steps": int(run.total_steps)}
    # Evaluation, pictures and export use a copy outside the strategy: under MultiWorkerMirroredStrategy the
    # distributed model's predict gathers across workers, which only the chief runs here.
    model = _local_copy(run.model)
    trained = evaluate_model(model, run.val_ds, config.num_classes, run.tasks)
    final_weights = {k: float(keras.ops.convert_to_numpy(v)) for k, v in run.weighting.log_values().items()}
    plot_task_weights(dict(run.history.history), os.path.join(run.out, "task_weights.png"),
                      title=f"{config.weighting} weighting", xlabel="step")
    _save_samples(run, model, os.path.join(run.out, "samples"))
    with atomic_path(os.path.join(run.out, "model.keras")) as temporary:
        model.save(temporary)
    save_to_preset(model, os.path.join(run.out, "preset"), training_config=config, metrics=_to_jsonable(trained),
                   description=f"{config.model} trained by mtl_keras.experiment ({config.dataset}, "
                               f"{run.total_steps} steps, {config.weighting} weighting)", overwrite=True)
    if config.export:
        _export(run, model)
    results = _to_jsonable(_results(run, model, trained, final_weights, digest))
    write_json_atomically(os.path.join(run.out, "metrics.json"), results, indent=2, sort_keys=True)
    # Last: a run stopped before here (preempted, killed) finds its final backup and finishes again.
    checkpointing.remove_backups(run.backup_dir)
    return results


def _export(run, model):
    """The serving export of experiments/export.py (off TensorFlow: from model.keras in a TensorFlow child process)."""
    export_dir = os.path.join(run.out, "export")
    command = serving_export.export_command(run.out, export_dir, serving_export.default_instances(model))
    if not run.use_tf_data:
        log.warning("No SavedModel export: TensorFlow is not installed. model.keras is written; export it with %s",
                    command)
        return
    try:
        export_start = time.time()
        with platform.quiet_tensorflow_logs():
            info = serving_export.write_run_export(model, export_dir, keras_file=os.path.join(run.out, "model.keras"))
        log.info("serving export %s (%s) in %.1f s", export_dir, ", ".join(info["outputs"]), time.time() - export_start)
    except serving_export.ExportSubprocessError as e:
        log.warning("No SavedModel export: %s. model.keras is written; export it with %s", e, command)


def _results(run, model, trained, final_weights, digest):
    config, replicas = run.config, run.replicas
    resumed_steps = run.initial_epoch * run.steps_per_epoch + run.initial_step
    steps_run = run.total_steps - resumed_steps
    return dict(
        chief=True, model=config.model, dataset=config.dataset, tasks=list(run.tasks), weighting=config.weighting,
        strategy=distribution.strategy_name(run.strategy), backend=keras.config.backend(),
        jit_compile=bool(run.jit_compile), replicas=int(replicas), global_batch_size=int(config.batch_size),
        per_replica_batch_size=int(config.batch_size // replicas), precision=config.precision,
        parameters=int(model.count_params()), steps=int(run.total_steps), resumed_from_epoch=int(run.initial_epoch),
        resumed_from_step=int(resumed_steps),
        train_images_per_s=steps_run * config.batch_size / max(run.fit_seconds, 1e-9), fit_seconds=run.fit_seconds,
        wall_seconds=time.time() - run.started, weights_digest=digest, val=trained, val_untrained=run.untrained,
        final_task_weights=final_weights,
        train_history=run.backup.epoch_logs,  # every epoch, also those before a resume
        weighting_history=dict(run.history.history),  # the sigma^2 / weight points of task_weights.png
    )


def _save_samples(run, model, folder):
    os.makedirs(folder, exist_ok=True)
    count = run.config.num_sample_images
    classes = datasets.class_table(run.config.dataset, run.config.num_classes, run.data_dir)
    saved = 0
    for images, targets in run.val_ds:
        images = np.asarray(images)  # tf.data tensors: JAX and PyTorch take numpy
        predictions = model.predict_on_batch(images)
        for i in range(images.shape[0]):
            if saved >= count:
                return
            save_prediction_panel(os.path.join(folder, f"val_{saved:02d}.png"), images[i],
                                  {k: np.asarray(v)[i] for k, v in predictions.items()},
                                  {k: np.asarray(v)[i] for k, v in targets.items()}, palette=classes.colors,
                                  class_names=classes.names)
            saved += 1


def _local_copy(model):
    """The same architecture and weights, built outside any distribution strategy (call it outside the scope)."""
    clone = type(model).from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def weights_digest(model):
    """sha256 over all weights: identical weights in two processes give identical digests."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def _to_jsonable(value):
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_run(run_dir):
    """The inference model of a run folder: its ``preset/`` (or ``model.keras``) once finished, else its
    ``config.json`` model with the last epoch's ``checkpoints/last.weights.h5``."""
    run_dir = os.fspath(run_dir)
    if os.path.isdir(os.path.join(run_dir, "preset")) or os.path.isfile(os.path.join(run_dir, "model.keras")):
        return load_model(run_dir)
    config_file = os.path.join(run_dir, "config.json")
    checkpoint = os.path.join(run_dir, "checkpoints", "last.weights.h5")
    if not (os.path.isfile(config_file) and os.path.isfile(checkpoint)):
        raise FileNotFoundError(f"{run_dir} holds neither preset/, model.keras nor config.json + "
                                f"checkpoints/last.weights.h5.")
    settings = read_json(config_file)  # its errors name the file
    try:
        config = TrainConfig.from_dict(settings)
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None
    tasks = validate_tasks(config.tasks)
    model = build_model(config.model, tasks=tasks, num_classes=config.num_classes,
                        input_shape=(*[int(v) for v in config.image_size], 3), **dict(config.model_overrides))
    MultiTaskTrainer(model, build_loss_weighting(config, tasks)).load_weights(checkpoint)
    return model

