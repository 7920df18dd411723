"""The serving export: a TensorFlow SavedModel of a model for raw images of any size, standalone (no Keras, no
mtl_keras: ``tf.saved_model.load(path).signatures["serving_default"](images=...)`` or TF Serving).

Signatures ``serving_default`` and ``serve`` take float32 ``images [B, H, W, 3]`` (RGB 0..255), ``serve_uint8``
uint8 ones. The model is rebuilt for ``(None, None, 3)``; architectures that need sizes divisible by ``m``
(``size_multiple``) get the image padded bottom/right by edge replication and every output cropped back, so instance
vectors and disparities stay in input pixels. Outputs are the task table's serving names for the model's tasks
(``semantic_logits``, ``instance_vectors``, ``depth``, ``normals``), plus ``semantic_labels`` (argmax) and, with
``instances=True``, ``instance_ids`` (0 = none, 1..N per image by class): ``mtl_keras.instances``' histogram
clustering written in TF ops (:func:`cluster_instance_ids`) with the parameters ``mtl_keras.predict`` uses
(:func:`served_clustering`), so the served ids are predict's. ``assets.extra/export_info.json`` records signatures,
outputs, class names and clustering parameters.

``experiments/export.py`` and a run's ``export/`` (:func:`write_run_export`) write the same SavedModel; runs on JAX
or PyTorch write it from their ``model.keras`` in a TensorFlow child process (``python -m mtl_keras.export``).
"""

import argparse
import json
import math
import os
import subprocess
import sys

import cv2
import keras
import numpy as np

from mtl_keras.atomic_files import atomic_directory
from mtl_keras.instances import clustering_parameters
from mtl_keras.labels import class_names, instance_train_ids
from mtl_keras.platform import quiet_tensorflow_logs
from mtl_keras.presets import load_model
from mtl_keras.tasks import TASKS

OUTPUT_NAMES = {name: task.output_name for name, task in TASKS.items()}  # the task table's serving names
INPUT_NAME = "images"


# ------------------------------------------------------------------------------------------------- the model part
def model_tasks(model):
    outputs = model.output if isinstance(model.output, dict) else {}
    return tuple(t for t in TASKS if t in outputs)  # the task table, read at call time


def size_multiple(model):
    """Height and width the architecture needs to divide them (1: any size): the zoo models' ``size_multiple``."""
    return int(getattr(model, "size_multiple", 1) or 1)


def serving_model(model):
    """A copy of ``model`` for images of any height and width (``input_shape=(None, None, 3)``), same weights.

    Models whose config has no ``input_shape`` are returned as they are.
    """
    config = model.get_config()
    if "input_shape" not in config:
        return model
    config = dict(config)
    for key in getattr(model, "input_size_arguments", ()):  # defaults to the input size: keep the built size
        if config.get(key) is None:
            config[key] = list(config["input_shape"][:2])
    config["input_shape"] = [None, None, config["input_shape"][-1]]
    clone = type(model).from_config(config)
    clone.set_weights(model.get_weights())
    return clone


# ------------------------------------------------------------------------------------- instance ids in TF ops
def _gaussian_kernel(sigma):
    """``cv2.getGaussianKernel(ksize, sigma)`` with the ksize ``cv2.GaussianBlur`` picks for float images."""
    ksize = int(round(sigma * 4 * 2 + 1)) | 1
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-x * x / (2 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def _ellipse_offsets(r):
    """Offsets (dy, dx) of ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2r+1, 2r+1))``."""
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return [(int(dy) - r, int(dx) - r) for dy, dx in zip(*np.nonzero(element))]


def _dilate_ellipse(density, r):
    """``cv2.dilate`` of (P, h, w) non-negative maps by the elliptic element of radius ``r`` (zero border).

    The ellipse is a stack of centred rows: for each row offset, a horizontal max-pool of that row's width, shifted
    vertically. Max-pools pad with -inf where cv2 pads with 0: the same result for non-negative maps, since each
    window holds its centre.
    """
    import tensorflow as tf

    half_widths = {}
    for dy, dx in _ellipse_offsets(r):
        half_widths[dy] = max(half_widths.get(dy, 0), abs(dx))
    x = density[..., None]
    pooled = {a: tf.nn.max_pool2d(x, [1, 2 * a + 1], 1, "SAME")[..., 0] if a else density
              for a in sorted(set(half_widths.values()))}
    hc = tf.shape(density)[1]
    result = None
    for dy, a in sorted(half_widths.items()):
        shifted = tf.pad(pooled[a], [[0, 0], [r, r], [0, 0]])[:, r + dy:r + dy + hc, :]
        result = shifted if result is None else tf.maximum(result, shifted)
    return result


def _plane_peaks(votes, plane, num_planes, height, width, p):
    """Steps 1-3 of the histogram clustering in every plane at once: the ``(P, M, 2)`` peak centres (px) and which
    of the ``M = max_instances`` slots hold one after the non-maximum suppression, strongest first."""
    import tensorflow as tf

    bin_size, sigma, peak_radius = int(p["bin_size"]), float(p["sigma"]), float(p["peak_radius"])
    min_size, max_k = int(p["min_size"]), int(p["max_instances"])
    # 1. Accumulate: votes binned into cells of bin_size px, clipped to the border cells.
    hc = (height + bin_size - 1) // bin_size
    wc = (width + bin_size - 1) // bin_size
    cells = tf.cast(tf.floor(votes / bin_size), tf.int32)
    cy = tf.clip_by_value(cells[:, 0], 0, hc - 1)
    cx = tf.clip_by_value(cells[:, 1], 0, wc - 1)
    hist = tf.math.unsorted_segment_sum(tf.ones_like(votes[:, 0]), (plane * hc + cy) * wc + cx,
                                        num_planes * hc * wc)
    hist = tf.reshape(hist, [num_planes, hc, wc, 1])
    # 2. Smooth (separable Gaussian, zero border as cv2.BORDER_CONSTANT).
    g = _gaussian_kernel(max(sigma / bin_size, 0.3))
    density = tf.nn.conv2d(hist, g.reshape(-1, 1, 1, 1), 1, "SAME")
    density = tf.nn.conv2d(density, g.reshape(1, -1, 1, 1), 1, "SAME")[..., 0]
    # 3. Peaks: local maxima over an elliptic window (cv2.dilate, zero border) holding >= min_size votes.
    r = max(int(round(peak_radius / bin_size)), 1)
    dilated = _dilate_ellipse(density, r)
    box = np.ones((2 * r + 1, 1, 1, 1), np.float32)
    mass = tf.nn.conv2d(tf.nn.conv2d(hist, box, 1, "SAME"), box.reshape(1, -1, 1, 1), 1, "SAME")[..., 0]
    candidate = (density >= dilated) & (mass >= float(min_size)) & (density > 0)
    strength = tf.reshape(tf.where(candidate, density, -tf.ones_like(density)), [num_planes, hc * wc])
    k = tf.minimum(max_k, hc * wc)
    top_strength, top_index = tf.math.top_k(strength, k=k, sorted=True)  # ties: lower (row-major) index first
    points = (tf.cast(tf.stack([top_index // wc, top_index % wc], axis=-1), tf.float32) + 0.5) * bin_size
    points = tf.pad(points, [[0, 0], [0, max_k - k], [0, 0]])  # (P, M, 2)
    valid = tf.pad(top_strength > 0, [[0, 0], [0, max_k - k]])  # (P, M)
    # Greedy non-maximum suppression in decreasing density: drop peaks closer than peak_radius to a kept one.
    close = tf.reduce_sum(tf.square(points[:, :, None, :] - points[:, None, :, :]), axis=-1) < peak_radius ** 2
    slots = tf.range(max_k)

    def nms_step(i, keep):
        conflict = tf.reduce_any(keep & close[:, i, :], axis=1)
        return i + 1, tf.where(tf.equal(slots, i)[None, :], (valid[:, i] & ~conflict)[:, None], keep)

    _, alive = tf.while_loop(lambda i, keep: i < max_k, nms_step, (tf.constant(0), tf.zeros_like(valid)))
    return points, alive


class _PlaneSums:
    """Per-(plane, slot) sums over the votes of a plane, and the vote-to-centre distances, in TF ops."""

    def __init__(self, votes, plane, num_planes, max_k):
        self.votes, self.plane, self.num_planes, self.max_k = votes, plane, num_planes, max_k

    def __call__(self, values, labels):
        """Sums of ``values`` per (plane, slot): (P, M, ...); label -1 goes to a dropped extra segment."""
        import tensorflow as tf

        ids = tf.where(labels >= 0, self.plane * self.max_k + labels, self.num_planes * self.max_k)
        sums = tf.math.unsorted_segment_sum(values, ids, self.num_planes * self.max_k + 1)[:-1]
        return tf.reshape(sums, tf.concat([[self.num_planes, self.max_k], tf.shape(values)[1:]], axis=0))

    def distances(self, centers):
        import tensorflow as tf

        return tf.reduce_sum(tf.square(self.votes[:, None, :] - tf.gather(centers, self.plane)), axis=-1)  # (N, M)

    def moments(self, labels):
        """Counts (P, M), centres (P, M, 2) and each vote's squared distance to its own centre (N,)."""
        import tensorflow as tf

        counts = self(tf.ones_like(self.votes[:, 0]), labels)
        centers = self(self.votes, labels) / tf.maximum(counts, 1.0)[..., None]
        own = tf.gather_nd(centers, tf.stack([self.plane, tf.maximum(labels, 0)], axis=1))
        d2_own = tf.where(labels >= 0, tf.reduce_sum(tf.square(self.votes - own), axis=-1), 0.0)
        return counts, centers, d2_own


def _merge_close_tf(sums, labels, factor, sigma):
    """Step 5 in every plane at once, as ``instances._merge_close``: while two clusters' centres are closer than
    ``factor`` times the larger RMS spread, the closest pair (the first in row-major slot order) is merged into
    the earlier slot."""
    import tensorflow as tf

    max_k = sums.max_k
    not_self = ~tf.eye(max_k, dtype=tf.bool)[None]

    def merge_step(labels, _):
        counts, centers, d2_own = sums.moments(labels)
        spread = tf.sqrt(tf.maximum(sums(d2_own, labels) / tf.maximum(counts, 1.0), sigma * sigma))
        dist = tf.sqrt(tf.reduce_sum(tf.square(centers[:, :, None] - centers[:, None]), axis=-1))
        ratio = dist / (factor * tf.maximum(spread[:, :, None], spread[:, None, :]))
        alive = counts > 0
        ratio = tf.where(alive[:, :, None] & alive[:, None, :] & not_self, ratio, np.inf)
        flat = tf.reshape(ratio, [sums.num_planes, max_k * max_k])
        best = tf.argmin(flat, axis=1, output_type=tf.int32)
        merge = tf.reduce_min(flat, axis=1) < 1.0
        low, high = tf.minimum(best // max_k, best % max_k), tf.maximum(best // max_k, best % max_k)
        moved = tf.gather(merge, sums.plane) & tf.equal(labels, tf.gather(high, sums.plane))
        return tf.where(moved, tf.gather(low, sums.plane), labels), tf.reduce_any(merge)

    labels, _ = tf.while_loop(lambda labels, go: go, merge_step, (labels, tf.constant(True)),
                              maximum_iterations=max_k)
    return labels


def _cluster_planes_tf(votes, plane, num_planes, height, width, p):
    """Clusters votes independently in each plane (one plane per image and instance class), all at once, as
    ``mtl_keras.instances``' histogram method (see its steps).

    ``votes`` (N, 2) float32 (y, x) px, ``plane`` (N,) int32 in [0, num_planes). Returns per vote its cluster's
    slot (N,) int32 (-1 = none), and per plane ``(num_planes, max_instances)`` the kept slots' new numbers
    (0.. in slot order, -1 = dropped) and ``(num_planes,)`` the number of clusters kept.
    """
    import tensorflow as tf

    sigma, peak_radius, assign_radius = float(p["sigma"]), float(p["peak_radius"]), float(p["assign_radius"])
    big = tf.constant(1e30, tf.float32)
    centers, alive = _plane_peaks(votes, plane, num_planes, height, width, p)
    sums = _PlaneSums(votes, plane, num_planes, int(p["max_instances"]))

    def nearest(centers, alive, radius):
        d2 = tf.where(tf.gather(alive, plane), sums.distances(centers), big)
        labels = tf.argmin(d2, axis=1, output_type=tf.int32)
        return tf.where(tf.reduce_min(d2, axis=1) > radius * radius, -1, labels)

    # One mean-shift step: each centre moves to the mean of its votes within peak_radius.
    labels = nearest(centers, alive, peak_radius)
    counts, means, _ = sums.moments(labels)
    centers = tf.where(counts[..., None] > 0, means, centers)
    labels = nearest(centers, alive, assign_radius)
    # Hard-EM refinement of an isotropic Gaussian mixture: cost d^2 / (2 s_k^2) + 2 log s_k, radius max(R, 3 s_k).
    for _ in range(int(p["refine_iterations"])):
        counts, means, d2_own = sums.moments(labels)
        alive = alive & (counts > 0)
        centers = tf.where(alive[..., None], means, centers)
        spread2 = tf.maximum(sums(d2_own, labels) / (2.0 * tf.maximum(counts, 1.0)), sigma * sigma)  # per axis
        d2 = sums.distances(centers)
        vote_alive = tf.gather(alive, plane)
        cost = d2 / (2.0 * tf.gather(spread2, plane)) + tf.math.log(tf.gather(spread2, plane))
        labels = tf.argmin(tf.where(vote_alive, cost, big), axis=1, output_type=tf.int32)
        radius2 = tf.maximum(assign_radius * assign_radius, 18.0 * spread2)
        index = tf.stack([plane, labels], axis=1)
        far = tf.gather(d2, labels, batch_dims=1) > tf.gather_nd(radius2, index)
        labels = tf.where(far | ~tf.reduce_any(vote_alive, axis=1), -1, labels)
    if float(p.get("merge_factor", 0.0)) > 0:
        labels = _merge_close_tf(sums, labels, float(p["merge_factor"]), sigma)
    # Drop clusters below min_size; the others are renumbered 0.. in slot order within their plane.
    keep = sums(tf.ones_like(votes[:, 0]), labels) >= float(p["min_size"])
    remap = tf.where(keep, tf.cumsum(tf.cast(keep, tf.int32), axis=1) - 1, -1)
    return labels, remap, tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)


def cluster_instance_ids(semantic_labels, vectors, params):
    """Instance ids ``[B, H, W]`` int32 from class labels ``[B, H, W]`` and centroid vectors ``[B, H, W, 2]``.

    ``params``: ``mtl_keras.instances.clustering_parameters``. In each image, the pixels of each instance class vote
    ``(y + dy, x + dx)``; the votes of each (image, class) are clustered; ids are 1.. per image, by class (in the
    order of ``instance_classes``) then by cluster. Pure TensorFlow ops, vectorised over images and classes (works
    inside a SavedModel).
    """
    import tensorflow as tf

    classes = [int(c) for c in params["instance_classes"]]
    labels = tf.cast(semantic_labels, tf.int32)
    shape = tf.shape(labels)
    batch, height, width = shape[0], shape[1], shape[2]
    if not classes:
        return tf.zeros_like(labels)
    table = np.full(max(classes) + 1, -1, np.int32)
    table[classes] = np.arange(len(classes), dtype=np.int32)
    in_range = (labels >= 0) & (labels < len(table))
    slot = tf.where(in_range, tf.gather(table, tf.clip_by_value(labels, 0, len(table) - 1)), -1)
    pix = tf.cast(tf.where(slot >= 0), tf.int32)  # (N, 3): image, y, x (row-major per image)
    plane = pix[:, 0] * len(classes) + tf.gather_nd(slot, pix)
    votes = tf.cast(pix[:, 1:], tf.float32) + tf.gather_nd(tf.cast(vectors, tf.float32), pix)
    finite = tf.reduce_all(tf.math.is_finite(votes), axis=1)
    votes = tf.where(finite[:, None], votes, 0.0)  # non-finite votes are left out of the clustering (below)
    num_planes = batch * len(classes)
    # Only planes with >= min_size pixels can hold a cluster: cluster those, compacted (most are empty).
    size = tf.math.unsorted_segment_sum(tf.ones_like(plane), plane, num_planes)
    active = size >= int(params["min_size"])
    compact = tf.where(active, tf.cumsum(tf.cast(active, tf.int32)) - 1, tf.reduce_sum(tf.cast(active, tf.int32)))
    selected = tf.cast(tf.where(tf.gather(active, plane) & finite)[:, 0], tf.int32)
    cluster_a, remap_a, kept_a = _cluster_planes_tf(
        tf.gather(votes, selected), tf.gather(compact, tf.gather(plane, selected)),
        tf.reduce_sum(tf.cast(active, tf.int32)), height, width, params)
    cluster = tf.scatter_nd(selected[:, None], cluster_a + 1, tf.shape(plane)) - 1  # -1 for unselected votes
    no_clusters = -tf.ones([1, int(params["max_instances"])], tf.int32)
    remap = tf.gather(tf.concat([remap_a, no_clusters], axis=0), compact)  # inactive planes: a row of -1
    kept = tf.gather(tf.concat([kept_a, [0]], axis=0), compact)
    cluster = tf.where(finite, cluster, -1)
    # Ids: per image, the clusters of earlier classes come first.
    kept = tf.reshape(kept, [batch, len(classes)])
    offset = tf.reshape(tf.cumsum(kept, axis=1, exclusive=True), [-1])
    new = tf.gather_nd(remap, tf.stack([plane, tf.maximum(cluster, 0)], axis=1))
    member = (cluster >= 0) & (new >= 0)
    ids = tf.gather(offset, plane) + new + 1
    return tf.scatter_nd(tf.boolean_mask(pix, member), tf.boolean_mask(ids, member), shape)


# -------------------------------------------------------------------------------------------- serving function
def serving_function(model, instances=False, clustering=None):
    """A function ``images (float32, B x H x W x 3) -> {output name: tensor}`` over a (None, None) ``model``."""
    import tensorflow as tf

    tasks = model_tasks(model)
    multiple = size_multiple(model)
    if instances and not {"semantic", "instance"} <= set(tasks):
        raise ValueError(f"instance ids need the semantic and instance tasks; the model has {tasks}.")

    def serve(images):
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        height, width = shape[1], shape[2]
        x = images
        if multiple > 1:  # repeat the last row / column up to a multiple of the architecture's factor
            rows = tf.minimum(tf.range((height + multiple - 1) // multiple * multiple), height - 1)
            cols = tf.minimum(tf.range((width + multiple - 1) // multiple * multiple), width - 1)
            x = tf.gather(tf.gather(x, rows, axis=1), cols, axis=2)
        outputs = model(x, training=False)
        outputs = {t: tf.cast(v, tf.float32)[:, :height, :width, :] for t, v in outputs.items()}
        result = {}
        for task in tasks:
            name = TASKS[task].output_name
            result[name] = tf.identity(outputs[task], name=name)
        if "semantic" in tasks:
            result["semantic_labels"] = tf.argmax(outputs["semantic"], axis=-1, output_type=tf.int32)
        if instances:
            result["instance_ids"] = cluster_instance_ids(result["semantic_labels"], outputs["instance"], clustering)
        return result

    return serve


def instance_classes_for(model, instance_classes=None):
    """``instance_classes`` as ints, else the training ids with instances for the model's ``num_classes``."""
    if instance_classes is not None:
        return [int(c) for c in instance_classes]
    try:
        num_classes = model.get_config().get("num_classes")
    except (NotImplementedError, AttributeError, TypeError):  # a plain functional model
        num_classes = None
    if num_classes is None:
        num_classes = model.output["semantic"].shape[-1]  # the semantic logits' channels
    num_classes = int(num_classes)
    try:
        return instance_train_ids(num_classes)
    except ValueError as e:
        raise ValueError(f"No default instance classes for num_classes={num_classes}: pass instance_classes.") from e


def reference_image_size(model, instance_image_size=None):
    """The (H, W) the instance clustering's lengths are set for: ``instance_image_size``, else the model's input
    size, else 128x256. The export and :func:`mtl_keras.predict` use the same rule, so they cluster alike."""
    size = instance_image_size
    if not size:
        try:
            size = tuple(model.get_config().get("input_shape", (None, None))[:2])
        except (NotImplementedError, AttributeError, TypeError):  # a plain functional model
            size = None
    if not size or None in size:
        size = (128, 256)
    return tuple(int(v) for v in size)


def served_clustering(model, instance_classes=None, instance_image_size=None, **overrides):
    """The parameters of the served instance clustering (``mtl_keras.instances.clustering_parameters`` at
    :func:`reference_image_size`, for the model's instance classes)."""
    return clustering_parameters(reference_image_size(model, instance_image_size),
                                 instance_classes_for(model, instance_classes), **overrides)


def export_saved_model(model, path, instances=False, instance_classes=None, instance_image_size=None,
                       verbose=False, **clustering_overrides):
    """Writes the serving SavedModel of ``model`` (a zoo model, images -> {task: output}) to ``path``.

    ``instances``: add ``instance_ids`` (needs semantic + instance tasks); ``instance_classes``: training ids with
    instances (default for 7 / 19 CityScapes classes); ``instance_image_size``: the (H, W) the clustering lengths
    are set for (default: the model's input size, else 128x256). Returns the export's info dict (also written to
    ``path/assets.extra/export_info.json``). ``path`` is replaced whole or not at all (a staging folder swapped in,
    :func:`mtl_keras.atomic_files.atomic_directory`): a failed write (``DiskWriteError``) leaves the previous export;
    a non-empty folder that is not a SavedModel is refused (``FileExistsError``), never replaced.
    """
    import tensorflow as tf

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        # the export replaces the folder whole: never a folder that holds something else
        raise FileExistsError(f"{path} exists and is not a SavedModel folder: choose another output or remove it.")
    config = model.get_config()
    serving = serving_model(model)
    clustering = None
    if instances:
        clustering = served_clustering(model, instance_classes, instance_image_size, **clustering_overrides)
    serve = serving_function(serving, instances=instances, clustering=clustering)

    # A plain tf.Module (keras.export.ExportArchive traces the model several times and walks every layer, 3x
    # slower here): the variables, the float32 function and the uint8 one, which calls the float32 graph.
    module = tf.Module()
    module.model_variables = list(serving.variables)
    module.serve = tf.function(serve, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                                     name=INPUT_NAME)], autograph=False)
    module.serve_uint8 = tf.function(lambda images: module.serve(tf.cast(images, tf.float32)),
                                     input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                                    name=INPUT_NAME)], autograph=False)
    serve_float = module.serve.get_concrete_function()
    serve_uint8 = module.serve_uint8.get_concrete_function()
    tasks = model_tasks(serving)
    outputs = [TASKS[t].output_name for t in tasks]
    if "semantic" in tasks:
        outputs.insert(outputs.index("semantic_logits") + 1, "semantic_labels")
    if instances:
        outputs.append("instance_ids")
    info = {
        "model": model.name,
        "class": type(model).__name__,
        "config": {k: v for k, v in config.items() if k != "trainable"},
        "tasks": list(tasks),
        "signatures": {
            "serving_default": {"inputs": {INPUT_NAME: "float32 [batch, height, width, 3] RGB 0..255"}},
            "serve": {"inputs": {INPUT_NAME: "float32 [batch, height, width, 3] RGB 0..255"}},
            "serve_uint8": {"inputs": {INPUT_NAME: "uint8 [batch, height, width, 3] RGB"}},
        },
        "outputs": outputs,
        "size_multiple": size_multiple(serving),
        "padding": "bottom/right edge replication to size_multiple, outputs cropped back" if
        size_multiple(serving) > 1 else None,
        "instance_clustering": clustering,
    }
    try:
        info["class_names"] = class_names(int(config.get("num_classes")))
    except (ValueError, TypeError, ImportError):
        info["class_names"] = None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written in a staging folder and swapped in whole: a full or read-only disk (DiskWriteError) or any other
    # failure leaves the previous export loadable, and no reader ever sees a half-written one.
    with atomic_directory(path) as staging:
        with quiet_tensorflow_logs():
            tf.saved_model.save(module, staging, signatures={"serving_default": serve_float, "serve": serve_float,
                                                             "serve_uint8": serve_uint8})
        extra = os.path.join(staging, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "export_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    if verbose:
        print(f"Saved the serving model at {path}: signatures serving_default / serve (float32 images) and "
              f"serve_uint8 (uint8 images).")
    return info


# ------------------------------------------------------------------------------------------------- a run's export
def default_instances(model):
    """Whether a run's export gets ``instance_ids``: the model has the semantic and instance tasks and its number of
    classes has known instance classes (CityScapes' 7 or 19)."""
    if not {"semantic", "instance"} <= set(model_tasks(model)):
        return False
    try:
        instance_classes_for(model, None)
    except (ValueError, TypeError, ImportError):
        return False
    return True


def export_command(run_dir, output, instances=False):
    """The shell command that writes the run's serving export later (what :func:`write_run_export` does)."""
    return (f"KERAS_BACKEND=tensorflow python experiments/export.py {run_dir} --output {output}"
            + (" --instances" if instances else "") + " --overwrite")


class ExportSubprocessError(RuntimeError):
    """The child process of :func:`export_in_subprocess` failed (its message ends with the child's last lines)."""


def export_in_subprocess(keras_file, path, instances=False, timeout=1800):
    """Writes :func:`export_saved_model` of the ``.keras`` file ``keras_file`` to ``path`` from a child process with
    ``KERAS_BACKEND=tensorflow`` (for runs on JAX or PyTorch); returns the export's info dict.

    The child sees no GPU (``CUDA_VISIBLE_DEVICES=-1``): the parent's framework may hold its memory, and a CPU-built
    SavedModel runs on any device. Raises :class:`ExportSubprocessError` when the child fails.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="-1",
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p])
    command = [sys.executable, "-m", "mtl_keras.export", os.fspath(keras_file), os.fspath(path)]
    if instances:
        command.append("--instances")
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ExportSubprocessError(f"the export process did not finish in {timeout} s") from e
    if proc.returncode != 0:
        tail = " | ".join(line for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ExportSubprocessError(f"the export process (KERAS_BACKEND=tensorflow) exited with {proc.returncode}: "
                                    f"{tail}")
    with open(os.path.join(path, "assets.extra", "export_info.json")) as f:
        return json.load(f)


def write_run_export(model, path, keras_file=None, backend=None):
    """A training run's serving export of ``model`` at ``path`` (``RUN/export``): :func:`export_saved_model` with
    ``instances`` as :func:`default_instances` says. On the TensorFlow backend in this process; on another
    (``backend``, default Keras' own) from ``keras_file`` (the run's ``model.keras``, already written) in a child
    process (:func:`export_in_subprocess`). Returns the export's info dict."""
    backend = backend or keras.config.backend()
    instances = default_instances(model)
    if backend == "tensorflow":
        return export_saved_model(model, path, instances=instances)
    if keras_file is None:
        raise ValueError(f"The {backend} backend writes the export from a .keras file: pass keras_file.")
    return export_in_subprocess(keras_file, path, instances=instances)


def main(argv=None):
    """``python -m mtl_keras.export MODEL.keras OUTPUT [--instances]``: :func:`export_saved_model` of a ``.keras``
    file (the child process of :func:`export_in_subprocess`; ``experiments/export.py`` is the full command)."""
    parser = argparse.ArgumentParser(prog="python -m mtl_keras.export", description=main.__doc__)
    parser.add_argument("keras_file")
    parser.add_argument("output")
    parser.add_argument("--instances", action="store_true")
    args = parser.parse_args(argv)
    if keras.config.backend() != "tensorflow":
        parser.error(f"the SavedModel export needs KERAS_BACKEND=tensorflow (Keras runs {keras.config.backend()}).")

    info = export_saved_model(load_model(args.keras_file), args.output, instances=args.instances)
    print(f"SavedModel: {args.output} (outputs: {', '.join(info['outputs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
