"""Publishing a finished run as a named model (``experiments/train.py --publish NAME``): its inference model's
weights file and a named preset (``models/NAME.json`` in a checkout, else the user's preset folder) that names the
file with its sha256, the run's metrics and training config. ``mtl_keras.load_model(NAME)`` then rebuilds it."""

import datetime
import os
import re

from mtl_keras.config import read_json
from mtl_keras.labels import class_names, instance_train_ids
from mtl_keras.presets import (PRESET_FORMAT_VERSION, _is_checkout, builtin_presets_dir, default_weights_dir,
                               file_sha256, get_preset, load_model, log, save_weights_file, user_presets_dir,
                               write_preset)
from mtl_keras.registry import is_model


def publish_targets(name, weights_dir=None, presets_dir=None, overwrite=False):
    """``(preset_path, weights_path)`` that :func:`publish_run` would write for ``name``; checks the name and that
    nothing would be replaced (unless ``overwrite``). ``experiments/train.py --publish`` calls it before training, so
    a bad name fails in seconds, not after the run."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name or ""):
        raise ValueError(f"Model name {name!r}: use letters, digits and underscores.")
    if is_model(name):
        raise ValueError(f"{name!r} is a registered architecture; its preset describes the architecture. Publish "
                         f"trained weights under another name, e.g. {name}_<dataset>.")
    weights_dir = os.fspath(weights_dir) if weights_dir is not None else default_weights_dir()
    if presets_dir is None:
        builtin = builtin_presets_dir()
        presets_dir = builtin if _is_checkout(builtin) else user_presets_dir()
    preset_path = os.path.join(os.fspath(presets_dir), f"{name}.json")
    weights_path = os.path.join(weights_dir, f"{name}.weights.h5")
    for path in (preset_path, weights_path):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (train.py: --publish_overwrite) to replace it.")
    return preset_path, weights_path


def publish_run(run_dir, name, weights_dir=None, presets_dir=None, description=None, overwrite=False):
    """Turns a training output folder into a named model: a weights file and a preset that names it.

    Writes ``weights_dir/NAME.weights.h5`` (the inference model's weights; default folder
    :func:`default_weights_dir`) and ``presets_dir/NAME.json`` (default: ``models/`` of a source checkout, to be
    committed; with an installed package, :func:`user_presets_dir`) with the architecture and its full arguments, the weights file's name, sha256 and size, the
    run's validation metrics (``metrics.json``), its training config and the input/class conventions of the
    architecture's preset. Afterwards ``load_model(NAME)`` rebuilds the trained model (put the weights file in a
    weights folder on other machines). Refuses to replace an existing preset or weights file unless ``overwrite``.
    Returns the preset's path.
    """
    run_dir = os.fspath(run_dir)
    preset_path, weights_path = publish_targets(name, weights_dir, presets_dir, overwrite)
    weights_dir, presets_dir = os.path.dirname(weights_path), os.path.dirname(preset_path)
    model = load_model(run_dir)
    config = _read_json(os.path.join(run_dir, "config.json"))
    metrics = _read_json(os.path.join(run_dir, "metrics.json"))
    architecture = (config or {}).get("model") or (metrics or {}).get("model")
    if not architecture or not is_model(architecture):
        raise ValueError(f"{run_dir}: cannot tell the registered architecture (config.json 'model' is "
                         f"{architecture!r}).")
    arguments = {k: v for k, v in model.get_config().items() if k not in ("name", "trainable", "dtype")}

    os.makedirs(weights_dir, exist_ok=True)
    save_weights_file(model, weights_path)  # whole or not at all (and HDF5 never meets a full disk)
    digest = file_sha256(weights_path)
    size = os.path.getsize(weights_path)

    base = {}
    try:
        base = get_preset(architecture)
    except ValueError:
        pass
    preset = {
        "format_version": PRESET_FORMAT_VERSION,
        "name": name,
        "architecture": architecture,
        "description": description or f"{architecture} trained by experiments/train.py "
                                      f"({(config or {}).get('dataset', 'unknown dataset')}), published from "
                                      f"{os.path.basename(os.path.abspath(run_dir))}.",
        "paper": base.get("paper"),
        "arguments": arguments,
        "parameters": int(model.count_params()),
        "input": base.get("input"),
        "classes": _classes_for(base.get("classes"), arguments.get("num_classes")),
        "training": config,
        "backbone": base.get("backbone"),
        "weights": {"file": os.path.basename(weights_path), "sha256": digest, "bytes": size,
                    "format": "keras .weights.h5 of the inference model"},
        "metrics": (metrics or {}).get("val"),
        "source": {"run_dir": os.path.basename(os.path.abspath(run_dir)),
                   "published": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "untrained_metrics": (metrics or {}).get("val_untrained"),
                   "steps": (metrics or {}).get("steps"),
                   "weighting": (metrics or {}).get("weighting"),
                   "final_task_weights": (metrics or {}).get("final_task_weights")},
    }
    path = write_preset(preset, presets_dir)
    log.info("Published %s: %s (sha256 %s) and %s.", name, weights_path, digest, path)
    return path


def _classes_for(base_classes, num_classes):
    if base_classes and len(base_classes.get("names", [])) == num_classes:
        return base_classes
    try:
        return {"dataset": "cityscapes", "label_set": "train_ids", "names": class_names(num_classes),
                "instance_classes": instance_train_ids(num_classes), "ignore_label": 255}
    except ValueError:
        return {"names": None, "num_classes": num_classes}


def _read_json(path):
    if not os.path.isfile(path):
        return None
    return read_json(path)

