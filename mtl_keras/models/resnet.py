"""Dilated ResNet (bottleneck, v1) encoder with a chosen output stride, and its ImageNet weights.

Layer names and structure are those of ``keras.applications.ResNet50/101`` (stride on the first 1x1 conv, biased
convs, BN epsilon 1.001e-5), so their ImageNet weights load by layer name. ``output_stride`` 8 or 16 turns the last
strides into dilation (DeepLab; as in torchvision, a dilated stage's first block keeps the previous dilation), which
changes no weight shape. Those weights expect "caffe" inputs (BGR minus the mean, unscaled) while the zoo normalises
RGB by the ImageNet mean and std; ``fold_preprocessing`` folds the conversion into ``conv1_conv``, exact except in
conv1's zero padding (the conventions pad with colours 0.5 grey-levels apart).
"""

import logging
import os

import keras
import numpy as np

from mtl_keras.layers import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, AtrousConv2D, BatchNormalization
from mtl_keras.presets import check_sha256

log = logging.getLogger("mtl_keras")

RESNET_BLOCKS = {
    26: (2, 2, 2, 2),  # small depth for quick runs and tests
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
_BN_EPS = 1.001e-5
RESNET_APPLICATIONS = {50: "ResNet50", 101: "ResNet101"}
# keras.applications.resnet.preprocess_input ("caffe" mode): RGB -> BGR, minus this mean (BGR order), no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


# The two conventions of a bottleneck ResNet: keras.applications' (v1: stride on the first 1x1 conv, biased convs, BN
# epsilon 1.001e-5; its ImageNet weights load by name) and torchvision's (v1.5: stride on the 3x3 conv, convs without
# bias, BN epsilon 1e-5; the encoder of LibMTL and of most PyTorch multi-task code, so parameter counts compare).
RESNET_LAYOUTS = {
    "keras": {"use_bias": True, "epsilon": _BN_EPS, "stride_on_3x3": False},
    "torchvision": {"use_bias": False, "epsilon": 1e-5, "stride_on_3x3": True},
}


def resnet_layout(layout):
    if layout not in RESNET_LAYOUTS:
        raise ValueError(f"backbone_layout must be one of {sorted(RESNET_LAYOUTS)}, got {layout!r}.")
    return RESNET_LAYOUTS[layout]


def bottleneck_block(x, filters, stride=1, dilation=1, conv_shortcut=False, name=None, layout="keras"):
    """keras.applications ``residual_block_v1`` with a dilation rate on the 3x3 conv (``layout``: RESNET_LAYOUTS)."""
    style = resnet_layout(layout)
    bias, eps = style["use_bias"], style["epsilon"]
    stride_1x1, stride_3x3 = (1, stride) if style["stride_on_3x3"] else (stride, 1)
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, use_bias=bias, name=f"{name}_0_conv")(x)
        shortcut = BatchNormalization(epsilon=eps, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride_1x1, use_bias=bias, name=f"{name}_1_conv")(x)
    x = BatchNormalization(epsilon=eps, name=f"{name}_1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    if stride_3x3 > 1:  # torchvision pads 1 on each side, Keras' "same" pads only bottom/right for stride 2
        x = keras.layers.ZeroPadding2D(dilation, name=f"{name}_2_pad")(x)
        x = keras.layers.Conv2D(filters, 3, strides=stride_3x3, dilation_rate=dilation, use_bias=bias,
                                name=f"{name}_2_conv")(x)
    else:
        x = AtrousConv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=bias, name=f"{name}_2_conv")(x)
    x = BatchNormalization(epsilon=eps, name=f"{name}_2_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, use_bias=bias, name=f"{name}_3_conv")(x)
    x = BatchNormalization(epsilon=eps, name=f"{name}_3_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def stage_strides_and_dilations(output_stride):
    """(stride, dilation of the first block, dilation of the other blocks) for stages conv2..conv5."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}.")
    plan, current_stride, dilation = [], 4, 1  # the stem (conv1 + max-pool) has stride 4
    for stride in (1, 2, 2, 2):
        first_dilation = dilation
        if stride > 1 and current_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            current_stride *= stride
        plan.append((stride, first_dilation, dilation))
    return plan


def dilated_resnet_pyramid(inputs, depth=101, output_stride=8, width=64, name_prefix="", layout="keras"):
    """The encoder on ``inputs`` (normalised images) -> ``{"P1": stem (stride 2), "P2".."P5": conv2..conv5}``;
    ``width``: the first stage's bottleneck width (64 in the papers); ``layout``: "keras" or "torchvision"."""
    style = resnet_layout(layout)
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}.")
    p = name_prefix
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name=f"{p}conv1_pad")(inputs)
    x = keras.layers.Conv2D(width, 7, strides=2, use_bias=style["use_bias"], name=f"{p}conv1_conv")(x)
    x = BatchNormalization(epsilon=style["epsilon"], name=f"{p}conv1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{p}conv1_relu")(x)
    pyramid = {"P1": x}
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name=f"{p}pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name=f"{p}pool1_pool")(x)
    plan = stage_strides_and_dilations(output_stride)
    for stage, (blocks, (stride, first_dilation, dilation)) in enumerate(zip(RESNET_BLOCKS[depth], plan)):
        filters = width * 2 ** stage
        for b in range(blocks):
            x = bottleneck_block(
                x, filters, stride=stride if b == 0 else 1, dilation=first_dilation if b == 0 else dilation,
                conv_shortcut=b == 0, name=f"{p}conv{stage + 2}_block{b + 1}", layout=layout)
        pyramid[f"P{stage + 2}"] = x
    return pyramid


def pyramid_strides(output_stride):
    """{level: stride} of :func:`dilated_resnet_pyramid`'s outputs."""
    stage_strides_and_dilations(output_stride)  # validates
    return {"P1": 2, "P2": 4, "P3": min(8, output_stride), "P4": min(16, output_stride),
            "P5": min(32, output_stride)}


def dilated_resnet(inputs, depth=101, output_stride=8, width=64, name_prefix=""):
    """The last stage's features of :func:`dilated_resnet_pyramid` (the DeepLab encoder output)."""
    return dilated_resnet_pyramid(inputs, depth, output_stride, width, name_prefix)["P5"]


# ---------------------------------------------------------------------------------------------- ImageNet weights
def resnet_application(depth, weights=None):
    """``keras.applications.ResNet50/101(include_top=False)`` at any input size, with ``weights``."""
    if depth not in RESNET_APPLICATIONS:
        raise ValueError(f"keras.applications has ImageNet ResNets of depth {sorted(RESNET_APPLICATIONS)} only; "
                         f"this encoder has depth {depth!r}.")
    builder = getattr(keras.applications, RESNET_APPLICATIONS[depth])
    try:
        return builder(include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as e:  # noqa: BLE001 - the download error of weights="imagenet" is a plain Exception
        if weights == "imagenet":
            raise RuntimeError(
                f"Could not get the ImageNet weights of {RESNET_APPLICATIONS[depth]} ({e}). Without network access, "
                f"put resnet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5 (the file it downloads) in "
                f"~/.keras/models/ (the keras.applications cache) or pass its local path as weights=...") from e
        raise


def infer_resnet_depth(model, name_prefix=""):
    """Depth (26, 50 or 101) of the dilated ResNet inside ``model``, from its number of blocks per stage."""
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
    """Copies ``keras.applications.ResNet{depth}``'s weights into the dilated ResNet layers of ``model``; returns the
    names of the layers loaded. Every weighted layer must match by name and shape before any is set.

    ``weights``: ``"imagenet"``, a local file or an application model holding them; ``sha256``: the file's expected
    hash; ``fold_preprocessing=False`` copies ``conv1`` unchanged (for caffe-style inputs).
    """
    if weights is None:
        raise ValueError("weights must be 'imagenet', a local weights file or a keras.applications ResNet model.")
    if isinstance(weights, keras.Model):  # an application already built with its weights
        app = weights
    else:
        if weights != "imagenet":
            weights = os.fspath(weights)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"Backbone weights file {weights!r} does not exist.")
            check_sha256(weights, sha256)
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
    for target, values in plan:
        target.set_weights(values)
    source = weights if isinstance(weights, str) else app.name
    log.info("Loaded %s weights (%s) into %d layers of %s.", app.name, source, len(plan), model.name)
    return [target.name for target, _ in plan]
