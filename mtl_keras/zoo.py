"""Models by name: presets (architecture + weights as data), ``load_model`` and publishing a trained run.

A *preset* is a JSON file ``models/NAME.json`` (installed with the package as ``mtl_keras/presets/``). Every
registered architecture has one under its own name; a published (trained) model is a preset with another name
whose ``architecture`` is a registered one and whose ``weights`` name a file with its sha256. Fields:

=================  ================================================================================================
``name``           the preset's name (= file name)
``architecture``   the registered entry point (``mtl_keras.list_models()``)
``arguments``      every architecture argument: ``build_model(architecture, **arguments)`` rebuilds the model
                   (tasks, num_classes, input_shape and the architecture's own, e.g. ``output_stride``)
``tiny_arguments`` overrides of ``arguments`` for a structurally complete, very small model (tests, smoke runs)
``input``          input convention: float32 RGB in 0..255, NHWC, normalised inside the model (mean, std), and
                   ``size_multiple`` (height and width must be multiples of it; the export pads and crops)
``classes``        label set: dataset, class names, classes that have instances, ignore label
``training``       the paper's hyper-parameters (``train_preset``: the matching ``experiments/presets`` file)
``backbone``       for ImageNet-initialisable encoders: the ``keras.applications`` model and its weights file
``weights``        null, or ``{"file", "sha256", "bytes", "format"}``: the trained weights (``.weights.h5`` or
                   ``.keras``) of a published model
``metrics``        null, or the validation metrics of the published run
``source``         published presets: the run's training config and where it came from
=================  ================================================================================================

Where files are looked up:

- presets: the folders in ``$MTL_KERAS_PRESETS`` (``os.pathsep``-separated), ``$KERAS_HOME/mtl_keras/presets``
  (``~/.keras/...``), then the built-in ones (``models/`` of a source checkout, or ``mtl_keras/presets/`` of an
  installed package);
- weights named by a preset (relative file names): the folders in ``$MTL_KERAS_WEIGHTS``, then
  :func:`default_weights_dir` (``$KERAS_HOME/mtl_keras/weights``, i.e. ``~/.keras/mtl_keras/weights``), then the
  preset's own folder. Nothing is downloaded.

``load_model`` never deserialises unsafely: ``.keras`` files load with ``safe_mode=True`` and weights files hold
only arrays.
"""

import datetime
import fnmatch
import json
import logging
import os
import re
import tempfile

from mtl_keras.config import read_json
from mtl_keras.pretrained import file_sha256

log = logging.getLogger("mtl_keras")

PRESET_FORMAT_VERSION = 1
PRESETS_ENV = "MTL_KERAS_PRESETS"
WEIGHTS_ENV = "MTL_KERAS_WEIGHTS"
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
    missing = [k for k in REQUIRED_FIELDS if k not in preset]
    if missing:
        raise ValueError(f"Preset {path} lacks field(s) {missing}.")
    if preset.get("format_version", PRESET_FORMAT_VERSION) > PRESET_FORMAT_VERSION:
        raise ValueError(f"Preset {path} has format_version {preset['format_version']}; this mtl_keras reads "
                         f"<= {PRESET_FORMAT_VERSION}. Upgrade mtl_keras.")
    weights = preset.get("weights")
    if weights is not None and not (isinstance(weights, dict) and weights.get("file")):
        raise ValueError(f"Preset {path}: 'weights' must be null or an object with a 'file' (and 'sha256').")
    return preset


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
    """The architecture of preset ``name`` with freshly initialised weights."""
    from mtl_keras.registry import build_model

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
    """Writes ``folder/NAME.json`` (atomically) and returns its path."""
    validate_preset(preset)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{preset['name']}.json")
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(dumps_preset(preset))
    _readable(tmp)
    os.replace(tmp, path)
    return path


def _readable(path):
    """mkstemp files are 0600: give them the usual mode (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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


def _check_weights_format(path):
    if not (path.endswith(".weights.h5") or path.endswith(".keras")):
        raise ValueError(f"Model weights must be a .weights.h5 or .keras file, got {path!r}.")


# ------------------------------------------------------------------------------------------------------ load_model
def _is_run_dir(path):
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model.keras"))
                                    or os.path.isfile(os.path.join(path, "config.json")))


def load_keras_file(path):
    """``keras.saving.load_model`` with ``safe_mode=True`` (mtl_keras' layers registered); a file that is not a
    ``.keras`` archive (truncated, corrupt) is a ValueError naming it (Keras says "File not found")."""
    import zipfile

    import keras

    import mtl_keras.models  # noqa: F401  (registers the serializable classes)

    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .keras file (a zip archive): truncated or corrupt? "
                         f"({os.path.getsize(path)} bytes)")
    return keras.saving.load_model(path, safe_mode=True)


def load_weights_file(model, path):
    """``model.load_weights(path)`` whose errors name the file and the likely cause (h5py's own do not)."""
    try:
        model.load_weights(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"Cannot load the weights {path} into {model.name}: {' '.join(str(e).split())[:300]} "
                         f"(a truncated or corrupt file, or weights of another architecture or size?)") from e


def load_run(run_dir):
    """The inference model of a training output folder: ``model.keras`` if there, else the architecture from
    ``config.json`` with the last checkpoint (``checkpoints/last.weights.h5``, trainer weights)."""
    keras_file = os.path.join(run_dir, "model.keras")
    if os.path.isfile(keras_file):
        return load_keras_file(keras_file)
    config_file = os.path.join(run_dir, "config.json")
    checkpoint = os.path.join(run_dir, "checkpoints", "last.weights.h5")
    if not (os.path.isfile(config_file) and os.path.isfile(checkpoint)):
        raise FileNotFoundError(f"{run_dir} holds neither model.keras nor config.json + checkpoints/last.weights.h5.")
    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import build_loss_weighting
    from mtl_keras.registry import build_model
    from mtl_keras.tasks import validate_tasks
    from mtl_keras.training import MultiTaskTrainer

    config = TrainConfig.from_dict(read_json(config_file))
    tasks = validate_tasks(config.tasks)
    model = build_model(config.model, tasks=tasks, num_classes=config.num_classes,
                        input_shape=(*[int(v) for v in config.image_size], 3), **dict(config.model_overrides))
    trainer = MultiTaskTrainer(model, build_loss_weighting(config, tasks))
    trainer.load_weights(checkpoint)
    return model


def load_model(name_or_path, weights=None, *, sha256=None, backbone_weights=None, **overrides):
    """A model by preset name, or a saved model by path.

    ``name_or_path``:

    - a preset name (``list_presets()``; every registered architecture has one): builds ``architecture`` with the
      preset's ``arguments`` (changed by ``overrides``, e.g. ``input_shape=(None, None, 3)``) and loads weights:
      ``weights`` if given (a local ``.weights.h5`` or ``.keras`` file), else the file the preset names (looked up
      as the module docstring says), else none (fresh initialisation, like ``build_model``). The preset's sha256 is
      checked before anything is read: a mismatch raises ValueError and nothing is loaded. ``sha256`` checks an
      explicit ``weights`` file the same way.
    - a ``.keras`` file, or a training output folder (its ``model.keras``, else ``config.json`` + the last
      checkpoint): loaded with ``safe_mode=True``; ``weights`` then loads on top.

    ``backbone_weights`` (or ``weights="imagenet"``): ImageNet weights for a dilated-ResNet encoder of depth 50 or
    101, from ``keras.applications`` (``"imagenet"``: its cached download) or a local file of that application (see
    ``mtl_keras.pretrained``).
    """
    name_or_path = os.fspath(name_or_path)
    if isinstance(weights, str) and weights == "imagenet":
        weights, backbone_weights = None, backbone_weights or "imagenet"
    # A preset's own weights are the default only when no other initialisation is asked for.
    use_preset_weights = weights is None and backbone_weights is None
    if weights is not None:
        weights = os.fspath(weights)
        _check_weights_format(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Weights file {weights!r} does not exist.")

    looks_like_a_name = os.sep not in name_or_path and "." not in name_or_path
    if not (looks_like_a_name and name_or_path in _preset_files()) and (
            os.path.exists(name_or_path) or name_or_path.endswith(".keras")):
        if overrides:
            raise ValueError(f"Architecture overrides {sorted(overrides)} apply to preset names, not to saved "
                             f"models ({name_or_path}).")
        model = _load_path(name_or_path)
    else:
        from mtl_keras.registry import build_model, is_model

        if name_or_path in _preset_files():
            preset = get_preset(name_or_path)
        elif is_model(name_or_path):  # a registered architecture without a preset (yet): its defaults
            preset = {"name": name_or_path, "architecture": name_or_path, "arguments": {}, "weights": None}
        else:
            raise ValueError(f"{name_or_path!r} is neither a file nor a model preset. Presets: "
                             f"{', '.join(preset_names())}.")
        if use_preset_weights and preset.get("weights"):
            weights = resolve_weights_file(preset)
            _check_weights_format(weights)
            sha256 = preset["weights"].get("sha256")
        if weights is not None:
            check_sha256(weights, sha256)  # before building anything: a mismatch loads nothing
            sha256 = None
        model = build_model(preset["architecture"], **preset_build_kwargs(preset, **overrides))
    if backbone_weights is not None:
        from mtl_keras.pretrained import load_resnet_weights

        load_resnet_weights(model, backbone_weights)
    if weights is not None:
        check_sha256(weights, sha256)
        load_weights_file(model, weights)
        log.info("Loaded weights %s into %s.", weights, model.name)
    return model


def _load_path(path):
    from mtl_keras.presets import is_preset_dir, load_preset_dir

    if is_preset_dir(path):
        return load_preset_dir(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path} is a TensorFlow SavedModel (an export), not a Keras model: load it with "
                             f"tf.saved_model.load or keras.layers.TFSMLayer.")
        if _is_run_dir(path):
            return load_run(path)
        raise ValueError(f"{path} is a folder but neither a training output folder nor a SavedModel.")
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Model file {path!r} does not exist.")
        return load_keras_file(path)
    if path.endswith(".weights.h5"):
        raise ValueError(f"{path} holds weights only: pass the architecture too, load_model(NAME, weights=PATH).")
    raise ValueError(f"Cannot load {path!r}: expected a .keras file, a training output folder or a preset name.")


# ----------------------------------------------------------------------------------------------------- publishing
def publish_targets(name, weights_dir=None, presets_dir=None, overwrite=False):
    """``(preset_path, weights_path)`` that :func:`publish_run` would write for ``name``; checks the name and that
    nothing would be replaced (unless ``overwrite``). ``experiments/train.py --publish`` calls it before training, so
    a bad name fails in seconds, not after the run."""
    from mtl_keras.registry import is_model

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
    from mtl_keras.registry import is_model

    run_dir = os.fspath(run_dir)
    preset_path, weights_path = publish_targets(name, weights_dir, presets_dir, overwrite)
    weights_dir, presets_dir = os.path.dirname(weights_path), os.path.dirname(preset_path)
    model = load_run(run_dir)
    config = _read_json(os.path.join(run_dir, "config.json"))
    metrics = _read_json(os.path.join(run_dir, "metrics.json"))
    architecture = (config or {}).get("model") or (metrics or {}).get("model")
    if not architecture or not is_model(architecture):
        raise ValueError(f"{run_dir}: cannot tell the registered architecture (config.json 'model' is "
                         f"{architecture!r}).")
    arguments = {k: v for k, v in model.get_config().items() if k not in ("name", "trainable", "dtype")}

    os.makedirs(weights_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=weights_dir, suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp)
        digest = file_sha256(tmp)
        size = os.path.getsize(tmp)
        _readable(tmp)
        os.replace(tmp, weights_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

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
        from mtl_keras.labels import class_names, instance_train_ids

        return {"dataset": "cityscapes", "label_set": "train_ids", "names": class_names(num_classes),
                "instance_classes": instance_train_ids(num_classes), "ignore_label": 255}
    except (ValueError, ImportError):
        return {"names": None, "num_classes": num_classes}


def _read_json(path):
    if not os.path.isfile(path):
        return None
    return read_json(path)

