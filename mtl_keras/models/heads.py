"""Task heads shared by the architectures: output layer names, dtypes and the output dict."""

import keras

from mtl_keras.layers import ResizeLike
from mtl_keras.tasks import task_channels


def task_output(x, task, num_classes, image, name):
    """1x1 conv to the task's channels, then bilinear upsampling to the input image size.

    The output is float32 whatever the compute dtype, so mixed-precision models export float32 results.
    """
    x = keras.layers.Conv2D(task_channels(task, num_classes), 1, name=f"{name}_logits")(x)
    return ResizeLike(interpolation="bilinear", dtype=keras.config.floatx(), name=task)([x, image])


def deepest_level(backbone):
    """The pyramid level a head reads as its input: the largest stride, the last listed among equals."""
    strides = backbone.pyramid_strides
    return max(strides, key=lambda level: (strides[level], list(strides).index(level)))


def skip_levels(backbone):
    """U-Net skips of ``backbone`` from coarse to fine: for each stride up to the deepest level's, the last level with
    that stride (the deepest level itself excluded); a stride that is not a power of two is refused."""
    strides = backbone.pyramid_strides
    deepest = deepest_level(backbone)
    chosen = {}
    for level, stride in strides.items():
        if level != deepest and stride <= strides[deepest]:
            if stride & (stride - 1):
                raise ValueError(f"{backbone.name}: level {level} has stride {stride}; U-Net decoders need strides "
                                 f"that are powers of two.")
            chosen[stride] = level
    return [chosen[s] for s in sorted(chosen, reverse=True)]
