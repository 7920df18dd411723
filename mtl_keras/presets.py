"""Preset folders, the keras-hub way: ``model.save_to_preset(DIR)`` and ``mtl_keras.from_preset(NAME_or_DIR)``.

A preset folder holds everything needed to rebuild a model in another process, on any backend:

=====================  ============================================================================================
``config.json``        ``keras.saving.serialize_keras_object(model)``: class, registered name and full config
``model.weights.h5``   the weights (``model.save_weights``)
``metadata.json``      format version; mtl_keras / Keras versions and backend that wrote it; class, architecture,
                       parameter count, tasks, classes, input size and ``size_multiple``; the weights file's name,
                       sha256 and size; and, when given, the training config, metrics and a description
=====================  ============================================================================================

:func:`from_preset` reads such a folder (checking the sha256 before loading anything; ``safe_mode`` on, so a config
that would run arbitrary code is refused) or, given a name, the zoo's named presets (``models/NAME.json``, see
``mtl_keras.zoo``: every registered architecture and every published model). ``save_to_preset`` refuses to write into
a folder that holds something (``overwrite=True`` replaces it, atomically: a failure leaves the old preset).
"""

import datetime
import json
import os
import shutil
import tempfile

from mtl_keras.config import read_json

PRESET_FOLDER_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"


def is_preset_dir(path):
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(
        os.path.join(path, METADATA_FILE))


def save_to_preset(model, preset_dir, training_config=None, metrics=None, description=None, overwrite=False):
    """Writes ``model`` as a preset folder ``preset_dir`` (see the module docstring); returns its path.

    ``training_config``: a ``TrainConfig`` or dict; ``metrics``: a dict (e.g. a run's validation metrics).
    """
    import keras

    from mtl_keras import __version__
    from mtl_keras.pretrained import file_sha256

    preset_dir = os.path.abspath(os.fspath(preset_dir))
    if os.path.exists(preset_dir) and (not os.path.isdir(preset_dir) or os.listdir(preset_dir)) and not overwrite:
        raise FileExistsError(f"{preset_dir} exists and is not empty; pass overwrite=True to replace it.")
    if training_config is not None and not isinstance(training_config, dict):
        training_config = json.loads(training_config.to_json())
    parent = os.path.dirname(preset_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(preset_dir)}.")
    try:
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(keras.saving.serialize_keras_object(model), f, indent=2)
        weights_path = os.path.join(staging, WEIGHTS_FILE)
        model.save_weights(weights_path)
        config = model.get_config()
        metadata = {
            "format_version": PRESET_FOLDER_FORMAT,
            "mtl_keras_version": __version__,
            "keras_version": keras.__version__,
            "backend": keras.config.backend(),
            "class_name": type(model).__name__,
            "architecture": model.name,
            "description": description,
            "parameter_count": int(model.count_params()),
            "tasks": list(config.get("tasks", [])),
            "num_classes": config.get("num_classes"),
            "input_shape": list(model.input.shape[1:]),
            "size_multiple": int(getattr(model, "size_multiple", 1)),
            "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(weights_path),
                        "bytes": os.path.getsize(weights_path)},
            "training": training_config,
            "metrics": metrics,
            "saved": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        os.chmod(staging, 0o755)
        if os.path.isdir(preset_dir):
            old = preset_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(preset_dir, old)
            os.replace(staging, preset_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, preset_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return preset_dir


def read_preset_metadata(preset_dir):
    path = os.path.join(os.fspath(preset_dir), METADATA_FILE)
    metadata = read_json(path)
    if not isinstance(metadata, dict) or metadata.get("format_version", 0) > PRESET_FOLDER_FORMAT:
        raise ValueError(f"{path}: not an mtl_keras preset of format <= {PRESET_FOLDER_FORMAT} (a newer mtl_keras "
                         f"wrote it?).")
    return metadata


def load_preset_dir(preset_dir, load_weights=True, safe_mode=True, **overrides):
    """The model of a preset folder; ``overrides`` replace config entries (e.g. ``input_shape=(None, None, 3)``)."""
    import keras

    import mtl_keras.models  # noqa: F401  (registers the serializable classes)
    from mtl_keras.zoo import check_sha256, load_weights_file

    preset_dir = os.fspath(preset_dir)
    metadata = read_preset_metadata(preset_dir)
    config_path = os.path.join(preset_dir, CONFIG_FILE)
    serialized = read_json(config_path)
    if not isinstance(serialized, dict) or "config" not in serialized:
        raise ValueError(f"{config_path}: expected a serialized Keras model (with 'class_name' and 'config').")
    weights_path = None
    if load_weights:
        spec = metadata.get("weights") or {}
        weights_path = os.path.join(preset_dir, spec.get("file", WEIGHTS_FILE))
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Preset {preset_dir} lacks its weights file {os.path.basename(weights_path)} "
                                    f"(pass load_weights=False for the architecture alone).")
        check_sha256(weights_path, spec.get("sha256"))  # before building anything: a mismatch loads nothing
    if overrides:
        serialized = dict(serialized, config={**serialized["config"], **overrides})
    try:
        model = keras.saving.deserialize_keras_object(serialized, safe_mode=safe_mode)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: cannot rebuild the model ({' '.join(str(e).split())[:300]}).") from e
    if weights_path is not None:
        load_weights_file(model, weights_path)
    return model


def from_preset(preset, load_weights=True, safe_mode=True, **overrides):
    """A model from a preset folder (written by ``save_to_preset``) or a named preset (``mtl_keras.list_presets()``).

    ``load_weights=False`` gives the architecture with fresh weights. ``overrides`` change the architecture's
    arguments (``input_shape=(None, None, 3)``, ``tasks=...`` with ``load_weights=False``, ...). The weights'
    sha256 is checked before anything is read; ``safe_mode`` refuses configs that would run code (Lambda layers).
    """
    preset = os.fspath(preset)
    if is_preset_dir(preset):
        return load_preset_dir(preset, load_weights=load_weights, safe_mode=safe_mode, **overrides)
    if os.path.isdir(preset):
        raise ValueError(f"{preset} is a folder without {CONFIG_FILE} and {METADATA_FILE}: not a preset folder "
                         f"(write one with model.save_to_preset).")
    from mtl_keras import zoo

    if load_weights:
        return zoo.load_model(preset, **overrides)
    return zoo.build_from_preset(preset, **overrides)


class PresetMixin:
    """``save_to_preset`` and ``from_preset`` on the zoo's model classes (keras-hub's interface)."""

    def save_to_preset(self, preset_dir, training_config=None, metrics=None, description=None, overwrite=False):
        """Writes this model as a preset folder; ``mtl_keras.from_preset(preset_dir)`` loads it back."""
        return save_to_preset(self, preset_dir, training_config=training_config, metrics=metrics,
                              description=description, overwrite=overwrite)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **overrides):
        """Like ``mtl_keras.from_preset``; the preset must hold a ``cls`` model."""
        model = from_preset(preset, load_weights=load_weights, **overrides)
        if not isinstance(model, cls):
            raise ValueError(f"Preset {preset} holds a {type(model).__name__}, not a {cls.__name__}; use "
                             f"mtl_keras.from_preset.")
        return model
