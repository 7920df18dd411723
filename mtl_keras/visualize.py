"""Colour maps and PNG panels for multi-task predictions, and plots of the learned task weights.

Every ``*_to_color`` function returns a uint8 RGB image (H, W, 3). Files are written with OpenCV (panels) or
matplotlib's Agg canvas (plots); pyplot and the global matplotlib backend are never touched, so this module is safe
to import in headless training jobs.
"""

import os

import cv2
import numpy as np

# CityScapes colours of the 19 training ids (cityscapesscripts.helpers.labels, trainId 0..18).
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


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
    """Integer label map (H, W) or (H, W, 1) -> uint8 RGB (H, W, 3) through ``palette`` ((C, 3) uint8).

    The ignore label 255, and any other label outside ``[0, C)``, is black. ``palette=None``: CityScapes colours.
    """
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
    """Inverse depth (H, W) or (H, W, 1) -> uint8 RGB (H, W, 3) with a matplotlib colormap (default "magma").

    Values are scaled linearly from 0 to ``vmax`` (default: 99th percentile of the valid values) and clipped, so
    near objects (large inverse depth) are bright. Pixels where ``mask`` <= 0.5 or the value is not finite are black.
    """
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
    """Centroid vectors (H, W, 2) = (dy, dx) -> uint8 RGB (H, W, 3), optical-flow style.

    Hue encodes the direction ``atan2(dy, dx)``, value the magnitude scaled by ``max_magnitude`` (default: 99th
    percentile of the valid magnitudes), saturation is full. Pixels where ``mask`` <= 0.5 (e.g. ``instance_mask``),
    or the vector is not finite, are black.
    """
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
    """Surface normals (H, W, 3) -> uint8 RGB (H, W, 3) as ``(n / |n| + 1) / 2`` (the usual rendering); pixels where
    ``mask`` <= 0.5, the normal is zero or not finite are black."""
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
    """``num_instances`` distinct, deterministic bright RGB colours (uint8 (N, 3)): golden-ratio steps in hue."""
    n = int(num_instances)
    if n <= 0:
        return np.zeros((0, 3), np.uint8)
    hue = (np.arange(n) * 0.6180339887498949 + 0.11 + 0.37 * seed) % 1.0
    hsv = np.stack([hue * 180.0, np.full(n, 220.0), np.where(np.arange(n) % 2, 255.0, 215.0)], axis=1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def instances_to_color(instance_ids, image=None, alpha=0.6, contours=True):
    """Instance id map (H, W) (0 = none, k = instance k) -> uint8 RGB (H, W, 3) with one colour per instance.

    With ``image`` ((H, W, 3) RGB 0..255) the instances are blended over it with opacity ``alpha`` and the rest of
    the image is dimmed to 60 %; without, the background is black. ``contours`` draws a white 1-px outline around
    each instance. Colours follow :func:`instance_colors` by id, so the same id always has the same colour.
    """
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


def save_rgb(path, rgb):
    """Writes a uint8 RGB array as a PNG (creating folders); returns ``path``."""
    rgb = np.asarray(rgb)
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write {path}.")
    return path


def sigma2_history(metrics):
    """The learned sigma^2 series of a training run: ``{"semantic_sigma2": [...], ...}``.

    ``metrics``: the dict of a run folder's ``metrics.json`` (or its path). Reads ``train_history`` (one value per
    epoch); falls back to ``sigma2_<task>`` / ``<task>_sigma2`` series anywhere at its top level. Returns ``{}``
    when the run has none (e.g. equal or fixed weighting).
    """
    if isinstance(metrics, (str, os.PathLike)):
        import json

        with open(metrics) as f:
            metrics = json.load(f)
    history = metrics.get("train_history") or {}
    series = {k: v for k, v in history.items() if "sigma2" in k and isinstance(v, (list, tuple)) and len(v)}
    if not series:
        series = {k: v for k, v in metrics.items() if "sigma2" in k and isinstance(v, (list, tuple)) and len(v)}
    return {k: [float("nan") if x is None else float(x) for x in v] for k, v in sorted(series.items())}


# ----------------------------------------------------------------------------------------------------------------
# Panels
# ----------------------------------------------------------------------------------------------------------------

TITLE_HEIGHT = 20


def _unbatch(x):
    """(1, H, W, ...) -> (H, W, ...); leaves unbatched arrays alone."""
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


def _tile(rgb, title, height, width):
    """Resizes ``rgb`` to (height, width) (nearest) and puts a black title strip on top."""
    if rgb is None:
        rgb = np.full((height, width, 3), 40, dtype=np.uint8)
    elif rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_NEAREST)
    strip = np.zeros((TITLE_HEIGHT, width, 3), dtype=np.uint8)
    cv2.putText(strip, title, (3, TITLE_HEIGHT - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                cv2.LINE_AA)
    return np.concatenate([strip, rgb], axis=0)


def render_prediction_panel(image, prediction, target=None, palette=None):
    """The panel of :func:`save_prediction_panel` as a uint8 RGB array, without writing it."""
    img = _image_to_uint8(image)
    height, width = img.shape[:2]
    prediction = {k: v for k, v in (prediction or {}).items() if v is not None}
    target = {k: v for k, v in (target or {}).items() if v is not None} if target is not None else None
    tasks = [t for t in ("semantic", "instance", "depth")
             if t in prediction or (target is not None and t in target)]

    pred_sem = _semantic_labels(prediction["semantic"]) if "semantic" in prediction else None
    if palette is None:
        num_classes = np.asarray(prediction["semantic"]).shape[-1] if pred_sem is not None else 19
        palette = default_palette(max(int(num_classes), 1))

    # Shared scales so that prediction and ground truth are comparable.
    depth_vmax = vector_vmax = None
    if target is not None and "depth" in target:
        d = _squeeze_channel(_unbatch(target["depth"])).astype(np.float64)
        m = target.get("depth_mask")
        valid = _valid_mask(d, None if m is None else _unbatch(m))
        depth_vmax = _robust_max(d[valid])
    if target is not None and "instance" in target:
        v = _unbatch(target["instance"]).astype(np.float64)
        m = target.get("instance_mask")
        valid = _valid_mask(v, None if m is None else _unbatch(m)).all(axis=-1)
        vector_vmax = _robust_max(np.hypot(v[..., 0], v[..., 1])[valid])

    def render(task, source, is_target):
        if task not in source:
            return None
        x = _unbatch(source[task])
        if task == "semantic":
            return semantic_to_color(_semantic_labels(x) if not is_target else _squeeze_channel(x), palette)
        if task == "depth":
            mask = _unbatch(source["depth_mask"]) if is_target and "depth_mask" in source else None
            return depth_to_color(x, mask=mask, vmax=depth_vmax)
        # Predicted vectors are shown on the ground-truth instance pixels when those are known.
        mask_source = source if is_target else (target or {})
        mask = _unbatch(mask_source["instance_mask"]) if "instance_mask" in mask_source else None
        return instance_vectors_to_color(x, mask=mask, max_magnitude=vector_vmax)

    names = {"semantic": "semantic", "instance": "instance vectors", "depth": "inverse depth"}
    rows = [[_tile(img, "input", height, width)]
            + [_tile(render(t, prediction, False), f"pred {names[t]}", height, width) for t in tasks]]
    if target is not None:
        overlay = img
        if pred_sem is not None:
            colour = semantic_to_color(pred_sem, palette)
            if colour.shape[:2] != (height, width):
                colour = cv2.resize(colour, (width, height), interpolation=cv2.INTER_NEAREST)
            overlay = cv2.addWeighted(img, 0.5, colour, 0.5, 0.0)
        rows.append([_tile(overlay, "input + pred semantic" if pred_sem is not None else "input", height, width)]
                    + [_tile(render(t, target, True), f"true {names[t]}", height, width) for t in tasks])
    return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)


def save_prediction_panel(path, image, prediction, target=None, palette=None):
    """Writes one PNG comparing a prediction (and optionally its ground truth) for a single image.

    ``image``: (H, W, 3) float RGB 0..255 (or (1, H, W, 3)). ``prediction`` / ``target``: dicts of per-image arrays
    (a leading batch axis of 1 is dropped) with any subset of ``"semantic"`` (logits (H,W,C) or labels (H,W)),
    ``"instance"`` (H,W,2), ``"depth"`` (H,W,1), plus ``"instance_mask"`` / ``"depth_mask"`` in ``target``.

    Layout: columns = input, then one per task present in either dict (semantic, instance vectors, inverse depth);
    row 1 = prediction, row 2 (if ``target``) = ground truth, with the input overlaid by the predicted semantics in
    its first column. Each tile is H x W under a ``TITLE_HEIGHT``-pixel title strip, so the PNG is
    ``rows * (H + TITLE_HEIGHT)`` x ``(1 + num_tasks) * W``. Depth and vector scales are shared between the two rows
    (from the ground truth). Returns ``path``.
    """
    panel = render_prediction_panel(image, prediction, target, palette)
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write {path}.")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Task-weight plots
# ----------------------------------------------------------------------------------------------------------------

def plot_task_weights(history, path, title=None, xlabel="epoch"):
    """Line plot PNG of per-task weight series, e.g. ``{"semantic_sigma2": [...], "depth_sigma2": [...]}``.

    ``history``: dict ``{series_name: list of floats}`` (or a Keras ``History``, whose ``.history`` is used);
    series may differ in length and may have one point (drawn as a marker). The y-axis is logarithmic when all
    finite values are positive (e.g. sigma^2), linear otherwise (e.g. log sigma^2). Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if hasattr(history, "history") and isinstance(history.history, dict):
        history = history.history
    series = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in dict(history).items()}
    series = {k: v for k, v in series.items() if v.size}
    if not series:
        raise ValueError("history has no non-empty series to plot.")

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in series.items():
        ax.plot(np.arange(len(values)), values, marker="o" if len(values) < 50 else None, markersize=3,
                label=name)
    finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("value")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(os.fspath(path), format="png")
    return path


__all__ = [
    "CITYSCAPES_PALETTE", "default_palette", "semantic_to_color", "depth_to_color", "instance_vectors_to_color",
    "normals_to_color", "instance_colors", "instances_to_color", "save_rgb", "sigma2_history",
    "render_prediction_panel", "save_prediction_panel", "plot_task_weights",
]
