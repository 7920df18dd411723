"""One entry point per dataset name, so experiments switch data with one flag.

Each entry gives ``load(data_dir, split, **kwargs) -> tf.data.Dataset`` of ``(image, targets)`` (the contract of
``load_cityscapes``) and ``count(data_dir, split) -> int`` (examples in the split, checked up front).
"""

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    load: Callable
    count: Callable
    tasks: tuple  # the tasks the format can supply
    num_classes: tuple  # valid values of num_classes


def _cityscapes_load(data_dir, split, **kwargs):
    from mtl_keras.data.cityscapes import load_cityscapes

    return load_cityscapes(data_dir, split, **kwargs)


def _cityscapes_count(data_dir, split):
    from mtl_keras.data.cityscapes import list_cityscapes_files

    return len(list_cityscapes_files(data_dir, split))


DATASETS = {
    # The synthetic set is written in the CityScapes raw layout and read by the same loader.
    "synthetic": DatasetEntry(_cityscapes_load, _cityscapes_count, ("semantic", "instance", "depth"), (19, 7)),
    "cityscapes": DatasetEntry(_cityscapes_load, _cityscapes_count, ("semantic", "instance", "depth"), (19, 7)),
}


def dataset_entry(name):
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Valid: {', '.join(DATASETS)}.")
    return DATASETS[name]


def load_dataset(name, data_dir, split, **kwargs):
    """``(image, targets)`` batches of dataset ``name`` (see ``DATASETS``) from ``data_dir``."""
    return dataset_entry(name).load(data_dir, split, **kwargs)


def count_examples(name, data_dir, split):
    return dataset_entry(name).count(data_dir, split)
