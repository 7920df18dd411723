"""Data: label tables, the synthetic CityScapes-layout generator and the tf.data loaders of every format.

Formats (``mtl_keras.data.datasets.DATASETS`` maps the ``--dataset`` names to them): the CityScapes raw layout
(``load_cityscapes``), NYUv2's labeled ``.mat`` (``load_nyuv2``), the pre-processed ``.npy`` release of CityScapes
and NYUv2 (``load_cityscapes_npy``, ``load_nyuv2_npy``) and a prepared cache of any of them (``write_prepared``,
``load_prepared``). All share one pipeline (``pipeline``) and one joint augmentation (``augment``).

``labels`` and ``synthetic`` need only numpy/cv2; the loaders import TensorFlow. Everything but the label tables
is imported lazily, on first use.
"""

from mtl_keras.labels import (  # noqa: F401
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
    "load_nyuv2": "mtl_keras.data.nyuv2",
    "load_npy_release": "mtl_keras.data.npy_release",
    "load_cityscapes_npy": "mtl_keras.data.npy_release",
    "load_nyuv2_npy": "mtl_keras.data.npy_release",
    "write_prepared": "mtl_keras.data.prepared",
    "load_prepared": "mtl_keras.data.prepared",
    "AugmentConfig": "mtl_keras.data.augment",
    "augment_example": "mtl_keras.data.augment",
    "centroid_vectors": "mtl_keras.data.pipeline",
    "load_dataset": "mtl_keras.data.datasets",
    "DataError": "mtl_keras.data.checks",
}

__all__ = [
    "AugmentConfig",
    "DataError",
    "IGNORE_INDEX",
    "augment_example",
    "centroid_vectors",
    "load_cityscapes_npy",
    "load_dataset",
    "load_npy_release",
    "load_nyuv2",
    "load_nyuv2_npy",
    "load_prepared",
    "write_prepared",
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
