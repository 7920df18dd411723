"""CityScapes label tables (labelId -> training id), derived from ``cityscapesscripts``.

Two training label sets are supported:

* ``num_classes=19``: the official CityScapes ``trainId`` (ignored labels -> 255).
* ``num_classes=7``: the 7 categories flat, construction, object, nature, sky, human,
  vehicle (``categoryId - 1``). ``void`` and every label with ``ignoreInEval=True``
  (parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) -> 255,
  so that scores match the official category IoU.

All tables are built from ``cityscapesscripts.helpers.labels.labels``; nothing is copied
by hand.

NYUv2 (``class_names`` / ``class_colors`` with 13 or 40 classes): the 40 classes of Gupta et al.
(``classMapping40.mat``) and the 13 classes of Couprie et al. (``class13Mapping.mat``), in the order of their
1-based ids; the loaders read the mappings from the user's files (``mtl_keras.data.nyuv2``).
"""

from __future__ import annotations

import numpy as np

from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
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


def known_label_ids() -> np.ndarray:
    """Sorted labelIds that exist in the CityScapes table (0..33)."""
    return np.array(sorted(l.id for l in _PNG_LABELS), dtype=np.int32)


def known_label_mask() -> np.ndarray:
    """bool array of size 256: True for labelIds that exist in the CityScapes table."""
    mask = np.zeros(256, dtype=bool)
    mask[known_label_ids()] = True
    return mask


def label_lookup_table(num_classes: int = 19) -> np.ndarray:
    """uint8 array of size 256 mapping a CityScapes labelId to a training id (255 = ignore).

    Ids with no entry in the CityScapes table (34..255) also map to 255 here; the loader
    raises an error on them instead of silently ignoring them.
    """
    num_classes = _check_num_classes(num_classes)
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in _PNG_LABELS:
        table[label.id] = _train_id(label, num_classes)
    return table


def _nyuv2_palette(num_classes: int) -> np.ndarray:
    """A fixed, well separated palette for the NYUv2 classes (golden-angle hues, alternating brightness)."""
    import colorsys

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
    names: list[str | None] = [None] * num_classes
    for label in _PNG_LABELS:
        t = _train_id(label, num_classes)
        if t != IGNORE_INDEX and names[t] is None:
            names[t] = label.name if num_classes == 19 else label.category
    assert all(n is not None for n in names), names
    return names  # type: ignore[return-value]


def class_colors(num_classes: int = 19) -> np.ndarray:
    """uint8 array (num_classes, 3) of RGB colours (the CityScapes palette).

    For 7 classes each category takes the colour of its first label in the table
    (flat -> road, construction -> building, object -> pole, nature -> vegetation,
    sky -> sky, human -> person, vehicle -> car). NYUv2 (13 or 40 classes): a fixed palette.
    """
    if _is_nyuv2(num_classes):
        return _nyuv2_palette(int(num_classes))
    num_classes = _check_num_classes(num_classes)
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    seen = [False] * num_classes
    for label in _PNG_LABELS:
        t = _train_id(label, num_classes)
        if t != IGNORE_INDEX and not seen[t]:
            colors[t] = label.color
            seen[t] = True
    return colors


def train_id_to_label_id(num_classes: int = 19) -> np.ndarray:
    """int32 array (num_classes,) giving a representative CityScapes labelId per training id.

    For 19 classes this is the exact inverse (what the official evaluator expects for
    prediction PNGs). For 7 classes it is the first label of each category.
    """
    num_classes = _check_num_classes(num_classes)
    out = np.full(num_classes, -1, dtype=np.int32)
    for label in _PNG_LABELS:
        t = _train_id(label, num_classes)
        if t != IGNORE_INDEX and out[t] < 0:
            out[t] = label.id
    return out


def instance_label_ids() -> list[int]:
    """CityScapes labelIds whose objects carry instances (``hasInstances``): 24..33."""
    return sorted(l.id for l in _PNG_LABELS if l.hasInstances)


def instance_train_ids(num_classes: int = 19) -> list[int]:
    """Training ids whose pixels carry instances.

    19 classes: person, rider, car, truck, bus, train, motorcycle, bicycle (11..18);
    7 classes: human, vehicle (5, 6). Ignored labels (caravan, trailer) are not included.
    """
    num_classes = _check_num_classes(num_classes)
    ids = {_train_id(l, num_classes) for l in _PNG_LABELS if l.hasInstances}
    ids.discard(IGNORE_INDEX)
    return sorted(ids)
