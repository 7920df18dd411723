"""Colour maps (each ``*_to_color`` returns uint8 RGB (H, W, 3)), PNG panels of predictions and task-weight plots.

Plots use matplotlib's Agg canvas, never pyplot or the global backend, so headless training jobs can import this.
"""

import json
import os

import cv2
import numpy as np

from mtl_keras import instances as inst
from mtl_keras.labels import class_colors, class_names as cityscapes_class_names
from mtl_keras.tasks import TASKS

CITYSCAPES_PALETTE = class_colors(19)  # the colours of the 19 training ids, from the label table


def default_palette(num_classes):
    """The CityScapes palette for up to 19 classes, otherwise a deterministic PASCAL-VOC style bit palette."""
    num_classes = int(num_classes)
    if num_classes <= len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE[:num_classes].copy()
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        label, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette[c] = (r, g, b)
    return palette


def _squeeze_channel(x):
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return x


def semantic_to_color(labels, palette=None):
    """Label map (H, W) or (H, W, 1) -> RGB through ``palette`` ((C, 3), default CityScapes); labels outside
    ``[0, C)`` (the ignore label 255 among them) are black."""
    labels = _squeeze_channel(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W) or (H, W, 1), got {labels.shape}.")
    palette = CITYSCAPES_PALETTE if palette is None else np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be (C, 3), got {palette.shape}.")
    palette = palette.astype(np.uint8)
    labels = labels.astype(np.int64)
    valid = (labels >= 0) & (labels < len(palette))
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    out[valid] = palette[labels[valid]]
    return out


def _valid_mask(values, mask):
    valid = np.isfinite(values)
    if mask is not None:
        mask = _squeeze_channel(mask)
        if mask.shape != values.shape[:2]:
            raise ValueError(f"mask shape {np.shape(mask)} does not match {values.shape[:2]}.")
        keep = mask > 0.5
        valid &= keep if valid.ndim == 2 else keep[..., None]
    return valid


def _robust_max(values):
    """99th percentile of the values (robust to outliers), falling back to the max; 1 when nothing is positive."""
    if values.size == 0:
        return 1.0
    vmax = float(np.percentile(values, 99))
    if not vmax > 0:
        vmax = float(values.max())
    return vmax if vmax > 0 else 1.0


def depth_to_color(depth, mask=None, vmax=None, cmap="magma"):
    """Inverse depth (H, W) or (H, W, 1) -> RGB through ``cmap``, linear from 0 to ``vmax`` (default: the 99th
    percentile of the valid values), so near objects are bright. Masked (<= 0.5) or non-finite pixels are black."""
    import matplotlib

    depth = _squeeze_channel(depth).astype(np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W) or (H, W, 1), got {depth.shape}.")
    valid = _valid_mask(depth, mask)
    if vmax is None:
        vmax = _robust_max(depth[valid])
    vmax = float(vmax) if vmax and vmax > 0 else 1.0
    normed = np.clip(np.where(valid, depth, 0.0) / vmax, 0.0, 1.0)
    rgb = (matplotlib.colormaps[cmap](normed)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def instance_vectors_to_color(vectors, mask=None, max_magnitude=None):
    """Centroid vectors (H, W, 2) = (dy, dx) -> RGB, optical-flow style: hue the direction, value the magnitude
    over ``max_magnitude`` (default: its 99th percentile). Masked or non-finite pixels are black."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 3 or vectors.shape[-1] != 2:
        raise ValueError(f"vectors must be (H, W, 2), got {vectors.shape}.")
    valid = _valid_mask(vectors, mask).all(axis=-1)
    dy = np.where(valid, vectors[..., 0], 0.0)
    dx = np.where(valid, vectors[..., 1], 0.0)
    magnitude = np.hypot(dy, dx)
    if max_magnitude is None:
        max_magnitude = _robust_max(magnitude[valid])
    max_magnitude = float(max_magnitude) if max_magnitude and max_magnitude > 0 else 1.0
    angle = np.mod(np.arctan2(dy, dx), 2.0 * np.pi)  # [0, 2 pi)
    hsv = np.zeros(vectors.shape[:2] + (3,), dtype=np.uint8)
    hsv[..., 0] = (angle / (2.0 * np.pi) * 180.0).astype(np.uint8) % 180  # OpenCV hue range is [0, 180)
    hsv[..., 1] = 255
    hsv[..., 2] = (np.clip(magnitude / max_magnitude, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    rgb[~valid] = 0
    return rgb


def normals_to_color(normals, mask=None):
    """Surface normals (H, W, 3) -> RGB as ``(n / |n| + 1) / 2``; masked, zero or non-finite normals are black."""
    normals = np.asarray(normals, dtype=np.float64)
    if normals.ndim != 3 or normals.shape[-1] != 3:
        raise ValueError(f"normals must be (H, W, 3), got {normals.shape}.")
    norm = np.sqrt((normals ** 2).sum(axis=-1))
    valid = _valid_mask(normals, mask).all(axis=-1) & np.isfinite(norm) & (norm > 1e-6)
    unit = np.where(valid[..., None], normals, 0.0) / np.where(valid, norm, 1.0)[..., None]
    rgb = ((unit + 1.0) * 0.5 * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def instance_colors(num_instances, seed=0):
    """``num_instances`` distinct bright RGB colours (uint8 (N, 3)): golden-ratio steps in hue."""
    n = int(num_instances)
    if n <= 0:
        return np.zeros((0, 3), np.uint8)
    hue = (np.arange(n) * 0.6180339887498949 + 0.11 + 0.37 * seed) % 1.0
    hsv = np.stack([hue * 180.0, np.full(n, 220.0), np.where(np.arange(n) % 2, 255.0, 215.0)], axis=1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def instances_to_color(instance_ids, image=None, alpha=0.6, contours=True):
    """Instance ids (H, W) (0 = none) -> RGB, id k in :func:`instance_colors`' colour k, blended with opacity
    ``alpha`` over ``image`` (RGB 0..255; the rest dimmed to 60 %) or on black; ``contours``: white outlines."""
    ids = _squeeze_channel(instance_ids).astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f"instance_ids must be (H, W), got {np.shape(instance_ids)}.")
    colours = np.concatenate([np.zeros((1, 3), np.uint8), instance_colors(int(max(ids.max(initial=0), 0)))])
    layer = colours[np.clip(ids, 0, None)]
    inside = ids > 0
    if image is None:
        out = layer.copy()
    else:
        base = _image_to_uint8(image)
        if base.shape[:2] != ids.shape:
            base = cv2.resize(base, (ids.shape[1], ids.shape[0]), interpolation=cv2.INTER_LINEAR)
        out = (base.astype(np.float32) * 0.6).astype(np.uint8)
        blend = base.astype(np.float32) * (1.0 - alpha) + layer.astype(np.float32) * alpha
        out[inside] = np.clip(blend[inside] + 0.5, 0, 255).astype(np.uint8)
    if contours and inside.any():
        padded = np.pad(ids, 1, mode="edge")
        edge = np.zeros_like(inside)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            edge |= padded[dy:dy + ids.shape[0], dx:dx + ids.shape[1]] != ids
        out[edge & inside] = 255
    return out


def _make_parent(path):
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)


def save_rgb(path, rgb):
    """Writes a uint8 RGB array as a PNG (creating folders); returns ``path``."""
    rgb = np.asarray(rgb)
    _make_parent(path)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write {path}.")
    return path


def sigma2_history(metrics):
    """The ``*sigma2*`` series of a run's ``metrics.json`` (dict or path), from ``train_history`` else the top level."""
    if isinstance(metrics, (str, os.PathLike)):
        with open(metrics) as f:
            metrics = json.load(f)
    history = metrics.get("train_history") or {}
    series = {k: v for k, v in history.items() if "sigma2" in k and isinstance(v, (list, tuple)) and len(v)}
    if not series:
        series = {k: v for k, v in metrics.items() if "sigma2" in k and isinstance(v, (list, tuple)) and len(v)}
    return {k: [float("nan") if x is None else float(x) for x in v] for k, v in sorted(series.items())}


# --------------------------------------------------------------------------------------------------------------- Panels

TITLE_HEIGHT = 20  # px, as every size below
LEGEND_LINE_HEIGHT = 20
LEGEND_SWATCH = 14  # side of a legend swatch (a 1-px grey frame around the class colour)
COLORBAR_WIDTH = 72  # the depth colour-bar column (at least; wider if its labels need it)
COLORBAR_MARGIN = 6  # gap between the last tile and the bar
COLORBAR_BAR = 12
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.45
_SWATCH_FRAME = (160, 160, 160)


def _unbatch(x):  # (1, H, W, ...) -> (H, W, ...)
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    return x


def _image_to_uint8(image):
    image = _unbatch(image).astype(np.float64)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}.")
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _semantic_labels(x):
    x = _unbatch(x)
    if x.ndim == 3 and x.shape[-1] > 1:  # logits
        return np.argmax(x, axis=-1)
    return _squeeze_channel(x)


def _put_text(canvas, text, origin, colour=(255, 255, 255)):
    cv2.putText(canvas, text, origin, _FONT, _FONT_SCALE, colour, 1, cv2.LINE_AA)


def _text_width(text):
    return cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0]


def _tile(rgb, title, height, width):
    """``rgb`` resized (nearest) under a title strip; ``None`` (the task missing on that side): a grey tile."""
    if rgb is None:
        rgb = np.full((height, width, 3), 40, dtype=np.uint8)
    elif rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_NEAREST)
    strip = np.zeros((TITLE_HEIGHT, width, 3), dtype=np.uint8)
    _put_text(strip, title, (3, TITLE_HEIGHT - 6))
    return np.concatenate([strip, rgb], axis=0)


def _match_instance_ids(pred_ids, true_ids):
    """``pred_ids`` renumbered so that matched objects share a colour in both rows: greedily by decreasing overlap,
    each true id taken once; unmatched instances get ids after the largest true id."""
    pred_ids = np.asarray(pred_ids, np.int64)
    if true_ids is None or np.shape(true_ids) != pred_ids.shape or not (pred_ids > 0).any():
        return pred_ids
    true_ids = np.asarray(true_ids, np.int64)
    both = (pred_ids > 0) & (true_ids > 0)
    pairs, counts = np.unique(np.stack([pred_ids[both], true_ids[both]], axis=1), axis=0, return_counts=True)
    mapping, used = {}, set()
    for k in np.argsort(-counts, kind="stable"):
        p, t = int(pairs[k, 0]), int(pairs[k, 1])
        if p not in mapping and t not in used:
            mapping[p] = t
            used.add(t)
    next_id = int(true_ids.max(initial=0)) + 1
    for p in np.unique(pred_ids[pred_ids > 0]):
        if int(p) not in mapping:
            mapping[int(p)] = next_id
            next_id += 1
    lut = np.zeros(int(pred_ids.max()) + 1, np.int64)
    for p, t in mapping.items():
        lut[p] = t
    return np.where(pred_ids > 0, lut[np.clip(pred_ids, 0, None)], 0)


def default_class_names(num_classes):
    """Legend names: the first CityScapes training-id names for up to 19 classes, ``"class N"`` otherwise."""
    num_classes = int(num_classes)
    if num_classes <= 19:
        return list(cityscapes_class_names(19))[:num_classes]
    return [f"class {c}" for c in range(num_classes)]


def render_legend(classes, palette, class_names, width):
    """RGB legend rows: a framed swatch and the name of each class id in ``classes``, wrapped to fit ``width``."""
    palette = np.asarray(palette, dtype=np.uint8)
    entries = []
    for c in classes:
        c = int(c)
        name = class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
        entries.append((c, str(name), LEGEND_SWATCH + 4 + _text_width(str(name))))
    lines, line, x = [], [], 4
    for c, name, w in entries:
        if line and x + w > width - 2:
            lines.append(line)
            line, x = [], 4
        line.append((c, name, x))
        x += w + 12
    if line:
        lines.append(line)
    out = np.zeros((len(lines) * LEGEND_LINE_HEIGHT, width, 3), dtype=np.uint8)
    top = (LEGEND_LINE_HEIGHT - LEGEND_SWATCH) // 2
    for i, line in enumerate(lines):
        y0 = i * LEGEND_LINE_HEIGHT
        for c, name, x0 in line:
            out[y0 + top:y0 + top + LEGEND_SWATCH, x0:x0 + LEGEND_SWATCH] = _SWATCH_FRAME
            out[y0 + top + 1:y0 + top + LEGEND_SWATCH - 1, x0 + 1:x0 + LEGEND_SWATCH - 1] = palette[c]
            _put_text(out, name, (x0 + LEGEND_SWATCH + 4, y0 + LEGEND_LINE_HEIGHT - 6))
    return out


def render_colorbar(height, vmax, cmap="magma", top=TITLE_HEIGHT):
    """The depth colour-bar column (RGB): from row ``top`` down, ``vmax`` to 0 as :func:`depth_to_color` maps
    them, labelled in disparity pixels."""
    import matplotlib

    high, low = f"{vmax:.3g} px", "0 px"
    x0 = COLORBAR_MARGIN
    x1 = x0 + COLORBAR_BAR
    width = max(COLORBAR_WIDTH, x1 + 5 + max(_text_width(high), _text_width(low)) + 3)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    n = height - top
    if n <= 0:
        return out
    values = np.linspace(1.0, 0.0, n) if n > 1 else np.ones(1)
    colours = (matplotlib.colormaps[cmap](values)[:, :3] * 255.0 + 0.5).astype(np.uint8)
    out[top:, x0:x1] = colours[:, None, :]
    text_h = cv2.getTextSize(high, _FONT, _FONT_SCALE, 1)[0][1]
    if n >= 2 * text_h + 6:  # both labels beside the bar, aligned with its ends
        high_y = top + text_h
    else:  # a short bar (one small row): the vmax label goes into the title strip above it
        high_y = max(top - 5, text_h)
    _put_text(out, high, (x1 + 5, high_y))
    _put_text(out, low, (x1 + 5, height - 2))
    return out


def _panel_palette(prediction, pred_sem, palette, class_names):
    """The palette (default: one colour per logit, 19 for label maps) and legend names of a panel."""
    if palette is None:
        logits = _unbatch(prediction["semantic"]) if pred_sem is not None else None
        num_classes = logits.shape[-1] if logits is not None and logits.ndim == 3 and logits.shape[-1] > 1 else 19
        palette = default_palette(num_classes)
    palette = np.asarray(palette, dtype=np.uint8)
    return palette, default_class_names(len(palette)) if class_names is None else class_names


def _panel_instance_ids(prediction, target, cluster, instance_ids, instance_classes):
    """(show the instances column, predicted ids renumbered after the true ones, true ids) of a panel."""
    pred_ids = None if instance_ids is None else _squeeze_channel(_unbatch(instance_ids)).astype(np.int64)
    show = pred_ids is not None or (cluster and "semantic" in prediction and "instance" in prediction)
    if show and pred_ids is None:
        semantic = _unbatch(prediction["semantic"])
        num_classes = semantic.shape[-1] if semantic.ndim == 3 and semantic.shape[-1] > 1 else None
        try:
            pred_ids = inst.cluster_instances(semantic, _unbatch(prediction["instance"]).astype(np.float32),
                                              num_classes=num_classes, instance_classes=instance_classes).ids
        except ValueError:  # no default instance classes for this many classes: a placeholder tile
            pred_ids = None
    true_ids = None
    mask_key = TASKS["instance"].mask
    if show and target is not None and "instance" in target and mask_key in target:
        true_ids = inst.instance_ids_from_vectors(_unbatch(target["instance"]), _unbatch(target[mask_key]))
    if pred_ids is not None:
        pred_ids = _match_instance_ids(pred_ids, true_ids)
    return show, pred_ids, true_ids


def _mask_of(where, task):
    key = TASKS[task].mask
    return _unbatch(where[key]) if key in where else None


def _panel_scales(prediction, target):
    """(depth vmax, vector vmax) shared by both rows: from the ground truth (depth: else from the prediction)."""
    depth_vmax = vector_vmax = None
    source = target if target is not None and "depth" in target else prediction
    if "depth" in source:
        d = _squeeze_channel(_unbatch(source["depth"])).astype(np.float64)
        depth_vmax = _robust_max(d[_valid_mask(d, _mask_of(target, "depth") if source is target else None)])
    if target is not None and "instance" in target:
        v = _unbatch(target["instance"]).astype(np.float64)
        valid = _valid_mask(v, _mask_of(target, "instance")).all(axis=-1)
        vector_vmax = _robust_max(np.hypot(v[..., 0], v[..., 1])[valid])
    return depth_vmax, vector_vmax


def _task_tile_rgb(task, source, is_target, target, palette, depth_vmax, vector_vmax):
    """The colour image of one task's tile, or None when ``source`` lacks the task."""
    if task not in source:
        return None
    x = _unbatch(source[task])
    if task == "semantic":
        return semantic_to_color(_semantic_labels(x) if not is_target else _squeeze_channel(x), palette)
    mask = _mask_of(source, task) if is_target else None
    if task == "depth":
        return depth_to_color(x, mask=mask, vmax=depth_vmax)
    if task == "instance":  # predicted vectors on the ground-truth instance pixels when those are known
        return instance_vectors_to_color(x, mask=_mask_of(source if is_target else (target or {}), task),
                                         max_magnitude=vector_vmax)
    # Any other task of the table: 3 channels as normals, else its (per-pixel norm's) value on a colour map.
    if x.ndim == 3 and x.shape[-1] == 3:
        return normals_to_color(x, mask=mask)
    value = _squeeze_channel(x)
    value = np.sqrt((np.asarray(value, np.float64) ** 2).sum(axis=-1)) if value.ndim == 3 else value
    return depth_to_color(value, mask=mask, cmap="viridis")


def _add_colorbar_and_legend(panel, tasks, depth_vmax, label_maps, palette, class_names):
    """The depth colour bar at the right (with a depth column) and the legend of the classes in ``label_maps``."""
    if "depth" in tasks:
        panel = np.concatenate([panel, render_colorbar(panel.shape[0], depth_vmax)], axis=1)
    label_maps = [labels for labels in label_maps if labels is not None]
    if label_maps:
        present = {int(c) for labels in label_maps for c in np.unique(labels) if 0 <= c < len(palette)}
        panel = np.concatenate([panel, render_legend(sorted(present), palette, class_names, panel.shape[1])], axis=0)
    return panel


def panel_tasks(prediction, target=None):
    """The tasks a panel draws, one tile each under its display name: those of the task table in ``prediction`` or
    ``target``, in the table's order."""
    return [t for t in TASKS if t in prediction or (target is not None and t in target)]


def save_prediction_panel(path, image, prediction, target=None, palette=None, class_names=None, cluster=True,
                          instance_ids=None, instance_classes=None):
    """Writes a PNG of one image's prediction (row 1) over its ground truth (row 2, optional); returns ``path``.

    ``image``: (H, W, 3) RGB 0..255; ``prediction`` / ``target``: per-image dicts of task outputs and the targets'
    masks. The instances column shows ``instance_ids`` or, with ``cluster``, the clustered ids, renumbered after the
    true instances they overlap; depth and vector scales come from the ground truth.
    """
    img = _image_to_uint8(image)
    height, width = img.shape[:2]
    prediction = {k: v for k, v in (prediction or {}).items() if v is not None}
    target = {k: v for k, v in (target or {}).items() if v is not None} if target is not None else None
    tasks = panel_tasks(prediction, target)
    pred_sem = _semantic_labels(prediction["semantic"]) if "semantic" in prediction else None
    true_sem = (_squeeze_channel(_unbatch(target["semantic"])) if target is not None and "semantic" in target
                else None)
    palette, class_names = _panel_palette(prediction, pred_sem, palette, class_names)
    show_instances, pred_ids, true_ids = _panel_instance_ids(prediction, target, cluster, instance_ids,
                                                             instance_classes)
    depth_vmax, vector_vmax = _panel_scales(prediction, target)

    def instances_tile(ids, side):
        if ids is None:
            return _tile(None, f"{side} instances", height, width)
        count = len(np.unique(ids[ids > 0]))
        return _tile(instances_to_color(ids, img), f"{side} instances ({count})", height, width)

    def row(first, source, side, is_target):
        tiles = [first]
        for t in tasks:
            rgb = _task_tile_rgb(t, source, is_target, target, palette, depth_vmax, vector_vmax)
            tiles.append(_tile(rgb, f"{side} {TASKS[t].display_name}", height, width))
            if t == "instance" and show_instances:
                tiles.append(instances_tile(true_ids if is_target else pred_ids, side))
        if show_instances and "instance" not in tasks:  # precomputed ids without vectors
            tiles.insert(2 if "semantic" in tasks else 1, instances_tile(true_ids if is_target else pred_ids, side))
        return np.concatenate(tiles, axis=1)

    rows = [row(_tile(img, "input", height, width), prediction, "pred", False)]
    if target is not None:
        overlay = img
        if pred_sem is not None:
            colour = semantic_to_color(pred_sem, palette)
            if colour.shape[:2] != (height, width):
                colour = cv2.resize(colour, (width, height), interpolation=cv2.INTER_NEAREST)
            overlay = cv2.addWeighted(img, 0.5, colour, 0.5, 0.0)
        first = _tile(overlay, "input + pred semantic" if pred_sem is not None else "input", height, width)
        rows.append(row(first, target, "true", True))
    return save_rgb(path, _add_colorbar_and_legend(np.concatenate(rows, axis=0), tasks, depth_vmax,
                                                   (pred_sem, true_sem), palette, class_names))


# ---------------------------------------------------------------------------------------------------- Task-weight plots

_SIGMA2, _WEIGHT = "_sigma2", "_weight"


def _positive_log_axis(ax, values, require_range=1.0):
    # log y-axis when all finite values are positive and max / min >= require_range
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if finite.size and (finite > 0).all() and finite.max() / finite.min() >= require_range:
        ax.set_yscale("log")
        return True
    return False


def _plot_series(ax, values, colour, label, x=None):
    # x: the recorded step of each point when it was given for this series' length; else the point index
    x = x if x is not None and len(x) == len(values) else np.arange(len(values))
    ax.plot(x, values, marker="o" if len(values) < 50 else None, markersize=3, color=colour, label=label)


def task_weights_figure(history, title=None, xlabel="epoch"):
    """The ``Figure`` of :func:`plot_task_weights`: sigma^2 over the effective weight when both series exist (other
    series on a third axes), else one axes; the legend outside at the right, so it never covers a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if hasattr(history, "history") and isinstance(history.history, dict):
        history = history.history
    series = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in dict(history).items()}
    series = {k: v for k, v in series.items() if v.size}
    steps = series.pop("step", None)  # WeightingHistory's x values: the step of each recorded point
    if not series:
        raise ValueError("history has no non-empty series to plot.")

    sigma2 = {k[:-len(_SIGMA2)]: v for k, v in series.items() if k.endswith(_SIGMA2)}
    weight = {k[:-len(_WEIGHT)]: v for k, v in series.items() if k.endswith(_WEIGHT)}
    cycle = ["C%d" % i for i in range(10)]
    other = {k: v for k, v in series.items() if not (k.endswith(_SIGMA2) or k.endswith(_WEIGHT))}
    panels = (3 if other else 2) if sigma2 and weight else 1
    fig = Figure(figsize=(8, 2.6 * panels + 0.6) if panels > 1 else (8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if sigma2 and weight:
        tasks = list(dict.fromkeys([k[:-len(_SIGMA2)] if k.endswith(_SIGMA2) else k[:-len(_WEIGHT)]
                                    for k in series if k.endswith(_SIGMA2) or k.endswith(_WEIGHT)]))
        colours = {t: cycle[i % len(cycle)] for i, t in enumerate(tasks)}
        axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
        handles = {}
        for task in tasks:
            for ax, group in ((axes[0], sigma2), (axes[1], weight)):
                if task in group:
                    _plot_series(ax, group[task], colours[task], task, steps)
            handles[task] = (axes[0] if task in sigma2 else axes[1]).lines[-1]
        log = _positive_log_axis(axes[0], list(sigma2.values()))
        axes[0].set_ylabel(r"$\sigma^2$" + (" (log)" if log else ""))
        log = _positive_log_axis(axes[1], list(weight.values()), require_range=50.0)
        axes[1].set_ylabel("effective weight" + (" (log)" if log else ""))
        for i, (name, values) in enumerate(other.items()):
            _plot_series(axes[2], values, cycle[(len(tasks) + i) % len(cycle)], name, steps)
            handles[name] = axes[2].lines[-1]
        if other:
            _positive_log_axis(axes[2], list(other.values()))
            axes[2].set_ylabel("value")
        labels, handles = list(handles), list(handles.values())
    else:
        axes = [fig.add_subplot(1, 1, 1)]
        for i, (name, values) in enumerate(series.items()):
            _plot_series(axes[0], values, cycle[i % len(cycle)], name, steps)
        _positive_log_axis(axes[0], list(series.values()))
        axes[0].set_ylabel(r"$\sigma^2$" if all(k.endswith(_SIGMA2) for k in series)
                           else "weight" if all(k.endswith(_WEIGHT) for k in series) else "value")
        handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return fig


def plot_task_weights(history, path, title=None, xlabel="epoch"):
    """Writes a PNG of ``history`` (``{series: floats}`` or a Keras ``History``) against its ``"step"`` series where
    the lengths match, else the index; returns ``path``."""
    fig = task_weights_figure(history, title=title, xlabel=xlabel)
    _make_parent(path)
    fig.savefig(os.fspath(path), format="png")
    return path

