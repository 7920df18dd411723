"""One registry for every architecture of the zoo (timm style).

An entry point is a function ``fn(tasks, num_classes, input_shape, **overrides)`` that returns the inference model
(images -> dict of task outputs). ``register_model`` adds it under its function name.
"""

import fnmatch

_MODEL_ENTRY_POINTS = {}


def register_model(fn=None, *, name=None):
    """Registers ``fn`` as a model entry point under ``name`` (default: the function's name)."""

    def wrap(f):
        key = name or f.__name__
        if key in _MODEL_ENTRY_POINTS:
            raise ValueError(f"Model {key!r} is already registered.")
        _MODEL_ENTRY_POINTS[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern="*"):
    """Sorted names of registered models matching the fnmatch ``pattern``, e.g. ``list_models("*resnet*")``."""
    return sorted(n for n in _MODEL_ENTRY_POINTS if fnmatch.fnmatchcase(n, pattern))


def is_model(name):
    return name in _MODEL_ENTRY_POINTS


def model_entry_point(name):
    if name not in _MODEL_ENTRY_POINTS:
        raise ValueError(f"Unknown model {name!r}. Registered models: {', '.join(list_models())}.")
    return _MODEL_ENTRY_POINTS[name]


def build_model(name, **arguments):
    """Builds the inference model registered as ``name``: images (float32 RGB, 0..255) -> {task: output}.

    Defaults come from one place, the architecture's preset ``models/NAME.json`` (``arguments``: tasks,
    num_classes, input_shape and the architecture's own), so ``build_model(NAME)`` and ``load_model(NAME)`` build
    the same model; ``arguments`` replace any of them (e.g. ``tasks=("semantic", "depth")``, ``output_stride=16``,
    ``backbone=DilatedResNetBackbone(...)``, ``backbone_weights="imagenet"``).
    """
    from mtl_keras.tasks import validate_tasks

    from mtl_keras import zoo

    fn = model_entry_point(name)
    try:
        preset = zoo.get_preset(name)
    except ValueError:  # a registered architecture without a preset: its entry point's defaults
        preset = None
    if preset is None or preset.get("architecture") != name:
        preset = {"arguments": {}}
    kwargs = zoo.preset_build_kwargs(preset, **arguments)
    if "tasks" in kwargs:
        kwargs["tasks"] = validate_tasks(kwargs["tasks"])
    return fn(**kwargs)
