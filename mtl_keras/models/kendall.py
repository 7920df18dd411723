"""Kendall, Gal & Cipolla (CVPR 2018): a DeepLabV3 encoder shared by light per-task decoders.

Encoder (the paper's appendix A): dilated ResNet-101 at output stride 8, then ASPP with four parallel convolutions
(1x1; 3x3 at rates 12, 24, 36) of 256 channels and an image-pooling branch (global average pool, 1x1 conv to 256),
each followed by BN (and ReLU, as in DeepLabV3), concatenated to 1280 channels: the shared representation.
Decoder per task: conv to 256 + BN + ReLU, 1x1 conv to the task's channels, bilinear upsampling to the input size.

``decoder_kernel_size`` defaults to 1: the paper's appendix, which details the architecture layer by layer, says
1x1, while its main text summarises the decoder as 3x3. 1x1 keeps each decoder at 0.33M parameters
("very little flexibility in each task decoder", appendix); 3 is available for the main text's variant.
"""

import keras

from mtl_keras.layers import GlobalAveragePooling2D, ResizeLike, conv_bn_relu
from mtl_keras.models.backbones import DilatedResNetBackbone
from mtl_keras.models.heads import deepest_level, task_output
from mtl_keras.models.task_model import MultiTaskModel
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks


# --------------------------------------------------------------------------------------------------------- blocks
def aspp(x, channels=256, rates=(12, 24, 36), name="aspp"):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate and image pooling, concatenated."""
    branches = [conv_bn_relu(x, channels, 1, name=f"{name}_1x1")]
    for i, rate in enumerate(rates, start=1):
        branches.append(conv_bn_relu(x, channels, 3, dilation_rate=rate, name=f"{name}_atrous{i}"))
    pooled = GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = conv_bn_relu(pooled, channels, 1, name=f"{name}_pool")
    branches.append(ResizeLike(interpolation="bilinear", name=f"{name}_pool_resize")([pooled, x]))
    return keras.layers.Concatenate(name=f"{name}_concat")(branches)


def task_decoder(x, task, num_classes, image, channels=256, kernel_size=1):
    """Conv (``kernel_size``) to ``channels`` + BN + ReLU, then the task's output conv and upsampling."""
    x = conv_bn_relu(x, channels, kernel_size, name=f"{task}_decoder")
    return task_output(x, task, num_classes, image, name=f"{task}_decoder")


# ---------------------------------------------------------------------------------------------------------- model
@keras.saving.register_keras_serializable(package="mtl_keras")
class KendallMultiTaskModel(MultiTaskModel):
    """Shared encoder + ASPP, one light decoder per task; images (0..255 RGB) -> {task: output} at input resolution.

    The encoder is the paper's dilated ResNet (``backbone_depth``, ``backbone_width``, ``output_stride``,
    ``backbone_weights``) or any ``backbone`` given (an instance or its config); the head reads its deepest level.
    """

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                 backbone_depth=101, backbone_width=64, output_stride=8, aspp_channels=256,
                 aspp_rates=(12, 24, 36), decoder_channels=256, decoder_kernel_size=1, backbone=None,
                 backbone_weights=None, **kwargs):
        tasks = validate_tasks(tasks)
        backbone, custom_backbone = self._resolve_encoder(backbone, input_shape, lambda: DilatedResNetBackbone(
            depth=backbone_depth, output_stride=output_stride, width=backbone_width, input_shape=tuple(input_shape)),
            backbone_weights)
        image = backbone.input
        features = backbone.pyramid_outputs[deepest_level(backbone)]
        shared = aspp(features, channels=aspp_channels, rates=tuple(aspp_rates))
        outputs = {task: task_decoder(shared, task, num_classes, image, channels=decoder_channels,
                                      kernel_size=decoder_kernel_size) for task in tasks}
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        self._set_common(backbone, custom_backbone, tasks, num_classes, size_multiple=1)  # outputs resized to input
        self.backbone_depth = getattr(backbone, "depth", None)
        self.backbone_width = getattr(backbone, "width", None)
        self.output_stride = getattr(backbone, "output_stride", None)
        self.aspp_channels = aspp_channels
        self.aspp_rates = tuple(aspp_rates)
        self.decoder_channels = decoder_channels
        self.decoder_kernel_size = decoder_kernel_size

    def get_config(self):
        return self._config(
            dict(backbone_depth=self.backbone_depth, backbone_width=self.backbone_width,
                 output_stride=self.output_stride),
            dict(aspp_channels=self.aspp_channels, aspp_rates=list(self.aspp_rates),
                 decoder_channels=self.decoder_channels, decoder_kernel_size=self.decoder_kernel_size))


# -------------------------------------------------------------------------------------------------------- builder
def build_kendall_model(name, defaults, tasks=("semantic", "instance", "depth"), num_classes=19,
                        input_shape=(128, 256, 3), **overrides):
    """A ``KendallMultiTaskModel`` from an entry point's ``defaults``, any argument overridden, named ``name``."""
    kwargs = {**defaults, **overrides}
    kwargs.setdefault("name", name)
    return KendallMultiTaskModel(tasks=tasks, num_classes=num_classes, input_shape=input_shape, **kwargs)


# ------------------------------------------------------------------------------------------- registered entry points
@register_model
def kendall_deeplabv3_resnet101(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                                **overrides):
    """The paper's model: dilated ResNet-101 (output stride 8) + ASPP, one decoder per task."""
    return build_kendall_model("kendall_deeplabv3_resnet101", dict(backbone_depth=101, output_stride=8), tasks,
                               num_classes, input_shape, **overrides)


@register_model
def kendall_deeplabv3_resnet50(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                               **overrides):
    """The same design on ResNet-50."""
    return build_kendall_model("kendall_deeplabv3_resnet50", dict(backbone_depth=50, output_stride=8), tasks,
                               num_classes, input_shape, **overrides)


@register_model
def kendall_deeplabv3_resnet26_slim(tasks=("semantic", "instance", "depth"), num_classes=19,
                                    input_shape=(128, 256, 3), **overrides):
    """A small member of the family for CPU runs: ResNet-26 at half width, output stride 8, ASPP of 128 channels."""
    slim = dict(backbone_depth=26, backbone_width=32, output_stride=8, aspp_channels=128, decoder_channels=128)
    return build_kendall_model("kendall_deeplabv3_resnet26_slim", slim, tasks, num_classes, input_shape, **overrides)


@register_model
def kendall_deeplabv3_resnet26_cpu(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                                   **overrides):
    """The family sized for two CPU cores (the default model of ``experiments/train.py``): ResNet-26 at quarter width,
    ASPP of 64. Output stride 8 is kept: 16 is twice as fast, but small people and far cars fall below one feature
    cell and instance AP50 halves (datasets/synthetic.md, "The default job").
    """
    cpu = dict(backbone_depth=26, backbone_width=16, output_stride=8, aspp_channels=64, decoder_channels=64)
    return build_kendall_model("kendall_deeplabv3_resnet26_cpu", cpu, tasks, num_classes, input_shape, **overrides)
