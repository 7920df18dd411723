"""One training run from a ``TrainConfig``: data, model, weighting, ``fit``, evaluation, pictures and export.

``experiments/train.py`` is the command-line face of ``run_training``. The output folder holds:
``config.json``, ``checkpoints/last.weights.h5`` (trainer weights, each epoch), ``backup/`` (resume state while a
run is unfinished: see mtl_keras/checkpointing.py), ``logs/`` (TensorBoard: per-task losses, each sigma^2 and effective weight), ``metrics.json``,
``task_weights.png``, ``samples/*.png``, ``model.keras`` (the inference model), ``preset/`` (the same model as a preset
folder with its training config and metrics: ``mtl_keras.from_preset``) and ``export/`` (the serving SavedModel).
"""

import hashlib
import json
import logging
import os
import tempfile
import time

import keras
import numpy as np

from mtl_keras import checkpointing, distribution, platform
from mtl_keras.config import TrainConfig
from mtl_keras.presets import save_to_preset
from mtl_keras.registry import build_model
from mtl_keras.tasks import validate_tasks
from mtl_keras.training import MultiTaskTrainer, ResumableTensorBoard, WeightingHistory, kendall_sgd
from mtl_keras.weighting import WeightingEpochCallback, build_weighting

log = logging.getLogger("mtl_keras")

DEFAULT_SYNTHETIC_DIR = os.path.join("data", "synthetic")


def resolve_data_dir(config):
    """The folder to read; for ``synthetic``, generated (once) when absent."""
    from mtl_keras.data.datasets import dataset_entry

    dataset_entry(config.dataset)  # validates the name
    if config.dataset == "synthetic":
        from mtl_keras.data import generate_synthetic_cityscapes

        data_dir = config.data_dir or DEFAULT_SYNTHETIC_DIR
        if config.data_dir and os.path.isfile(os.path.join(data_dir, "synthetic_manifest.json")):
            return data_dir  # a set generated earlier (any size): use it as it is
        # The data seed is fixed: every run, whatever its training seed, sees the same synthetic set.
        return generate_synthetic_cityscapes(data_dir, num_train=config.synthetic_num_train,
                                             num_val=config.synthetic_num_val, seed=0)
    if not config.data_dir:
        raise ValueError(f"--data_dir is required with --dataset {config.dataset}.")
    if not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f"--data_dir {config.data_dir!r} is not a folder (expected the root of the "
                                f"{config.dataset} dataset; see datasets/{config.dataset}.md).")
    return config.data_dir


def build_optimizer(config, total_steps):
    if config.optimizer == "sgd":
        return kendall_sgd(config.learning_rate, total_steps, power=config.lr_power, momentum=config.momentum,
                           weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        schedule = keras.optimizers.schedules.PolynomialDecay(
            config.learning_rate, decay_steps=max(total_steps, 1), end_learning_rate=0.0, power=config.lr_power)
        return keras.optimizers.Adam(schedule)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}. Valid: adam, sgd.")


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


def plan_steps(config, num_train_images):
    """(epochs, steps_per_epoch) with ``epochs * steps_per_epoch == --steps`` exactly when --steps is given.

    An epoch is at most one pass over the training split: the largest divisor of --steps that fits.
    """
    batches_per_pass = max(num_train_images // config.batch_size, 1)
    if config.steps > 0:
        steps_per_epoch = max(d for d in range(1, min(config.steps, batches_per_pass) + 1) if config.steps % d == 0)
        return config.steps // steps_per_epoch, steps_per_epoch
    return (config.epochs or 10), batches_per_pass


AUTO_CACHE_BYTES = 2 * 1024 ** 3


def cache_training_examples(config, num_train_images, height, width):
    """Whether the decoded training examples are kept in memory (``--cache``): decoding four PNGs per image takes a
    core's worth of time at the default job's speed. ``auto``: when they take less than ``AUTO_CACHE_BYTES``, at
    about 20 bytes per pixel (the float32 image and the targets)."""
    if config.cache == "auto":
        return num_train_images * height * width * 20 < AUTO_CACHE_BYTES
    return config.cache == "memory"


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


# Settings that may change when an interrupted run is started again: where things are written or read, how much is
# evaluated, and how the same computation is placed (another machine may resume with another strategy).
RESUME_MAY_CHANGE = ("output_dir", "data_dir", "backbone_weights", "val_batches", "num_sample_images", "export",
                     "strategy", "cpu_replicas", "jit_compile", "deterministic", "overwrite")

# What a finished run leaves in its folder: removed when --overwrite replaces it, as its training starts.
RUN_OUTPUTS = ("metrics.json", "metrics_untrained.json", "task_weights.png", "model.keras", "preset", "samples", "eval",
               "export", "logs", "checkpoints")


def check_output_dir(config, out):
    """Refuses, before anything is written, an output folder that is a file or holds a finished run.

    A finished run (``metrics.json`` there, no backups) is replaced only with ``--overwrite``; an unfinished one is
    resumed (:func:`check_resumable`). Returns True when a finished run is there (to be replaced).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out} is a file; expected a folder for the run (new or to resume).")
    metrics = os.path.join(out, "metrics.json")
    finished = os.path.isfile(metrics) and not checkpointing.read_state(os.path.join(out, "backup")).get("backups")
    if finished and not config.overwrite:
        raise ValueError(f"--output_dir {out} holds a finished run ({metrics}); choose another --output_dir, or pass "
                         f"--overwrite to replace it.")
    return finished


def clear_finished_run(out):
    """Removes a finished run's outputs (:data:`RUN_OUTPUTS`) so that none of them is mistaken for the new run's."""
    import shutil

    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _backbone_weights_argument(config, backup_dir):
    """``{"backbone_weights": ...}`` for a run that starts from ImageNet weights; ``{}`` otherwise, and when the run
    resumes (its backups hold the weights; the file may have moved since)."""
    weights = config.backbone_weights
    if not weights or checkpointing.read_state(backup_dir).get("backups"):
        return {}
    if weights != "imagenet" and not os.path.isfile(os.path.expanduser(weights)):
        raise ValueError(f"--backbone_weights {weights}: no such file (expected 'imagenet' or a keras.applications "
                         f"ResNet50/101 .h5 file).")
    return {"backbone_weights": weights if weights == "imagenet" else os.path.expanduser(weights)}


def check_resumable(config, out, backup_dir):
    """Refuses to resume the backups in ``out`` under other training settings than those they were made with.

    A run started again in the same output folder resumes from its backups; with another learning rate, model or
    weighting it would silently continue a different run (or fail to load with an obscure error). Raises a
    ``ValueError`` that lists the differing settings; nothing is loaded or overwritten.
    """
    saved_path = os.path.join(out, "config.json")
    if not checkpointing.read_state(backup_dir).get("backups") or not os.path.exists(saved_path):
        return
    try:
        with open(saved_path) as f:
            saved = json.load(f)
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


def _worker_dir(config):
    """Where a non-chief worker keeps its own backups: outside the shared output folder, stable across restarts."""
    task_type, index, _ = distribution.task_info()
    key = hashlib.sha256(os.path.abspath(config.output_dir).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mtl_keras_{key}_{task_type}{index}")


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


def run_training(config: TrainConfig, verbose=1):
    """Trains, evaluates and exports; returns the dict written to ``metrics.json``.

    Under ``multi_worker`` only the chief writes the output folder; other workers train in lockstep and keep their
    own backups in a temporary folder. A run started again with the same output folder resumes after its last
    completed epoch, on the same data order, and ends with the same weights as an uninterrupted run.
    """
    previous_policy = keras.mixed_precision.global_policy().name
    try:
        if config.precision != "float32":
            keras.mixed_precision.set_global_policy(config.precision)
        return _run_training(config, verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _run_training(config, verbose):
    from mtl_keras.data.datasets import count_examples, load_dataset
    from mtl_keras.evaluation import evaluate_model
    from mtl_keras.visualize import plot_task_weights, save_prediction_panel

    start = time.time()
    if config.deterministic:
        distribution.enable_determinism()
    strategy = distribution.create_strategy(config.strategy, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"--batch_size {config.batch_size} (global) must be divisible by the {replicas} replicas.")
    _, _, num_workers = distribution.task_info()
    chief = distribution.is_chief()
    tasks = validate_tasks(config.tasks)
    height, width = (int(v) for v in config.image_size)
    out = config.output_dir if chief else _worker_dir(config)
    backup_dir = os.path.join(out, "backup")
    # Nothing in the output folder is touched until training starts: a run that fails on its data, model or
    # settings leaves an existing run there as it was.
    replaces_finished_run = check_output_dir(config, out) if chief else False
    if chief:
        check_resumable(config, out, backup_dir)
    backbone_weights = _backbone_weights_argument(config, backup_dir)  # a missing file fails before any work
    keras.utils.set_random_seed(config.seed)

    data_dir = resolve_data_dir(config)
    num_train = count_examples(config.dataset, data_dir, "train")
    epochs, steps_per_epoch = plan_steps(config, num_train)
    total_steps = epochs * steps_per_epoch
    data_kwargs = dict(image_size=(height, width), num_classes=config.num_classes, tasks=tasks, seed=config.seed)
    if config.depth_target:
        data_kwargs["depth_target"] = config.depth_target
    augment = {}
    if tuple(config.scale_range) != (1.0, 1.0):
        augment["scale_range"] = tuple(config.scale_range)
    if config.crop_size:
        augment["crop_size"] = tuple(config.crop_size)
    use_tf_data = platform.tensorflow_available()
    train_cache = {"cache": True} if use_tf_data and cache_training_examples(config, num_train, height, width) else {}
    if use_tf_data:
        val_ds = load_dataset(config.dataset, data_dir, "val", batch_size=config.batch_size, shuffle=False,
                              flip=False, **data_kwargs)
        if config.val_batches:
            val_ds = val_ds.take(config.val_batches)
    else:
        val_ds = _numpy_dataset(config, data_dir, "val", augment, data_kwargs, max_batches=config.val_batches)

    jit_compile = backend_default_jit(config.jit_compile)
    if jit_compile and replicas > 1 and keras.config.backend() == "tensorflow":
        log.warning("--jit_compile is off under %d replicas (XLA fails with add_loss across devices).", replicas)
        jit_compile = False
    with strategy.scope():
        # Training crops of another size than the evaluation images: a model that takes any image size.
        crop = tuple(config.crop_size)
        input_shape = (height, width, 3) if not crop or crop == (height, width) else (None, None, 3)
        model = build_model(config.model, tasks=tasks, num_classes=config.num_classes, input_shape=input_shape,
                            **dict(config.model_overrides), **backbone_weights)
        if config.sync_batchnorm and replicas > 1:
            # Without it each replica keeps its own moving statistics: workers would end with different weights.
            distribution.set_synchronized_batchnorm(model)
        weighting = build_loss_weighting(config, tasks)
        samples = getattr(getattr(weighting, "method", None), "gradient_samples", 1)
        if samples > 1 and config.batch_size // replicas < samples:
            raise ValueError(f"--weighting {config.weighting} cuts each replica's batch into {samples} gradient samples: "
                             f"--batch_size must give each of the {replicas} replica(s) at least {samples} images "
                             f"(now {config.batch_size // replicas}).")
        if samples > 1 and replicas > 1 and (config.batch_size // replicas) % samples:
            log.warning("--weighting %s cuts each replica's batch into %d gradient samples: with %d per replica "
                        "(not a multiple of %d) the parts differ from the one-device parts of the global batch.",
                        config.weighting, samples, config.batch_size // replicas, samples)
        trainer = MultiTaskTrainer(model, weighting, jacobian_mode=config.jacobian_mode)
        trainer.compile(optimizer=build_optimizer(config, total_steps), jit_compile=jit_compile)
        initial_epoch = checkpointing.restore(trainer, backup_dir)
    # Training starts: the folder becomes this run's.
    os.makedirs(out, exist_ok=True)
    if chief:
        if replaces_finished_run:
            clear_finished_run(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(config.to_json())
    log.info("model %s: %d parameters; %d epochs x %d steps; global batch %d = %d replica(s) x %d%s; %s", config.model,
             model.count_params(), epochs, steps_per_epoch, config.batch_size, replicas, config.batch_size // replicas,
             f" over {num_workers} workers" if num_workers > 1 else "", config.precision)

    # Resumed runs skip the batches already seen, so the data order equals an uninterrupted run's.
    skip = initial_epoch * steps_per_epoch
    if num_workers > 1:
        # Each worker reads its own shard of the files (no example is seen twice in a step) at its per-replica
        # batch size.
        def dataset_fn(context):
            per_replica = context.get_per_replica_batch_size(config.batch_size)
            return load_dataset(config.dataset, data_dir, "train", batch_size=per_replica, flip=config.flip,
                                repeat=True, input_context=context, **train_cache, **augment,
                                **data_kwargs).skip(skip)

        train_ds = strategy.distribute_datasets_from_function(dataset_fn)
    elif use_tf_data:  # Keras splits each global batch over the local replicas
        train_ds = load_dataset(config.dataset, data_dir, "train", batch_size=config.batch_size, flip=config.flip,
                                repeat=True, **train_cache, **augment, **data_kwargs).skip(skip)
    else:  # no TensorFlow: the numpy loader, resumed by its epoch number
        train_ds = _numpy_dataset(config, data_dir, "train", augment, data_kwargs, steps_per_epoch=steps_per_epoch,
                                  initial_epoch=initial_epoch)

    untrained_path = os.path.join(out, "metrics_untrained.json")
    if chief and initial_epoch == 0:
        untrained = evaluate_model(_local_copy(model), val_ds, config.num_classes, tasks)
        with open(untrained_path, "w") as f:
            json.dump(_to_jsonable(untrained), f)
    elif chief:
        with open(untrained_path) as f:
            untrained = json.load(f)

    # About 500 points for the sigma^2 plot: reading the loss weights syncs with the device, so not every step.
    history_cb = WeightingHistory(weighting, every=max(total_steps // 500, 1))
    # A resumed run continues its record from the backup's: the sigma^2 plot and train_history start at step 0.
    recorded = checkpointing.read_history(backup_dir, initial_epoch, steps_per_epoch) if initial_epoch else {}
    if initial_epoch:
        history_cb.resume(recorded.get("weighting"), initial_epoch * steps_per_epoch)
    backup_cb = checkpointing.EpochBackup(backup_dir, epoch_logs=recorded.get("epoch_logs"),
                                          weighting_history=history_cb)
    callbacks = [checkpointing.DivergenceGuard(backup_dir), backup_cb, history_cb, WeightingEpochCallback(weighting)]
    if chief:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        callbacks += [
            keras.callbacks.ModelCheckpoint(os.path.join(out, "checkpoints", "last.weights.h5"),
                                            save_weights_only=True),
        ]
        if use_tf_data:  # Keras' TensorBoard callback writes with tf.summary
            callbacks.append(ResumableTensorBoard(os.path.join(out, "logs"),
                                                  initial_step=initial_epoch * steps_per_epoch,
                                                  update_freq=max(steps_per_epoch // 4, 1)))
    fit_start = time.time()
    with distribution.fit_scope(strategy):
        # shuffle=False: the datasets shuffle themselves, by (seed, epoch); Keras would reorder a PyDataset's batches.
        trainer.fit(train_ds, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                              callbacks=callbacks, verbose=verbose, shuffle=False)
    fit_seconds = time.time() - fit_start
    checkpointing.remove_backups(backup_dir)
    digest = weights_digest(trainer)
    steps_run = (epochs - initial_epoch) * steps_per_epoch
    log.info("weights digest %s", digest)
    if not chief:
        return {"chief": False, "weights_digest": digest, "steps": int(total_steps)}

    # Evaluation, pictures and export use a copy outside the strategy: under MultiWorkerMirroredStrategy the
    # distributed model's predict gathers across workers, which only the chief runs here.
    model = _local_copy(model)
    trained = evaluate_model(model, val_ds, config.num_classes, tasks)
    final_weights = {k: float(keras.ops.convert_to_numpy(v)) for k, v in weighting.log_values().items()}
    plot_task_weights(dict(history_cb.history),
                      os.path.join(out, "task_weights.png"), title=f"{config.weighting} weighting", xlabel="step")
    _save_samples(model, val_ds, os.path.join(out, "samples"), config, save_prediction_panel)

    model.save(os.path.join(out, "model.keras"))
    # The run as a preset folder (mtl_keras.from_preset(RUN/preset)): config, weights with sha256, the training
    # config and the validation metrics, to share or publish.
    save_to_preset(model, os.path.join(out, "preset"), training_config=config, metrics=_to_jsonable(trained),
                   description=f"{config.model} trained by mtl_keras.experiment ({config.dataset}, "
                               f"{total_steps} steps, {config.weighting} weighting)", overwrite=True)
    if config.export:
        # The serving export of experiments/export.py (any size, uint8 / float32, named outputs, instance ids when
        # the model has semantic + instance). JAX and PyTorch cannot run TensorFlow ops on the model: it is written
        # from model.keras in a child process with KERAS_BACKEND=tensorflow.
        from mtl_keras import export as serving_export

        export_dir = os.path.join(out, "export")
        command = serving_export.export_command(out, export_dir, serving_export.default_instances(model))
        if not use_tf_data:
            log.warning("No SavedModel export: TensorFlow is not installed. model.keras is written; export it with "
                        "%s", command)
        else:
            try:
                export_start = time.time()
                with platform.quiet_tensorflow_logs():
                    info = serving_export.write_run_export(model, export_dir,
                                                           keras_file=os.path.join(out, "model.keras"))
                log.info("serving export %s (%s) in %.1f s", export_dir, ", ".join(info["outputs"]),
                         time.time() - export_start)
            except serving_export.ExportSubprocessError as e:
                log.warning("No SavedModel export: %s. model.keras is written; export it with %s", e, command)

    results = {
        "chief": True,
        "model": config.model,
        "dataset": config.dataset,
        "tasks": list(tasks),
        "weighting": config.weighting,
        "strategy": distribution.strategy_name(strategy),
        "backend": keras.config.backend(),
        "jit_compile": bool(jit_compile),
        "replicas": int(replicas),
        "global_batch_size": int(config.batch_size),
        "per_replica_batch_size": int(config.batch_size // replicas),
        "precision": config.precision,
        "parameters": int(model.count_params()),
        "steps": int(total_steps),
        "resumed_from_epoch": int(initial_epoch),
        "train_images_per_s": steps_run * config.batch_size / fit_seconds,
        "fit_seconds": fit_seconds,
        "wall_seconds": time.time() - start,
        "weights_digest": digest,
        "val": trained,
        "val_untrained": untrained,
        "final_task_weights": final_weights,
        "train_history": backup_cb.epoch_logs,  # every epoch, also those before a resume
        "weighting_history": dict(history_cb.history),  # the sigma^2 / weight points of task_weights.png
    }
    results = _to_jsonable(results)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return results


def backend_default_jit(jit_compile):
    """``--jit_compile`` or, when not given (None), the backend's faster default: XLA on JAX; off on TensorFlow (its
    XLA is 1.6 to 4.2x slower for these models on CPU, benchmarks/README.md) and PyTorch (torch.compile)."""
    if jit_compile is None:
        return keras.config.backend() == "jax"
    return bool(jit_compile)


def _numpy_dataset(config, data_dir, split, augment, data_kwargs, max_batches=0, **kwargs):
    """The TensorFlow-free loader (``mtl_keras.data.numpy_loader``), for the CityScapes-layout datasets."""
    from mtl_keras.data.numpy_loader import CityscapesPyDataset

    if config.dataset not in ("synthetic", "cityscapes") or augment or data_kwargs.get("depth_target",
                                                                                     "inverse") != "inverse":
        raise ValueError(f"Without TensorFlow, only --dataset synthetic or cityscapes with inverse depth and no "
                         f"--scale_range / --crop_size can be read (got --dataset {config.dataset}); install "
                         f"tensorflow for the tf.data pipelines.")
    kwargs.update({k: v for k, v in data_kwargs.items() if k != "depth_target"})
    if split == "train":
        kwargs.update(flip=config.flip, shuffle=True)
    else:
        kwargs.update(flip=False, shuffle=False)
    dataset = CityscapesPyDataset(data_dir, split, batch_size=config.batch_size, **kwargs)
    if max_batches:
        return [dataset[i] for i in range(min(max_batches, len(dataset)))]
    return dataset


def _save_samples(model, dataset, folder, config, save_panel):
    from mtl_keras.data import class_colors, class_names

    os.makedirs(folder, exist_ok=True)
    palette = class_colors(config.num_classes)
    names = class_names(config.num_classes)  # the legend: CityScapes (7, 19) or NYUv2 (13, 40) names
    saved = 0
    for images, targets in dataset:
        images = np.asarray(images)  # tf.data tensors: JAX and PyTorch take numpy
        predictions = model.predict_on_batch(images)
        for i in range(images.shape[0]):
            if saved >= config.num_sample_images:
                return
            save_panel(os.path.join(folder, f"val_{saved:02d}.png"), images[i],
                       {k: np.asarray(v)[i] for k, v in predictions.items()},
                       {k: np.asarray(v)[i] for k, v in targets.items()}, palette=palette, class_names=names)
            saved += 1
