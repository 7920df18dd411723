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
