"""ImageNet weights for the dilated ResNet encoder, taken from ``keras.applications.ResNet50/101``.

``dilated_resnet`` (``mtl_keras/models/resnet.py``) names its layers exactly as ``keras.applications`` does
(``conv1_conv``, ``conv2_block1_0_conv``, ..., ``conv5_block3_3_bn``), so the weights move over layer by layer:
:func:`load_resnet_weights` builds the Keras application (``include_top=False``) with the given weights, then
copies each convolution's and batch norm's ``get_weights()`` into the layer of the same name (plus ``name_prefix``)
of the target model. Output stride does not matter: dilation changes no weight shape, so the same weights serve an
encoder at output stride 8, 16 or 32.

Where the weights come from (``weights=``):

- a local file: whatever ``keras.applications.ResNet50/101(weights=path)`` reads, i.e. the Keras release file
  ``resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5`` (legacy HDF5), a ``.weights.h5`` written by
  ``app.save_weights`` or a ``.keras`` file of the application;
- ``"imagenet"``: ``keras.applications``' own download (cached under ``~/.keras/models``; with no network it works
  only if that file is already there).

Input convention. The Keras ResNet (v1) weights were trained on "caffe" inputs: BGR, the ImageNet mean subtracted,
no scaling. The zoo's models normalise RGB images in 0..255 with the ImageNet mean *and* standard deviation (the
torchvision convention, ``mtl_keras.layers.image_normalization``). With ``fold_preprocessing=True`` (default) the
conversion is folded into ``conv1_conv`` (its input channels are reversed and scaled by the std, its bias takes the
mean difference), so the encoder computes what the application computes on ``preprocess_input(images)``, except in
the 3-pixel zero padding of ``conv1`` where the two conventions pad with colours 0.5 grey-levels apart. With
``fold_preprocessing=False`` the weights are copied unchanged (for an encoder fed caffe-style inputs, or to compare
layer by layer).
"""

import hashlib
import logging

import numpy as np

from mtl_keras.layers import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

log = logging.getLogger("mtl_keras")

RESNET_APPLICATIONS = {50: "ResNet50", 101: "ResNet101"}
# keras.applications.resnet.preprocess_input ("caffe" mode): RGB -> BGR, minus this mean (BGR order), no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# The files keras.applications downloads for weights="imagenet", include_top=False, with its md5 hashes.
IMAGENET_FILES = {
    50: ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
    101: ("resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", "88cf7a10940856eca736dc7b7e228a21"),
}


def resnet_application(depth, weights=None):
    """``keras.applications.ResNet50/101(include_top=False)`` at any input size, with ``weights`` (None, "imagenet"
    or a local file)."""
    import keras

    if depth not in RESNET_APPLICATIONS:
        raise ValueError(f"keras.applications has ImageNet ResNets of depth {sorted(RESNET_APPLICATIONS)} only; "
                         f"this encoder has depth {depth!r}.")
    builder = getattr(keras.applications, RESNET_APPLICATIONS[depth])
    try:
        return builder(include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as e:  # noqa: BLE001 - the download error of weights="imagenet" is a plain Exception
        if weights == "imagenet":
            file_name = IMAGENET_FILES[depth][0]
            raise RuntimeError(
                f"Could not get the ImageNet weights of {RESNET_APPLICATIONS[depth]} ({e}). Without network access, "
                f"put {file_name} in ~/.keras/models/ (the keras.applications cache) or pass its local path as "
                f"weights=...") from e
        raise


def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def infer_resnet_depth(model, name_prefix=""):
    """Depth (26, 50 or 101) of the dilated ResNet inside ``model``, from its number of conv4 blocks."""
    from mtl_keras.models.resnet import RESNET_BLOCKS

    depth = getattr(model, "backbone_depth", None)
    if depth:
        return int(depth)
    names = {layer.name for layer in model.layers}
    blocks = tuple(sum(1 for b in range(1, 64) if f"{name_prefix}conv{s}_block{b}_out" in names) for s in (2, 3, 4, 5))
    for depth, plan in RESNET_BLOCKS.items():
        if plan == blocks:
            return depth
    raise ValueError(f"No dilated ResNet with layer prefix {name_prefix!r} found in {model.name!r} (blocks per stage "
                     f"{blocks}).")


def fold_caffe_preprocessing(kernel, bias):
    """``conv1`` weights for ImageNet-standardised RGB inputs from weights trained on caffe (BGR - mean) inputs.

    With ``n = (rgb - mean) / std`` and ``c_k = bgr_k - caffe_mean_k``: ``c_k = n_{2-k} std_{2-k} + mean_{2-k} -
    caffe_mean_k``, so ``W'[..., j, :] = W[..., 2 - j, :] * std_j`` and ``b' = b + sum W[..., k, :] (mean_{2-k} -
    caffe_mean_k)``.
    """
    kernel = np.asarray(kernel, np.float64)
    std = np.asarray(IMAGENET_STD_RGB, np.float64)
    shift_bgr = np.asarray(IMAGENET_MEAN_RGB, np.float64)[::-1] - np.asarray(CAFFE_MEAN_BGR, np.float64)
    new_kernel = kernel[:, :, ::-1, :] * std[None, None, :, None]
    new_bias = np.asarray(bias, np.float64) + np.einsum("hwko,k->o", kernel, shift_bgr)
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


def load_resnet_weights(model, weights="imagenet", depth=None, name_prefix="", fold_preprocessing=True,
                        sha256=None):
    """Copies the weights of ``keras.applications.ResNet{depth}`` into the dilated ResNet layers of ``model``.

    ``weights``: ``"imagenet"``, a local file (see the module docstring) or an application model already holding
    its weights (to fill several models from one read); ``sha256``: expected hash of the file (checked before
    anything is read). ``depth``: default from the model. ``name_prefix``: the ``name_prefix`` the
    encoder was built with. Every weighted layer of the application must find a layer of the same name and weight
    shapes in ``model`` (a narrower ``backbone_width`` is an error). Returns the names of the layers loaded.
    """
    import os

    import keras

    if weights is None:
        raise ValueError("weights must be 'imagenet', a local weights file or a keras.applications ResNet model.")
    if isinstance(weights, keras.Model):  # an application already built with its weights
        app = weights
    else:
        if weights != "imagenet":
            weights = os.fspath(weights)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"Backbone weights file {weights!r} does not exist.")
            if sha256 is not None:
                actual = file_sha256(weights)
                if actual != sha256:
                    raise ValueError(f"sha256 mismatch for {weights}: expected {sha256}, got {actual}; nothing "
                                     f"loaded.")
        depth = infer_resnet_depth(model, name_prefix) if depth is None else int(depth)
        app = resnet_application(depth, weights=weights)

    targets = {layer.name: layer for layer in model.layers}
    plan = []
    for layer in app.layers:
        values = layer.get_weights()
        if not values:
            continue
        name = f"{name_prefix}{layer.name}"
        target = targets.get(name)
        if target is None:
            raise ValueError(f"{model.name!r} has no layer {name!r} for {app.name}'s {layer.name!r}; is it a dilated "
                             f"ResNet of {app.name}'s depth built with name_prefix={name_prefix!r}?")
        shapes = [tuple(w.shape) for w in target.get_weights()]
        if shapes != [tuple(v.shape) for v in values]:
            raise ValueError(f"Layer {name!r}: the model's weights have shapes {shapes}, {app.name}'s "
                             f"{[tuple(v.shape) for v in values]}. ImageNet weights need backbone_width=64.")
        if fold_preprocessing and layer.name == "conv1_conv":
            values = list(fold_caffe_preprocessing(*values))
        plan.append((target, values))
    for target, values in plan:  # all shapes checked: nothing is half loaded
        target.set_weights(values)
    source = weights if isinstance(weights, str) else app.name
    log.info("Loaded %s weights (%s) into %d layers of %s.", app.name, source, len(plan), model.name)
    return [target.name for target, _ in plan]
