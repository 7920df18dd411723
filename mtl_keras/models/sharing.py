"""The frame of the field's multi-task architectures (LibMTL's and Vandenhende et al.'s): an encoder that gives each
task its features, one head per task.

LibMTL (``architecture/abstract_arch.py``) wraps any ``encoder_class`` and a dict of decoders; here the encoder is a
:class:`~mtl_keras.models.backbones.Backbone` (the zoo's dilated ResNet, a user's backbone, or a keras-hub
``FeaturePyramidBackbone`` through :mod:`mtl_keras.models.hub`), used whole, as copies or as stages, and the heads are
the zoo's:

- ``"deeplab"``: LibMTL's NYUv2 ``DeepLabHead`` (torchvision's): ASPP of 256 channels at rates 12/24/36 with image
  pooling, a 1x1 projection + BN + ReLU + dropout 0.5, a 3x3 conv + BN + ReLU, a biased 1x1 conv to the task;
- ``"aspp"``: Kendall et al.'s ASPP (1280 channels, no projection) and light decoder, one per task.

Every output is upsampled bilinearly to the input size. An architecture is a subclass written in three parts (layers,
functional graph, config): it resolves the encoder with :meth:`SharingModel._encoder`, computes ``{task: features}``,
builds the heads with :func:`task_heads`, calls ``super().__init__`` and then :meth:`SharingModel._set_sharing`; its
``get_config`` adds its own arguments to :meth:`SharingModel.get_config`.
"""

import keras

from mtl_keras.layers import conv_bn_relu
from mtl_keras.models.backbones import DilatedResNetBackbone, copy_backbone
from mtl_keras.models.heads import deepest_level, task_output
from mtl_keras.models.kendall import aspp, task_decoder
from mtl_keras.models.task_model import MultiTaskModel
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks

# The encoder when none is given: LibMTL's NYUv2 one (dilated ResNet-50, output stride 8, torchvision layout).
ENCODER_DEFAULTS = {"backbone_depth": 50, "backbone_width": 64, "output_stride": 8, "backbone_layout": "torchvision"}
HEAD_DEFAULTS = {"head": "deeplab", "head_channels": 256, "head_rates": (12, 24, 36)}
HEADS = ("deeplab", "aspp")


# ----------------------------------------------------------------------------------------------------------- heads
def deeplab_head(x, task, num_classes, image, channels=256, rates=(12, 24, 36), name=None):
    """LibMTL's / torchvision's ``DeepLabHead`` on ``x``, then bilinear upsampling to ``image``'s size."""
    name = name or f"{task}_head"
    y = aspp(x, channels=channels, rates=tuple(rates), name=f"{name}_aspp")
    y = conv_bn_relu(y, channels, 1, name=f"{name}_aspp_project")
    y = keras.layers.Dropout(0.5, name=f"{name}_aspp_dropout")(y)
    y = conv_bn_relu(y, channels, 3, name=f"{name}_conv")
    return task_output(y, task, num_classes, image, name=name)


def kendall_head(x, task, num_classes, image, channels=256, rates=(12, 24, 36), name=None):
    """Kendall et al.'s ASPP (1x1, 3x3 at ``rates``, image pooling; concatenated) and light decoder, for one task."""
    y = aspp(x, channels=channels, rates=tuple(rates), name=f"{name or task + '_head'}_aspp")
    return task_decoder(y, task, num_classes, image, channels=channels)


def task_heads(features, tasks, num_classes, image, head="deeplab", head_channels=256, head_rates=(12, 24, 36)):
    """``{task: output}``: the ``head`` on each task's ``features[task]``, upsampled to ``image``'s size."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
    build = deeplab_head if head == "deeplab" else kendall_head
    return {task: build(features[task], task, num_classes, image, head_channels, head_rates) for task in tasks}


# ------------------------------------------------------------------------------------------------------ the frame
class SharingModel(MultiTaskModel):
    """Base of the sharing schemes: encoder arguments, heads and the config they share (see the module docstring).

    Encoder arguments: ``backbone`` (None for the dilated ResNet below; an mtl_keras ``Backbone`` or its config; a
    keras-hub ``FeaturePyramidBackbone``; ``"keras_hub:PRESET"``), ``backbone_depth``, ``backbone_width``,
    ``output_stride``, ``backbone_layout`` ("torchvision" or "keras") and ``backbone_weights``. Head arguments:
    ``head``, ``head_channels``, ``head_rates``.
    """

    @staticmethod
    def _split_arguments(kwargs):
        """(encoder arguments, head arguments, the rest for ``keras.Model``) from ``kwargs``, defaults filled in."""
        encoder = {k: kwargs.pop(k, v) for k, v in ENCODER_DEFAULTS.items()}
        encoder["backbone"] = kwargs.pop("backbone", None)
        encoder["backbone_weights"] = kwargs.pop("backbone_weights", None)
        head = {k: kwargs.pop(k, v) for k, v in HEAD_DEFAULTS.items()}
        head["head_rates"] = tuple(head["head_rates"])
        if head["head"] not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head['head']!r}.")
        return encoder, head, kwargs

    @classmethod
    def _encoder(cls, encoder, input_shape):
        """``(backbone, custom)`` from the encoder arguments (see the class docstring)."""
        return cls._resolve_encoder(encoder["backbone"], input_shape, lambda: DilatedResNetBackbone(
            depth=encoder["backbone_depth"], output_stride=encoder["output_stride"], width=encoder["backbone_width"],
            layout=encoder["backbone_layout"], input_shape=tuple(input_shape)), encoder["backbone_weights"])

    @staticmethod
    def _copies(backbone, names, pretrained):
        """Backbones like ``backbone`` named ``names`` (the first is ``backbone`` itself, renamed copies follow);
        ``pretrained``: the copies start from ``backbone``'s weights (LibMTL builds each copy with the same pretrained
        weights), else from their own initialisation (as LibMTL's copies of an untrained encoder)."""
        return [backbone] + [copy_backbone(backbone, name, copy_weights=pretrained) for name in names[1:]]

    def _set_sharing(self, backbone, custom, tasks, num_classes, encoder, head, size_multiple=1):
        self._set_common(backbone, custom, tasks, num_classes, size_multiple=size_multiple)
        self.backbone_depth = getattr(backbone, "depth", None)
        self.backbone_width = getattr(backbone, "width", None)
        self.output_stride = getattr(backbone, "output_stride", None)
        self.backbone_layout = getattr(backbone, "layout", None)
        self.pretrained = encoder["backbone_weights"] is not None or custom
        self.head, self.head_channels, self.head_rates = head["head"], head["head_channels"], head["head_rates"]

    def get_config(self):
        return self._config(
            dict(backbone_depth=self.backbone_depth, backbone_width=self.backbone_width,
                 output_stride=self.output_stride, backbone_layout=self.backbone_layout),
            dict(head=self.head, head_channels=self.head_channels, head_rates=list(self.head_rates)))


# ------------------------------------------------------------------------------------------------------------- HPS
@keras.saving.register_keras_serializable(package="mtl_keras")
class HardParameterSharing(SharingModel):
    """Hard parameter sharing (HPS; Caruana 1993, LibMTL's ``HPS``): one encoder for all tasks, one head per task on
    its deepest pyramid level. Kendall et al.'s model is HPS with a shared ASPP; here each task has its own head."""

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **kwargs):
        tasks = validate_tasks(tasks)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        # === Functional graph ===
        image = backbone.input
        shared = backbone.pyramid_outputs[deepest_level(backbone)]
        outputs = task_heads({task: shared for task in tasks}, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)


@register_model
def hps(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """Hard parameter sharing: a dilated ResNet-50 (output stride 8) shared, a DeepLab head per task."""
    return HardParameterSharing(tasks, num_classes, input_shape, **{"name": "hps", **overrides})
