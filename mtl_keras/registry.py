"""One registry for every architecture of the zoo (timm style).

An entry point is a function ``fn(tasks, num_classes, input_shape, **overrides)`` that returns the inference model
(images -> dict of task outputs). ``register_model`` adds it under its function name. This module imports nothing:
the architectures register themselves when ``mtl_keras.models`` is imported, and ``mtl_keras.presets.build_model``
builds them with their preset's defaults.
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
