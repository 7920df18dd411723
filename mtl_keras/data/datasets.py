"""One entry point per dataset name, so experiments switch data with one flag.

Each entry gives ``load(data_dir, split, **kwargs) -> tf.data.Dataset`` of ``(image, targets)`` (the contract of
``load_cityscapes``) and ``count(data_dir, split) -> int`` (examples in the split, checked up front).

| name | data_dir | splits | tasks | num_classes |
| --- | --- | --- | --- | --- |
| ``synthetic`` | generated CityScapes layout | train, val | semantic, instance, depth | 19, 7 |
| ``cityscapes`` | CityScapes raw release root | train, val, test | semantic, instance, depth | 19, 7 |
| ``cityscapes_npy`` | the pre-processed .npy release (128x256) | train, val | semantic, depth | 19, 7 |
| ``nyuv2`` | folder of ``nyu_depth_v2_labeled.mat`` + ``splits.mat`` + class maps | train (795), val = test (654) | semantic, instance, depth | 13, 40 |
| ``nyuv2_npy`` | the pre-processed .npy release (288x384) | train (795), val (654) | semantic, depth, normals | 13 |
| ``prepared`` | a cache written by ``experiments/prepare_data.py`` | those prepared | those prepared | that prepared |

Every loader takes ``image_size, batch_size, num_classes, tasks, seed, flip, repeat, shuffle`` and the augmentation
arguments ``scale_range, crop_size, random_crop`` (see ``mtl_keras.data.augment``), plus ``cache`` and
``input_context`` (sharding for distributed input). See ``datasets/*.md`` for each format.
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
    from mtl_keras.data.cityscapes_files import list_cityscapes_files  # TensorFlow-free

    return len(list_cityscapes_files(data_dir, split))


def _npy_entry(name):
    def load(data_dir, split, **kwargs):
        from mtl_keras.data.npy_release import load_npy_release

        return load_npy_release(name, data_dir, split, **kwargs)

    def count(data_dir, split):
        from mtl_keras.data.npy_release import count_npy_release

        return count_npy_release(name, data_dir, split)

    return load, count


def _nyuv2_load(data_dir, split, **kwargs):
    from mtl_keras.data.nyuv2 import load_nyuv2

    return load_nyuv2(data_dir, split, **kwargs)


def _nyuv2_count(data_dir, split):
    from mtl_keras.data.nyuv2 import count_nyuv2

    return count_nyuv2(data_dir, split)


def _prepared_load(data_dir, split, **kwargs):
    from mtl_keras.data.prepared import load_prepared

    return load_prepared(data_dir, split, **kwargs)


def _prepared_count(data_dir, split):
    from mtl_keras.data.prepared import count_prepared

    return count_prepared(data_dir, split)


DATASETS = {
    # The synthetic set is written in the CityScapes raw layout and read by the same loader.
    "synthetic": DatasetEntry(_cityscapes_load, _cityscapes_count, ("semantic", "instance", "depth"), (19, 7)),
    "cityscapes": DatasetEntry(_cityscapes_load, _cityscapes_count, ("semantic", "instance", "depth"), (19, 7)),
    "cityscapes_npy": DatasetEntry(*_npy_entry("cityscapes_npy"), ("semantic", "depth"), (19, 7)),
    "nyuv2": DatasetEntry(_nyuv2_load, _nyuv2_count, ("semantic", "instance", "depth"), (13, 40)),
    "nyuv2_npy": DatasetEntry(*_npy_entry("nyuv2_npy"), ("semantic", "depth", "normals"), (13,)),
    "prepared": DatasetEntry(_prepared_load, _prepared_count, ("semantic", "instance", "depth", "normals"),
                             (7, 13, 19, 40)),
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
