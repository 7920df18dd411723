"""Data: the dataset registry (``datasets.DATASETS``), one reader per format, one tf.data pipeline (``pipeline``)
and one joint augmentation (``augment``). TensorFlow is imported only where a pipeline is built, so the registry and
the readers' listings and checks import without it."""

from mtl_keras.data import augment, checks, cityscapes, folder, npy_release, nyuv2, pipeline, prepared, synthetic
from mtl_keras.data.augment import AugmentConfig, augment_example
from mtl_keras.data.checks import DataError
from mtl_keras.data.cityscapes import list_cityscapes_files
from mtl_keras.data.datasets import (DATASETS, count_examples, dataset_entry, load_cityscapes, load_cityscapes_npy,
                                     load_dataset, load_folder, load_nyuv2, load_nyuv2_npy, load_prepared,
                                     write_prepared)
from mtl_keras.data.pipeline import centroid_vectors
from mtl_keras.data.synthetic import generate_synthetic_cityscapes
from mtl_keras.labels import (IGNORE_INDEX, class_colors, class_names, instance_label_ids, instance_train_ids,
                              label_lookup_table, train_id_to_label_id)
