"""The datasets: one entry per ``--dataset`` name, where the scripts read names, splits, tasks, classes and checks.
A new dataset is a reader module (``source`` giving a ``pipeline.Source``, ``count``, ``validate_split``), one entry
here, ``datasets/NAME.md`` and tests. Every dataset loads through :func:`load_dataset` with the same augmentation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import mtl_keras.data.cityscapes as cityscapes
import mtl_keras.data.folder as folder
import mtl_keras.data.npy_release as npy_release
import mtl_keras.data.numpy_loader as numpy_loader
import mtl_keras.data.nyuv2 as nyuv2
import mtl_keras.data.prepared as prepared
import mtl_keras.data.synthetic as synthetic
import mtl_keras.labels as labels
from mtl_keras.data.pipeline import load_source

ALL = ("semantic", "instance", "depth")


@dataclasses.dataclass(frozen=True)
class ClassTable:
    names: tuple
    colors: object  # uint8 (C, 3)
    instance_ids: tuple  # the training ids whose pixels carry instances


def _label_classes(num_classes, data_dir=None):
    ids = labels.instance_train_ids(num_classes) if num_classes in labels.VALID_NUM_CLASSES else ()
    return ClassTable(tuple(labels.class_names(num_classes)), labels.class_colors(num_classes), tuple(ids))


@dataclasses.dataclass(frozen=True)
class Dataset:
    source: Callable  # (data_dir, split, image_size=, num_classes=, tasks=, depth_target=, check_files=) -> Source
    count: Callable  # (data_dir, split) -> examples
    validate_split: Callable  # (data_dir, split, num_classes, tasks, workers, max_errors, depth_target) -> SplitReport
    tasks: tuple  # the tasks it can supply
    num_classes: tuple  # valid num_classes; () = set by the data (its classes file)
    splits: tuple = ("train", "val")  # what --check examines
    depth_targets: tuple = ("inverse",)  # the first is the default
    classes: Callable = _label_classes  # (num_classes, data_dir) -> ClassTable
    numpy_loader: Callable | None = None  # a TensorFlow-free keras.utils.PyDataset (JAX / PyTorch without TF)
    cityscapes_layout: bool = False  # the official cityscapesscripts evaluation applies
    generate: Callable | None = None  # (config) -> data_dir, for a generated set


def _npy(name):
    release = npy_release.NPY_RELEASES[name]
    return Dataset(functools.partial(npy_release.npy_release_source, name), functools.partial(npy_release.count, name),
                   functools.partial(npy_release.validate_split, name), release.tasks, tuple(release.label_folders),
                   depth_targets=release.depth_targets)


def _cityscapes(name, splits, **kwargs):
    return Dataset(functools.partial(cityscapes.cityscapes_source, dataset_name=name), cityscapes.count,
                   cityscapes.validate_split, ALL, (19, 7), splits, ("inverse", "metric"),
                   numpy_loader=numpy_loader.CityscapesPyDataset, cityscapes_layout=True, **kwargs)


DATASETS = {
    # The synthetic set is written in the CityScapes raw layout and read by the same reader.
    "synthetic": _cityscapes("synthetic", ("train", "val"), generate=synthetic.generate_for_config),
    "cityscapes": _cityscapes("cityscapes", ("train", "val", "test")),
    "cityscapes_npy": _npy("cityscapes_npy"),
    "nyuv2": Dataset(nyuv2.nyuv2_source, nyuv2.count, nyuv2.validate_split, ALL, labels.NYUV2_NUM_CLASSES,
                     depth_targets=("metric", "inverse")),
    "nyuv2_npy": _npy("nyuv2_npy"),
    # A prepared cache holds its classes, tasks and depth unit in its manifest.
    "prepared": Dataset(prepared.prepared_source, prepared.count, prepared.validate_split, ALL + ("normals",), ()),
    # folder.Classes: the fields of a ClassTable and the ignore label
    "folder": Dataset(folder.folder_source, folder.count, folder.validate_split, ALL, (),
                      classes=lambda num_classes, data_dir: folder.read_classes(data_dir),
                      numpy_loader=numpy_loader.FolderPyDataset),
}


def dataset_entry(name) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Valid: {', '.join(DATASETS)}.")
    return DATASETS[name]


def make_source(name, data_dir, split="train", image_size=None, num_classes=None, tasks=None, depth_target=None,
                check_files=True, **options):
    """The ``pipeline.Source`` of a split; arguments left ``None`` take the reader's defaults."""
    given = dict(image_size=image_size, num_classes=num_classes, tasks=tasks, depth_target=depth_target)
    return dataset_entry(name).source(data_dir, split, check_files=check_files, **options,
                                      **{k: v for k, v in given.items() if v is not None})


_PIPELINE_ARGS = ("batch_size", "shuffle", "seed", "flip", "repeat", "drop_remainder", "cache", "num_parallel_calls",
                  "input_context", "scale_range", "crop_size", "random_crop")


def load_dataset(name, data_dir, split="train", **kwargs):
    """``(image, targets)`` batches of dataset ``name`` from ``data_dir``; ``kwargs``: :func:`make_source`'s and
    ``pipeline.load_source``'s."""
    pipeline = {k: kwargs.pop(k) for k in _PIPELINE_ARGS if k in kwargs}
    return load_source(make_source(name, data_dir, split, **kwargs), split, **pipeline)


def count_examples(name, data_dir, split):
    return dataset_entry(name).count(data_dir, split)


def class_table(name, num_classes, data_dir=None) -> ClassTable:
    """Names, colours and instance classes of dataset ``name`` with ``num_classes`` classes."""
    return dataset_entry(name).classes(num_classes, data_dir)


def write_prepared(name, data_dir, out_dir, splits=("train", "val"), image_size=(128, 256), num_classes=19,
                   tasks=None, depth_target=None, level=3, verbose=False):
    """Decodes ``splits`` of dataset ``name`` at ``image_size`` into a prepared set; returns its manifest."""
    depth_target = depth_target or dataset_entry(name).depth_targets[0]
    if num_classes is None:  # a dataset whose classes file sets them
        num_classes = len(class_table(name, None, data_dir).names)

    def make(split):
        return make_source(name, data_dir, split, image_size, num_classes, tasks, depth_target)

    return prepared.write_prepared_sources(make, name, data_dir, out_dir, splits, image_size, num_classes, depth_target,
                                           level=level, verbose=verbose)


load_cityscapes = functools.partial(load_dataset, "cityscapes")
load_nyuv2 = functools.partial(load_dataset, "nyuv2")
load_cityscapes_npy = functools.partial(load_dataset, "cityscapes_npy")
load_nyuv2_npy = functools.partial(load_dataset, "nyuv2_npy")
load_prepared = functools.partial(load_dataset, "prepared")
load_folder = functools.partial(load_dataset, "folder")
