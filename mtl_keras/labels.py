"""Label tables: CityScapes labelId -> training id, built from ``cityscapesscripts``' table (nothing copied by hand).

19 classes: the official ``trainId``. 7 classes: the categories (``categoryId - 1``), with ``void`` and every label
``ignoreInEval`` -> 255, so scores match the official category IoU. NYUv2 names (13 / 40 classes): Couprie et al.'s
``class13Mapping.mat`` and Gupta et al.'s ``classMapping40.mat`` in the order of their 1-based ids.
"""

from __future__ import annotations

import colorsys

import numpy as np

from cityscapesscripts.helpers.labels import labels as _CS_LABELS

from mtl_keras.tasks import IGNORE_LABEL as IGNORE_INDEX
VALID_NUM_CLASSES = (7, 19)

# NYUv2: names of the 13 and 40 classes (ids 1..13 / 1..40 in the mapping files -> training ids 0..12 / 0..39).
NYUV2_13_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
                  "tv", "wall", "window")
NYUV2_40_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                  "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
                  "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
                  "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
                  "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
# 40 -> 13 (1-based), as distributed in class13Mapping.mat (classMapping13.labels13).
NYUV2_40_TO_13 = (12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2, 6, 11, 7, 7, 7, 7, 7,
                  7, 6, 7, 7, 7, 7, 7, 7, 6, 7)
NYUV2_NUM_CLASSES = (13, 40)

# Labels that can appear in a labelIds PNG (license plate has id -1 and never appears).
_PNG_LABELS = tuple(l for l in _CS_LABELS if 0 <= l.id <= 255)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or int(num_classes) not in VALID_NUM_CLASSES:
        raise ValueError(
            f"num_classes must be one of {VALID_NUM_CLASSES} (19 = CityScapes trainIds, "
            f"7 = CityScapes categories), got num_classes={num_classes!r}")
    return int(num_classes)


def _train_id(label, num_classes: int) -> int:
    if num_classes == 19:
        return label.trainId if 0 <= label.trainId < 19 else IGNORE_INDEX
    # 7 categories
    if label.categoryId == 0 or label.ignoreInEval:
        return IGNORE_INDEX
    return label.categoryId - 1


def known_label_mask() -> np.ndarray:
    """bool array of size 256: True for labelIds that exist in the CityScapes table."""
    mask = np.zeros(256, dtype=bool)
    mask[[l.id for l in _PNG_LABELS]] = True
    return mask


def label_lookup_table(num_classes: int = 19) -> np.ndarray:
    """uint8 array of size 256 mapping a CityScapes labelId to a training id (255 = ignore, also for the ids
    34..255 outside the table, which the loader refuses)."""
    num_classes = _check_num_classes(num_classes)
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in _PNG_LABELS:
        table[label.id] = _train_id(label, num_classes)
    return table


def _first_per_train_id(num_classes: int, value) -> list:
    """``value(label)`` of the first label in the CityScapes table of each training id 0..num_classes-1."""
    first = {}
    for label in _PNG_LABELS:
        first.setdefault(_train_id(label, num_classes), value(label))
    return [first[t] for t in range(num_classes)]


def _nyuv2_palette(num_classes: int) -> np.ndarray:
    """A fixed, well separated palette for the NYUv2 classes (golden-angle hues, alternating brightness)."""
    colors = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 if i % 2 else 0.85, 0.95 if i % 3 else 0.7)
              for i in range(num_classes)]
    return np.round(np.array(colors) * 255).astype(np.uint8)


def _is_nyuv2(num_classes) -> bool:
    return (not isinstance(num_classes, bool) and isinstance(num_classes, (int, np.integer))
            and int(num_classes) in NYUV2_NUM_CLASSES)


def class_names(num_classes: int = 19) -> list[str]:
    """Names of the training ids 0..num_classes-1 (CityScapes 19 / 7, NYUv2 13 / 40)."""
    if _is_nyuv2(num_classes):
        return list(NYUV2_13_NAMES if int(num_classes) == 13 else NYUV2_40_NAMES)
    num_classes = _check_num_classes(num_classes)
    return _first_per_train_id(num_classes, lambda label: label.name if num_classes == 19 else label.category)


def class_colors(num_classes: int = 19) -> np.ndarray:
    """uint8 RGB (num_classes, 3): the CityScapes palette (a category: its first label's colour, e.g. flat ->
    road), or NYUv2's fixed palette."""
    if _is_nyuv2(num_classes):
        return _nyuv2_palette(int(num_classes))
    num_classes = _check_num_classes(num_classes)
    return np.array(_first_per_train_id(num_classes, lambda label: label.color), dtype=np.uint8)


def train_id_to_label_id(num_classes: int = 19) -> np.ndarray:
    """int32 (num_classes,): a labelId per training id, the exact inverse for 19 classes (what the official
    evaluator expects in prediction PNGs), the first label of each category for 7."""
    num_classes = _check_num_classes(num_classes)
    return np.array(_first_per_train_id(num_classes, lambda label: label.id), dtype=np.int32)


def instance_label_ids() -> list[int]:
    """CityScapes labelIds whose objects carry instances (``hasInstances``): 24..33."""
    return sorted(l.id for l in _PNG_LABELS if l.hasInstances)


def instance_train_ids(num_classes: int = 19) -> list[int]:
    """Training ids whose pixels carry instances: 11..18 (person ... bicycle) of 19, 5 and 6 (human, vehicle) of 7;
    not the ignored caravan and trailer."""
    num_classes = _check_num_classes(num_classes)
    ids = {_train_id(l, num_classes) for l in _PNG_LABELS if l.hasInstances}
    ids.discard(IGNORE_INDEX)
    return sorted(ids)
