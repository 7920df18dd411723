"""Data: CityScapes label tables, the synthetic CityScapes-layout generator and the tf.data loader.

``labels`` and ``synthetic`` need only numpy/cv2; ``load_cityscapes`` / ``list_cityscapes_files``
import TensorFlow. Everything but the label tables is imported lazily, on first use.
"""

from mtl_keras.data.labels import (  # noqa: F401
    IGNORE_INDEX,
    class_colors,
    class_names,
    instance_label_ids,
    instance_train_ids,
    label_lookup_table,
    train_id_to_label_id,
)

_LAZY = {
    "generate_synthetic_cityscapes": "mtl_keras.data.synthetic",
    "load_cityscapes": "mtl_keras.data.cityscapes",
    "list_cityscapes_files": "mtl_keras.data.cityscapes",
    "instance_centroid_vectors": "mtl_keras.data.cityscapes",
}

__all__ = [
    "IGNORE_INDEX",
    "class_colors",
    "class_names",
    "generate_synthetic_cityscapes",
    "instance_centroid_vectors",
    "instance_label_ids",
    "instance_train_ids",
    "label_lookup_table",
    "list_cityscapes_files",
    "load_cityscapes",
    "train_id_to_label_id",
]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
