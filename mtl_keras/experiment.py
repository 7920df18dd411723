"""One training run from a ``TrainConfig``: data, model, weighting, ``fit``, evaluation, pictures and export.

``experiments/train.py`` is the command-line face of ``run_training``. The output folder holds:
``config.json``, ``checkpoints/last.weights.h5`` (trainer weights, each epoch), ``backup/`` (resume state while a
run is unfinished), ``logs/`` (TensorBoard: per-task losses, each sigma^2 and effective weight), ``metrics.json``,
``task_weights.png``, ``samples/*.png``, ``model.keras`` (the inference model) and ``export/`` (SavedModel).
"""

import json
import logging
import math
import os
import time

import keras
import numpy as np

from mtl_keras.config import TrainConfig
from mtl_keras.registry import build_model
from mtl_keras.tasks import validate_tasks
from mtl_keras.training import MultiTaskTrainer, WeightingHistory, kendall_sgd
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
    return build_weighting(config.weighting, tasks, **kwargs)


def plan_steps(config, num_train_images):
    """(epochs, steps_per_epoch) with ``epochs * steps_per_epoch == --steps`` exactly when --steps is given.

    An epoch is at most one pass over the training split: the largest divisor of --steps that fits.
    """
    batches_per_pass = max(num_train_images // config.batch_size, 1)
    if config.steps > 0:
        steps_per_epoch = max(d for d in range(1, min(config.steps, batches_per_pass) + 1) if config.steps % d == 0)
        return config.steps // steps_per_epoch, steps_per_epoch
    return (config.epochs or 10), batches_per_pass


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


def run_training(config: TrainConfig, verbose=1):
    """Trains, evaluates and exports; returns the dict written to ``metrics.json``."""
    from mtl_keras.data.datasets import count_examples, load_dataset
    from mtl_keras.evaluation import evaluate_model
    from mtl_keras.visualize import plot_task_weights, save_prediction_panel

    start = time.time()
    tasks = validate_tasks(config.tasks)
    height, width = (int(v) for v in config.image_size)
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config.to_json())
    keras.utils.set_random_seed(config.seed)

    data_dir = resolve_data_dir(config)
    num_train = count_examples(config.dataset, data_dir, "train")
    epochs, steps_per_epoch = plan_steps(config, num_train)
    total_steps = epochs * steps_per_epoch
    data_kwargs = dict(image_size=(height, width), batch_size=config.batch_size, num_classes=config.num_classes,
                       tasks=tasks, seed=config.seed)
    augment = {}
    if tuple(config.scale_range) != (1.0, 1.0):
        augment["scale_range"] = tuple(config.scale_range)
    if config.crop_size:
        augment["crop_size"] = tuple(config.crop_size)
    train_ds = load_dataset(config.dataset, data_dir, "train", flip=config.flip, repeat=True, **augment,
                            **data_kwargs)
    val_ds = load_dataset(config.dataset, data_dir, "val", shuffle=False, flip=False, **data_kwargs)
    if config.val_batches:
        val_ds = val_ds.take(config.val_batches)

    model = build_model(config.model, tasks=tasks, num_classes=config.num_classes, input_shape=(height, width, 3),
                        **dict(config.model_overrides))
    weighting = build_loss_weighting(config, tasks)
    trainer = MultiTaskTrainer(model, weighting)
    trainer.compile(optimizer=build_optimizer(config, total_steps), jit_compile=config.jit_compile)
    log.info("model %s: %d parameters; %d epochs x %d steps of batch %d (%d images)", config.model,
             model.count_params(), epochs, steps_per_epoch, config.batch_size, total_steps * config.batch_size)

    untrained = evaluate_model(model, val_ds, config.num_classes, tasks)

    history_cb = WeightingHistory(weighting)
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(out, "checkpoints", "last.weights.h5"),
                                        save_weights_only=True),
        keras.callbacks.TensorBoard(os.path.join(out, "logs"), update_freq=max(steps_per_epoch // 4, 1)),
        history_cb,
        WeightingEpochCallback(weighting),
    ]
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    fit_start = time.time()
    history = trainer.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                          verbose=verbose)
    fit_seconds = time.time() - fit_start

    trained = evaluate_model(model, val_ds, config.num_classes, tasks)
    final_weights = {k: float(keras.ops.convert_to_numpy(v)) for k, v in weighting.log_values().items()}
    plot_task_weights({k: v for k, v in history_cb.history.items() if k != "step"},
                      os.path.join(out, "task_weights.png"), title=f"{config.weighting} weighting", xlabel="step")
    _save_samples(model, val_ds, os.path.join(out, "samples"), config, save_prediction_panel)

    model.save(os.path.join(out, "model.keras"))
    if config.export:
        model.export(os.path.join(out, "export"), format="tf_saved_model", verbose=False)

    results = {
        "model": config.model,
        "dataset": config.dataset,
        "tasks": list(tasks),
        "weighting": config.weighting,
        "parameters": int(model.count_params()),
        "steps": int(total_steps),
        "train_images_per_s": total_steps * config.batch_size / fit_seconds,
        "fit_seconds": fit_seconds,
        "wall_seconds": time.time() - start,
        "val": trained,
        "val_untrained": untrained,
        "final_task_weights": final_weights,
        "train_history": {k: v for k, v in history.history.items()},
    }
    results = _to_jsonable(results)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return results


def _save_samples(model, dataset, folder, config, save_panel):
    from mtl_keras.data import class_colors

    os.makedirs(folder, exist_ok=True)
    palette = class_colors(config.num_classes)
    saved = 0
    for images, targets in dataset:
        predictions = model.predict_on_batch(images)
        images = np.asarray(images)
        for i in range(images.shape[0]):
            if saved >= config.num_sample_images:
                return
            save_panel(os.path.join(folder, f"val_{saved:02d}.png"), images[i],
                       {k: np.asarray(v)[i] for k, v in predictions.items()},
                       {k: np.asarray(v)[i] for k, v in targets.items()}, palette=palette)
            saved += 1
