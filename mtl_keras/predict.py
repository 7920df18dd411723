"""One-call prediction: numpy images of any size in, per-image label maps, instance ids, depth and normals out.

A model built for a fixed size is rebuilt once for ``(None, None, 3)`` (the copy is cached per model; the weights are
copied at every call, so training between calls is seen); sizes are padded and outputs cropped by the serving
export's rule (``mtl_keras.export``), and instance ids are clustered with the export's parameters, so ``predict``
and the served model agree. Backend-neutral: numpy and ``keras.Model.predict_on_batch`` only.
"""

import weakref

import numpy as np

from mtl_keras.export import instance_classes_for, model_tasks, served_clustering, serving_model
from mtl_keras.export import size_multiple as model_size_multiple
from mtl_keras.instances import cluster_instances
from mtl_keras.tasks import TASKS

# model -> its copy for images of any size (same architecture with input_shape (None, None, 3)).
_ANY_SIZE_COPIES = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------ the model part
def size_multiple(model):
    """Height and width the architecture needs to divide them (1: any size): the export's rule."""
    return model_size_multiple(model)


def _fixed_size(model):
    """The (H, W) the model was built for, or None when it takes any size (or has no ``input_shape`` config)."""
    try:
        shape = model.get_config().get("input_shape")
    except (NotImplementedError, AttributeError, TypeError):
        return None
    if not shape or shape[0] is None or shape[1] is None:
        return None
    return int(shape[0]), int(shape[1])


def any_size_model(model):
    """``model`` itself if it takes any height and width, else a copy built with ``input_shape=(None, None, C)``
    and the same weights (cached per model; the weights are copied at every call)."""
    if _fixed_size(model) is None:
        return model
    try:
        copy = _ANY_SIZE_COPIES.get(model)
    except TypeError:  # not weak-referenceable
        copy = None
    if copy is None:
        copy = serving_model(model)
        try:
            _ANY_SIZE_COPIES[model] = copy
        except TypeError:
            pass
    copy.set_weights(model.get_weights())
    return copy


# ------------------------------------------------------------------------------------------------------ the input
def _as_image_list(images):
    """(list of (H, W, 3) float32 arrays, whether one image was given)."""
    expected = ("images must be one (H, W, 3) RGB image, an (N, H, W, 3) batch or a list of (H, W, 3) images "
                "(uint8 or float, RGB in 0..255)")
    if isinstance(images, (list, tuple)):
        arrays, single = [np.asarray(image) for image in images], False
        for i, image in enumerate(arrays):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"{expected}; got a list whose image {i} has shape {image.shape}.")
    else:
        array = np.asarray(images)
        if array.ndim == 3 and array.shape[-1] == 3:
            arrays, single = [array], True
        elif array.ndim == 4 and array.shape[-1] == 3:
            arrays, single = list(array), False
        else:
            raise ValueError(f"{expected}; got an array of shape {array.shape}.")
    for i, image in enumerate(arrays):
        if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
            raise ValueError(f"{expected}; got image {i} of dtype {image.dtype}.")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"{expected}; got image {i} of shape {image.shape} (empty).")
    return [image.astype(np.float32, copy=False) for image in arrays], single


def _pad_to_multiple(batch, multiple):
    """Bottom/right edge replication of (B, H, W, 3) up to multiples of ``multiple``."""
    height, width = batch.shape[1:3]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return batch
    return np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# ---------------------------------------------------------------------------------------------------- prediction
def predict(model, images, batch_size=8, instances=True, instance_classes=None, method="histogram",
            **clustering):
    """Runs ``model`` on numpy ``images`` of any size and returns per image its dense predictions as numpy arrays.

    ``model``: a zoo model (``mtl_keras.build_model`` / ``load_model``: float32 RGB images in 0..255, NHWC ->
    ``{task: output}``), or a ``MultiTaskTrainer`` (its inference model is used).

    ``images``: one ``(H, W, 3)`` image, an ``(N, H, W, 3)`` batch, or a list of ``(H, W, 3)`` images of different
    sizes; RGB, uint8 or float in 0..255 (not normalised: the model normalises inside). Anything else (a 2-D array,
    another channel count) raises ``ValueError``.

    ``batch_size``: images of the same size are run together, at most ``batch_size`` at a time.

    ``instances``: cluster the instance vectors into ids (needs the ``semantic`` and ``instance`` tasks) with
    :func:`mtl_keras.instances.cluster_instances` (``method``; for ``"histogram"`` the parameters of the serving
    export, ``mtl_keras.export.served_clustering``, so the served ``instance_ids`` are these; ``clustering``
    keyword arguments, e.g. ``min_size``, ``sigma`` or ``scale``, replace any of them). ``instance_classes``: the ids
    whose pixels are clustered; default ``mtl_keras.labels.instance_train_ids(num_classes)`` (CityScapes' 19
    classes or 7 categories; other label sets must pass it).

    Returns, for a single ``(H, W, 3)`` image, a dict; otherwise a list of dicts in the order of ``images``. Each
    dict holds, for the tasks the model has, arrays of that image's height and width:

    - ``"semantic"``: ``(H, W)`` int32 training ids (argmax of the logits);
    - ``"instance_ids"``: ``(H, W)`` int32, 0 = no instance, 1..N (ordered by class; with ``instances=True``);
    - ``"instance"``: ``(H, W, 2)`` float32 (dy, dx) vectors from each pixel to its instance's centroid, px;
    - ``"depth"``: ``(H, W)`` float32 inverse depth (disparity, px);
    - ``"normals"``: ``(H, W, 3)`` float32 surface normals.
    """
    model = getattr(model, "inference_model", model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    arrays, single = _as_image_list(images)
    tasks = model_tasks(model)
    if not tasks:
        raise ValueError(f"predict needs a model whose output is a dict with some of {tuple(TASKS)}; "
                         f"{getattr(model, 'name', model)!r} outputs {getattr(model, 'output', None)!r}.")
    cluster = bool(instances) and {"semantic", "instance"} <= set(tasks)
    if cluster:
        instance_classes = instance_classes_for(model, instance_classes)
        if method == "histogram":  # the served clustering's parameters: the export's instance_ids are these
            served = served_clustering(model, instance_classes, **clustering)
            clustering = {k: served[k] for k in served if k not in ("instance_classes", "image_size")}

    multiple = size_multiple(model)
    fixed = _fixed_size(model)
    groups = {}  # (H, W) -> indices, in order of first appearance
    for i, image in enumerate(arrays):
        groups.setdefault(image.shape[:2], []).append(i)
    results = [None] * len(arrays)
    runner = None
    for (height, width), indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = _pad_to_multiple(np.stack([arrays[i] for i in chunk]), multiple)
            if fixed is not None and tuple(batch.shape[1:3]) == fixed:
                outputs = model.predict_on_batch(batch)
            else:
                runner = runner or any_size_model(model)
                outputs = runner.predict_on_batch(batch)
            outputs = {t: np.asarray(outputs[t], dtype=np.float32)[:, :height, :width] for t in tasks}
            for k, i in enumerate(chunk):
                results[i] = _postprocess({t: v[k] for t, v in outputs.items()}, cluster, instance_classes,
                                          method, clustering)
    return results[0] if single else results


def _postprocess(outputs, cluster, instance_classes, method, clustering):
    """Per task, by its row of the task table: a classification gives its labels (argmax), a one-channel regression
    its (H, W) map, any other regression its (H, W, C) values; plus the clustered instance ids."""
    result = {}
    for name, output in outputs.items():
        task = TASKS[name]
        if task.type == "classification":
            result[name] = np.argmax(output, axis=-1).astype(np.int32)
        else:
            result[name] = output[..., 0] if task.channels == 1 else output
    if cluster:
        found = cluster_instances(outputs["semantic"], outputs["instance"], method=method,
                                  instance_classes=instance_classes, **clustering)
        result["instance_ids"] = found.ids.astype(np.int32)
    return result


__all__ = ["predict", "any_size_model", "size_multiple"]
