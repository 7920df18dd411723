"""Dilated ResNet (bottleneck, v1) encoder with a chosen output stride.

Layer names and structure follow ``keras.applications.ResNet50/101`` exactly (stride on the first 1x1 conv, biased
convs, BN epsilon 1.001e-5), so ImageNet weights of those applications load by layer name. ``output_stride`` 8 or 16
turns the strides of the last stages into dilation (DeepLab): as in torchvision, the first block of a dilated stage
keeps the previous dilation and the following blocks use the new one.
"""

import keras

from mtl_keras.layers import AtrousConv2D, BatchNormalization

RESNET_BLOCKS = {
    26: (2, 2, 2, 2),  # small depth for quick runs and tests
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
_BN_EPS = 1.001e-5


def bottleneck_block(x, filters, stride=1, dilation=1, conv_shortcut=False, name=None):
    """keras.applications ``residual_block_v1`` with a dilation rate on the 3x3 conv."""
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = BatchNormalization(epsilon=_BN_EPS, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = BatchNormalization(epsilon=_BN_EPS, name=f"{name}_1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = AtrousConv2D(filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv")(x)
    x = BatchNormalization(epsilon=_BN_EPS, name=f"{name}_2_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = BatchNormalization(epsilon=_BN_EPS, name=f"{name}_3_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def stage_strides_and_dilations(output_stride):
    """(stride, dilation of the first block, dilation of the other blocks) for stages conv2..conv5."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}.")
    plan, current_stride, dilation = [], 4, 1  # the stem (conv1 + max-pool) has stride 4
    for stage, stride in enumerate((1, 2, 2, 2)):
        first_dilation = dilation
        if stride > 1 and current_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            current_stride *= stride
        plan.append((stride, first_dilation, dilation))
    return plan


def dilated_resnet_pyramid(inputs, depth=101, output_stride=8, width=64, name_prefix=""):
    """Builds the encoder graph on ``inputs`` (normalised NHWC images); returns its pyramid ``{"P1": stem (stride
    2), "P2".."P5": the last block of conv2..conv5}``. With dilation, P3..P5 keep stride ``output_stride``.

    ``width`` is the first stage's bottleneck width (64 in the papers); smaller values make test models.
    """
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}.")
    p = name_prefix
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name=f"{p}conv1_pad")(inputs)
    x = keras.layers.Conv2D(width, 7, strides=2, name=f"{p}conv1_conv")(x)
    x = BatchNormalization(epsilon=_BN_EPS, name=f"{p}conv1_bn")(x)
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
                conv_shortcut=b == 0, name=f"{p}conv{stage + 2}_block{b + 1}")
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
