"""CityScapes label tables (labelId -> training id), derived from ``cityscapesscripts``.

Two training label sets are supported:

* ``num_classes=19``: the official CityScapes ``trainId`` (ignored labels -> 255).
* ``num_classes=7``: the 7 categories flat, construction, object, nature, sky, human,
  vehicle (``categoryId - 1``). ``void`` and every label with ``ignoreInEval=True``
  (parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) -> 255,
  so that scores match the official category IoU.

All tables are built from ``cityscapesscripts.helpers.labels.labels``; nothing is copied
by hand.
"""

from __future__ import annotations

import numpy as np

from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
VALID_NUM_CLASSES = (7, 19)

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


def class_names(num_classes: int = 19) -> list[str]:
    """Names of the training ids 0..num_classes-1."""
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
    sky -> sky, human -> person, vehicle -> car).
    """
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
