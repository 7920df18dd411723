"""Models by name and preset folders: the one module for names, presets, weights files and their sha256.

A **preset folder** (keras-hub's layout; ``model.save_to_preset(DIR)``, a run's ``RUN/preset``) holds
``config.json`` (the serialized model), ``model.weights.h5`` and ``metadata.json`` (versions, class, architecture,
parameters, tasks, classes, input size, ``size_multiple``, the weights' sha256; optionally the training config and
metrics). A **named preset** is a registered dict ``models/NAME.json``: ``architecture`` (a registered entry point),
its ``arguments`` (the architecture's defaults: every architecture has one under its own name), ``tiny_arguments``,
``input``, ``classes``, ``training``, and for a published model ``weights`` (file, sha256) and ``metrics``.
``build_model`` / ``from_preset`` / ``load_model``: see the README's table for which to use.

Named presets are looked up in ``$MTL_KERAS_PRESETS``, ``$KERAS_HOME/mtl_keras/presets``, then the built-in folder;
their weights files in ``$MTL_KERAS_WEIGHTS``, ``$KERAS_HOME/mtl_keras/weights``, then the preset's own folder.
Nothing is downloaded; every sha256 is checked before a file is read; models load with ``safe_mode=True``. This
module imports no model code (the classes register when ``mtl_keras`` imports ``mtl_keras.models``), so models can
import it.
"""

import datetime
import fnmatch
import hashlib
import io
import json
import logging
import os
import zipfile

import keras

try:  # Keras' own weights writer, pointed at a buffer by save_weights_file (internals: checked at import)
    from keras.src.saving.saving_lib import H5IOStore as _H5IOStore, _save_state
except ImportError:
    _H5IOStore = _save_state = None

from mtl_keras.atomic_files import atomic_directory, atomic_path, write_text_atomically
from mtl_keras.config import read_json
from mtl_keras.registry import is_model, model_entry_point
from mtl_keras.tasks import validate_tasks

log = logging.getLogger("mtl_keras")

VERSION = "0.1.0"
PRESET_FORMAT_VERSION = 1
PRESET_FOLDER_FORMAT = 1
PRESETS_ENV = "MTL_KERAS_PRESETS"
WEIGHTS_ENV = "MTL_KERAS_WEIGHTS"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIRED_FIELDS = ("name", "architecture", "arguments")


# ------------------------------------------------------------------------------------------------------- locations
def builtin_presets_dir():
    """The presets shipped with mtl_keras: ``models/`` of a source checkout (editable install or the repository
    itself), else ``mtl_keras/presets/`` of an installed package."""
    root = os.path.dirname(_PACKAGE_DIR)
    checkout = os.path.join(root, "models")
    if os.path.isdir(checkout) and os.path.isfile(os.path.join(root, "setup.py")):
        return checkout
    return os.path.join(_PACKAGE_DIR, "presets")


def _is_checkout(presets_dir):
    return os.path.basename(presets_dir) == "models"


def _keras_home():
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def user_presets_dir():
    """Presets published on this machine outside a checkout: ``$KERAS_HOME/mtl_keras/presets``."""
    return os.path.join(_keras_home(), "mtl_keras", "presets")


def presets_dirs():
    """Folders searched for presets, first match wins: ``$MTL_KERAS_PRESETS``, :func:`user_presets_dir`, then the
    built-in folder."""
    extra = [d for d in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if d]
    return extra + [user_presets_dir(), builtin_presets_dir()]


def default_weights_dir():
    """Where published weights go by default: ``$KERAS_HOME/mtl_keras/weights`` (``~/.keras/mtl_keras/weights``)."""
    return os.path.join(_keras_home(), "mtl_keras", "weights")


def weights_dirs(preset=None):
    extra = [d for d in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if d]
    dirs = extra + [default_weights_dir()]
    if preset is not None and preset.get("_path"):
        dirs.append(os.path.dirname(preset["_path"]))
    return dirs


# --------------------------------------------------------------------------------------------------------- presets
def _preset_files():
    """{name: path} over the preset folders, earlier folders first."""
    files = {}
    for folder in presets_dirs():
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".json"):
                files.setdefault(entry[:-len(".json")], os.path.join(folder, entry))
    return files


def preset_names(pattern="*", architecture=None):
    """Sorted preset names matching the fnmatch ``pattern`` (and, if given, built on ``architecture``)."""
    names = sorted(n for n in _preset_files() if fnmatch.fnmatchcase(n, pattern))
    if architecture is not None:
        names = [n for n in names if get_preset(n)["architecture"] == architecture]
    return names


class PresetTable(dict):
    """``{name: summary}`` of presets; iterating gives the names, ``print`` gives a table."""

    COLUMNS = ("architecture", "parameters", "tasks", "dataset", "metrics", "weights")

    def __str__(self):
        rows = [("name",) + self.COLUMNS]
        for name, summary in self.items():
            rows.append((name,) + tuple(_cell(summary[c]) for c in self.COLUMNS))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _cell(value):
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


_HEADLINE_METRICS = ("semantic_miou", "official_instance_ap50", "depth_mean_error_px", "normals_mean_angle_deg")


def preset_summary(name):
    """What a user needs to choose a preset: architecture, parameters, tasks, dataset, headline metrics, and whether
    its trained weights are here (their path) or where to put them."""
    preset = get_preset(name)
    training = preset.get("training") or {}
    metrics = preset.get("metrics") or {}
    weights = preset.get("weights")
    if not weights:
        where = "none (architecture only" + (", ImageNet encoder: backbone_weights='imagenet')"
                                            if preset.get("backbone") else ")")
    else:
        try:
            where = f"present: {resolve_weights_file(preset)}"
        except FileNotFoundError:
            where = f"missing: put {weights['file']} in {default_weights_dir()} (or ${WEIGHTS_ENV})"
    return {
        "architecture": preset["architecture"],
        "parameters": preset.get("parameters"),
        "tasks": list(preset["arguments"].get("tasks", [])),
        "dataset": training.get("dataset"),
        "metrics": {k: metrics[k] for k in _HEADLINE_METRICS if isinstance(metrics.get(k), (int, float))},
        "weights": where,
        "description": preset.get("description"),
    }


def list_presets(pattern="*", architecture=None):
    """``{name: summary}`` (a :class:`PresetTable`: ``print(list_presets())`` shows a table) of the presets matching
    the fnmatch ``pattern`` (and, if given, built on ``architecture``); see :func:`preset_summary`."""
    return PresetTable((n, preset_summary(n)) for n in preset_names(pattern, architecture))


def validate_preset(preset, path="<preset>"):
    if not isinstance(preset, dict):
        raise ValueError(f"Preset {path} is a JSON {type(preset).__name__}; expected an object with the fields "
                         f"{list(REQUIRED_FIELDS)}.")
    missing = [k for k in REQUIRED_FIELDS if k not in preset]
    if missing:
        raise ValueError(f"Preset {path} lacks field(s) {missing}.")
    version = preset.get("format_version", PRESET_FORMAT_VERSION)
    if not _is_int(version):
        raise ValueError(f"Preset {path}: format_version must be an int, got {version!r}.")
    if version > PRESET_FORMAT_VERSION:
        raise ValueError(f"Preset {path} has format_version {preset['format_version']}; this mtl_keras reads "
                         f"<= {PRESET_FORMAT_VERSION}. Upgrade mtl_keras.")
    optional = (dict, type(None))
    for key, kinds, expected in (("name", str, "a string"), ("architecture", str, "a string"),
                                 ("arguments", dict, "an object"), ("tiny_arguments", optional, "an object or null"),
                                 ("training", optional, "an object or null"),
                                 ("metrics", optional, "an object or null")):
        if key in preset and not isinstance(preset[key], kinds):
            raise ValueError(f"Preset {path}: {key!r} must be {expected}, got {str(preset[key])[:100]}.")
    tasks = preset["arguments"].get("tasks", [])
    if not (isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks)):  # tuple: write_preset
        raise ValueError(f"Preset {path}: arguments.tasks must be a list of task names, got {str(tasks)[:100]}.")
    weights = preset.get("weights")
    if weights is not None and not (isinstance(weights, dict) and isinstance(weights.get("file"), str)
                                    and weights["file"] and isinstance(weights.get("sha256"), (str, type(None)))):
        raise ValueError(f"Preset {path}: 'weights' must be null or an object with a 'file' (and 'sha256').")
    return preset


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def get_preset(name):
    """The preset ``name`` as a dict (with ``_path``, the file it came from)."""
    files = _preset_files()
    if name not in files:
        raise ValueError(f"Unknown model preset {name!r}. Presets: {', '.join(sorted(files))} (folders: "
                         f"{', '.join(presets_dirs())}).")
    preset = read_json(files[name])
    validate_preset(preset, files[name])
    if preset["name"] != name:
        raise ValueError(f"Preset file {files[name]} is named {preset['name']!r} inside; expected {name!r}.")
    preset["_path"] = files[name]
    return preset


def preset_build_kwargs(preset, tiny=False, **overrides):
    """Keyword arguments of ``build_model(preset['architecture'], ...)``: the preset's arguments (and
    ``tiny_arguments`` when ``tiny``), then ``overrides``."""
    kwargs = dict(preset["arguments"])
    if tiny:
        kwargs.update(preset.get("tiny_arguments") or {})
    kwargs.update(overrides)
    for key in ("tasks", "input_shape", "aspp_rates", "decoder_filters"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def build_from_preset(name, tiny=False, **overrides):
    """The architecture of preset ``name`` (a name or a preset dict) with freshly initialised weights."""
    preset = name if isinstance(name, dict) else get_preset(name)
    return build_model(preset["architecture"], **preset_build_kwargs(preset, tiny=tiny, **overrides))


def dumps_preset(preset):
    """JSON text of a preset: 2-space indents, lists of numbers or strings on one line."""
    def fmt(value, indent):
        pad = " " * indent
        if isinstance(value, dict):
            if not value:
                return "{}"
            items = [f'{pad}  {json.dumps(k)}: {fmt(v, indent + 2)}' for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(value, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in value):
                return json.dumps(list(value))
            items = [f"{pad}  {fmt(v, indent + 2)}" for v in value]
            return "[\n" + ",\n".join(items) + f"\n{pad}]"
        return json.dumps(value)

    clean = {k: v for k, v in preset.items() if not k.startswith("_")}
    return fmt(clean, 0) + "\n"


def write_preset(preset, folder):
    """Writes ``folder/NAME.json`` (atomically: the previous file stays whole if the write fails) and returns its
    path."""
    validate_preset(preset)
    os.makedirs(folder, exist_ok=True)
    return write_text_atomically(os.path.join(folder, f"{preset['name']}.json"), dumps_preset(preset))


# --------------------------------------------------------------------------------------------------------- weights
def resolve_weights_file(preset):
    """Absolute path of the weights file a preset names; FileNotFoundError (saying where it looked) if absent."""
    spec = preset["weights"]
    file_name = os.path.expanduser(spec["file"])
    if os.path.isabs(file_name):
        candidates = [file_name]
    else:
        candidates = [os.path.join(d, file_name) for d in weights_dirs(preset)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Weights of model {preset['name']!r} not found: {spec['file']} (sha256 {spec.get('sha256')}). Looked in: "
        f"{', '.join(candidates)}. mtl_keras downloads nothing: copy the published file into one of these folders "
        f"(or ${WEIGHTS_ENV}), or pass weights=PATH.")


def check_sha256(path, expected):
    """Raises ValueError if ``path``'s sha256 is not ``expected`` (None: no check)."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual.lower() != str(expected).lower():
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {actual}. The file is not the "
                         f"published one (corrupt, truncated or replaced); nothing was loaded.")



# ---------------------------------------------------------------------------------------------------------- folders
def is_preset_dir(path):
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(
        os.path.join(path, METADATA_FILE))


def save_to_preset(model, preset_dir, training_config=None, metrics=None, description=None, overwrite=False):
    """Writes ``model`` as a preset folder ``preset_dir`` (see the module docstring); returns its path.

    ``training_config``: a ``TrainConfig`` or dict; ``metrics``: a dict (e.g. a run's validation metrics).
    """
    preset_dir = os.path.abspath(os.fspath(preset_dir))
    if os.path.exists(preset_dir) and (not os.path.isdir(preset_dir) or os.listdir(preset_dir)) and not overwrite:
        raise FileExistsError(f"{preset_dir} exists and is not empty; pass overwrite=True to replace it.")
    if training_config is not None and not isinstance(training_config, dict):
        training_config = json.loads(training_config.to_json())
    os.makedirs(os.path.dirname(preset_dir), exist_ok=True)
    # Written in a staging folder and swapped in whole: a full or read-only disk (DiskWriteError) or any other
    # failure leaves the previous preset as it was, and no reader ever sees a half-written one.
    with atomic_directory(preset_dir) as staging:
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:  # fsynced with the folder before the swap
            json.dump(keras.saving.serialize_keras_object(model), f, indent=2)
        weights_path = os.path.join(staging, WEIGHTS_FILE)
        save_weights_file(model, weights_path)
        config = model.get_config()
        metadata = {
            "format_version": PRESET_FOLDER_FORMAT,
            "mtl_keras_version": VERSION,
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
    return preset_dir


def read_preset_metadata(preset_dir):
    path = os.path.join(os.fspath(preset_dir), METADATA_FILE)
    metadata = read_json(path)
    if not isinstance(metadata, dict) or not _is_int(metadata.get("format_version", 0)) \
            or metadata.get("format_version", 0) > PRESET_FOLDER_FORMAT:
        raise ValueError(f"{path}: not an mtl_keras preset of format <= {PRESET_FOLDER_FORMAT} (a newer mtl_keras "
                         f"wrote it?).")
    spec = metadata.get("weights")
    file = spec.get("file", WEIGHTS_FILE) if isinstance(spec, dict) else None
    if spec is not None and not (isinstance(file, str) and file and os.path.basename(file) == file
                                 and isinstance(spec.get("sha256"), (str, type(None)))):
        raise ValueError(f"{path}: 'weights' must be an object with the 'file' name of the weights in the preset "
                         f"folder and its 'sha256', got {str(spec)[:200]}.")
    return metadata


def load_preset_dir(preset_dir, load_weights=True, safe_mode=True, **overrides):
    """The model of a preset folder; ``overrides`` replace config entries (e.g. ``input_shape=(None, None, 3)``)."""
    preset_dir = os.fspath(preset_dir)
    metadata = read_preset_metadata(preset_dir)
    config_path = os.path.join(preset_dir, CONFIG_FILE)
    serialized = read_json(config_path)
    if not isinstance(serialized, dict) or not isinstance(serialized.get("config"), dict):
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
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # what a corrupt config raises in Keras
        raise ValueError(f"{config_path}: cannot rebuild the model ({' '.join(str(e).split())[:300]}).") from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"{config_path}: holds a {type(model).__name__}, not a Keras model.")
    if weights_path is not None:
        load_weights_file(model, weights_path)
    return model



# ------------------------------------------------------------------------------------------------------- building and loading
def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(name, **arguments):
    """The architecture registered as ``name``, freshly initialised: images (float32 RGB, 0..255) -> {task: output}.

    Its defaults are its named preset's ``arguments`` (so ``build_model(NAME)`` and ``from_preset(NAME,
    load_weights=False)`` are the same model); ``arguments`` replace any of them (``tasks=("semantic", "depth")``,
    ``output_stride=16``, ``backbone=DilatedResNetBackbone(...)``, ``backbone_weights="imagenet"`` ...).
    """
    entry_point = model_entry_point(name)
    preset = get_preset(name) if name in _preset_files() else None
    if preset is None or preset.get("architecture") != name:
        preset = {"arguments": {}}  # a registered architecture without a preset: its entry point's defaults
    kwargs = preset_build_kwargs(preset, **arguments)
    if "tasks" in kwargs:
        kwargs["tasks"] = validate_tasks(kwargs["tasks"])
    return entry_point(**kwargs)


def load_keras_file(path):
    """``keras.saving.load_model`` with ``safe_mode=True``; a file that is not a ``.keras`` archive (truncated,
    corrupt) is a ValueError naming it (Keras says "File not found")."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .keras file (a zip archive): truncated or corrupt? "
                         f"({os.path.getsize(path)} bytes)")
    return keras.saving.load_model(path, safe_mode=True)


def weights_file_bytes(model):
    """The bytes of ``model.save_weights(PATH.weights.h5)``, built in memory; None where this Keras lacks the
    internals used (then :func:`save_weights_file` lets HDF5 write the file itself)."""
    if _H5IOStore is None or not model.built:
        return None
    buffer = io.BytesIO()
    store = _H5IOStore(buffer, mode="w")  # HDF5 writes to this buffer through h5py's file-object driver
    try:
        _save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    finally:
        store.close()
    return buffer.getvalue()


def save_weights_file(model, path):
    """``model.save_weights(path)`` whole or not at all: a failed write raises ``DiskWriteError`` (one line, the
    errno) and leaves the previous ``path``. Returns ``path``.

    The file is built in memory and written by Python: HDF5 that meets a full disk or a file size limit itself
    segfaults when the file is closed (h5py 3.14 / HDF5 1.14.6; h5py issues 914 and 2160), killing the process
    instead of raising."""
    with atomic_path(path) as temporary:
        write_weights(model, temporary)
    return path


def write_weights(model, path):
    """``model.save_weights(path)``, the file built in memory (:func:`save_weights_file`'s reason); not atomic: for
    the temporary path of an ``atomic_path`` block."""
    data = weights_file_bytes(model)
    if data is None:
        model.save_weights(path)
        return
    with open(path, "wb") as f:
        f.write(data)


def load_weights_file(model, path):
    """``model.load_weights(path)`` whose errors name the file and the likely cause (h5py's own do not)."""
    try:
        model.load_weights(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:  # h5py, Keras
        raise ValueError(f"Cannot load the weights {path} into {model.name}: {' '.join(str(e).split())[:300]} "
                         f"(a truncated or corrupt file, or weights of another architecture or size?)") from e


def _named_preset(name):
    if name in _preset_files():
        return get_preset(name)
    if is_model(name):  # a registered architecture without a preset (yet): its defaults
        return {"name": name, "architecture": name, "arguments": {}, "weights": None}
    raise ValueError(f"{name!r} is neither a file nor a model preset. Presets: {', '.join(preset_names())}.")


def _load_named(name, weights=None, sha256=None, load_weights=True, **overrides):
    """The one path for a model by name: its preset's architecture and arguments (changed by ``overrides``), then
    ``weights`` if given, else (``load_weights``) the file the preset names. Every sha256 is checked before the
    model is built: a mismatch loads nothing."""
    preset = _named_preset(name)
    if weights is None and load_weights and preset.get("weights") and "backbone_weights" not in overrides:
        weights, sha256 = resolve_weights_file(preset), preset["weights"].get("sha256")
    if weights is not None:
        weights = os.fspath(weights)
        if not (weights.endswith(".weights.h5") or weights.endswith(".keras")):
            raise ValueError(f"Model weights must be a .weights.h5 or .keras file, got {weights!r}.")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Weights file {weights!r} does not exist.")
        check_sha256(weights, sha256)
    model = build_model(preset["architecture"], **preset_build_kwargs(preset, **overrides))
    if weights is not None:
        load_weights_file(model, weights)
        log.info("Loaded weights %s into %s.", weights, model.name)
    return model


def _load_path(path):
    """A saved model: a preset folder, a run folder (its ``preset/``, else its ``model.keras``) or a ``.keras``
    file."""
    if is_preset_dir(path):
        return load_preset_dir(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path} is a TensorFlow SavedModel (an export), not a Keras model: load it with "
                             f"tf.saved_model.load or keras.layers.TFSMLayer.")
        if is_preset_dir(os.path.join(path, "preset")):
            return load_preset_dir(os.path.join(path, "preset"))
        if os.path.isfile(os.path.join(path, "model.keras")):
            return load_keras_file(os.path.join(path, "model.keras"))
        if os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is an unfinished run folder (no preset/ nor model.keras): "
                             f"mtl_keras.experiment.load_run reads its last checkpoint.")
        raise ValueError(f"{path} is a folder but neither a preset, a run folder nor a SavedModel.")
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Model file {path!r} does not exist.")
        return load_keras_file(path)
    if path.endswith(".weights.h5"):
        raise ValueError(f"{path} holds weights only: pass the architecture too, load_model(NAME, weights=PATH).")
    raise ValueError(f"Cannot load {path!r}: expected a .keras file, a run or preset folder or a preset name.")


def _is_name(text):
    return os.sep not in text and "." not in text and (text in _preset_files() or not os.path.exists(text))


def load_model(name_or_path, weights=None, *, sha256=None, backbone_weights=None, **overrides):
    """A saved model by path (a ``.keras`` file, a run or preset folder), or a model by name (as
    :func:`from_preset`) whose weights can be replaced: ``weights`` (a ``.weights.h5`` or ``.keras`` file, checked
    against ``sha256`` when given), or ``backbone_weights`` (``weights="imagenet"``): ImageNet weights for a
    dilated-ResNet encoder (``"imagenet"``: ``keras.applications``' cached download, or a local file of it).
    ``overrides`` change a named model's architecture arguments (e.g. ``input_shape=(None, None, 3)``)."""
    name_or_path = os.fspath(name_or_path)
    if isinstance(weights, str) and weights == "imagenet":
        weights, backbone_weights = None, backbone_weights or "imagenet"
    if _is_name(name_or_path) and not name_or_path.endswith(".keras"):
        if backbone_weights is not None:
            overrides["backbone_weights"] = backbone_weights
        return _load_named(name_or_path, weights=weights, sha256=sha256, **overrides)
    if overrides or backbone_weights is not None:
        raise ValueError(f"Architecture arguments {sorted(overrides) + (['backbone_weights'] if backbone_weights else [])}"
                         f" apply to preset names, not to saved models ({name_or_path}).")
    model = _load_path(name_or_path)
    if weights is not None:
        weights = os.fspath(weights)
        check_sha256(weights, sha256)
        load_weights_file(model, weights)
    return model


def from_preset(preset, load_weights=True, safe_mode=True, **overrides):
    """A model from a preset folder (``save_to_preset``, a run's ``preset/``) or a named preset (``list_presets()``).

    ``load_weights=False`` gives the architecture with fresh weights. ``overrides`` change the architecture's
    arguments (``input_shape=(None, None, 3)``, ``tasks=...`` with ``load_weights=False``, ...).
    """
    preset = os.fspath(preset)
    if is_preset_dir(preset):
        return load_preset_dir(preset, load_weights=load_weights, safe_mode=safe_mode, **overrides)
    if os.path.isdir(preset):
        raise ValueError(f"{preset} is a folder without {CONFIG_FILE} and {METADATA_FILE}: not a preset folder "
                         f"(write one with model.save_to_preset).")
    return _load_named(preset, load_weights=load_weights, **overrides)


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
