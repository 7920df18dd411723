"""Backbones (keras-hub style): functional ``keras.Model``s from images (RGB, 0..255) to a named feature pyramid.

A backbone's output is a dict ``{"P1": ..., "P5": ...}`` (level ``Pk`` nominally at stride ``2**k``;
``backbone.pyramid_strides`` gives the real strides, which dilation keeps at ``output_stride``). The ImageNet
normalisation is inside, so every model of the zoo takes raw images. Heads (``mtl_keras.models.kendall``,
``mtl_keras.models.mt_unet``) are built on ``backbone.pyramid_outputs``: the task model is one flat functional graph
that shares the backbone's layers, so its weights file has the same layout with or without a user-given backbone,
and ``model.backbone`` is a view whose ``trainable = False`` freezes the encoder inside the task model.

The pyramid is a chain, so it also splits into ``backbone.stem`` (images -> normalised images) and
``backbone.stages`` (``stage_names[k]``: level ``k-1`` -> level ``k``), keras Models on the backbone's own layers and
named after the backbone. A sharing scheme (cross-stitch, MTAN, NDDR-CNN) calls them in its own graph and puts its
units between them, with one backbone per task from ``type(backbone).from_config({**config, "name": ...})``
(``tests/test_backbones.py`` builds a cross-stitch network this way).

=========================  ==========================================================================================
``DilatedResNetBackbone``  the (dilated) ResNet v1 of depth 26, 50 or 101 at output stride 8, 16 or 32; layer names
                           of ``keras.applications.ResNet50/101``, so ``backbone_weights="imagenet"`` (the
                           application's download) or a local ``.h5`` file of that application loads into it
``DenseUNetEncoder``       MT-UNet's encoder (the MT-UNet paper): four densely connected blocks of two 3x3 convs, each
                           followed by dropout and 2x2 max-pooling; P1..P4 are the blocks' outputs (the U-Net skips,
                           strides 1..8), P5 the last pooled features (stride 16)
=========================  ==========================================================================================

Which head fits which backbone: Kendall et al.'s ASPP head reads the deepest level and fits any backbone; MT-UNet's
attention decoders read the deepest level and one skip per finer stride, so they fit any backbone whose strides are
powers of two (both above; inputs must then be multiples of ``model.size_multiple``).
"""

import functools
import os

import keras

from mtl_keras.layers import conv_bn_relu, image_normalization
from mtl_keras.models.resnet import dilated_resnet_pyramid, load_resnet_weights, pyramid_strides
from mtl_keras.presets import PresetMixin


@keras.saving.register_keras_serializable(package="mtl_keras")
class Backbone(PresetMixin, keras.Model):
    """Base class: a functional model ``image -> {level: features}`` with ``pyramid_strides``.

    Subclasses build their graph, call ``super().__init__(inputs=image, outputs=pyramid, ...)`` and set
    ``pyramid_strides`` ({level: stride}). Each level must be computed from the previous one only (the first from
    the output of the layer named ``stem_layer``), so that the pyramid splits into stages.
    """

    pyramid_strides = {}
    stem_layer = "image_normalization"

    # Cached outside keras' attribute tracking (functools writes the instance __dict__): the stem and stages hold
    # the backbone's own layers, so they add no weights and leave the backbone's saved layout as it is.
    @functools.cached_property
    def stem(self):
        """images -> the first stage's input, a keras Model sharing the backbone's layers."""
        return keras.Model(self.input, self.get_layer(self.stem_layer).output, name=f"{self.name}_stem")

    @functools.cached_property
    def stages(self):
        """One keras Model per level of ``stage_names``, from the previous level (the stem's output for the first)
        to this level, at stride ``pyramid_strides[level]`` with ``pyramid_channels[level]`` channels:
        ``stages[-1](...stages[0](stem(images)))`` is the deepest level."""
        inputs, stages = self.stem.output, []
        for level, features in self.output.items():
            stages.append(keras.Model(inputs, features, name=f"{self.name}_{level}"))
            inputs = features
        return stages

    @property
    def stage_names(self):
        return list(self.output)

    @property
    def pyramid_outputs(self):
        """{level: KerasTensor} of the functional graph (heads build on them)."""
        return dict(self.output)

    @property
    def pyramid_channels(self):
        return {level: int(t.shape[-1]) for level, t in self.output.items()}

    @property
    def image_shape(self):
        return tuple(self.input.shape[1:])

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "input_shape": list(self.image_shape)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="mtl_keras")
class DilatedResNetBackbone(Backbone):
    """Dilated ResNet v1 (bottleneck) encoder; ``output_stride`` 8 or 16 dilates the last stages (DeepLab).

    ``backbone_weights``: None (random), ``"imagenet"`` (``keras.applications``' download, cached under
    ``~/.keras/models``) or a local file of ``keras.applications.ResNet50/101`` (depth 50 / 101, ``width=64``); the
    caffe-style input convention of those weights is folded into ``conv1`` (see ``mtl_keras.models.resnet``).
    """

    def __init__(self, depth=101, output_stride=8, width=64, input_shape=(None, None, 3), backbone_weights=None,
                 **kwargs):
        kwargs.setdefault("name", f"dilated_resnet{depth}")
        # === Functional graph ===
        image = keras.Input(shape=tuple(input_shape), name="image")
        x = image_normalization()(image)
        pyramid = dilated_resnet_pyramid(x, depth=depth, output_stride=output_stride, width=width)
        super().__init__(inputs=image, outputs=pyramid, **kwargs)
        # === Config ===
        self.depth = depth
        self.backbone_depth = depth  # the name load_resnet_weights reads, as on task models
        self.output_stride = output_stride
        self.width = width
        self.pyramid_strides = pyramid_strides(output_stride)
        if backbone_weights is not None:
            load_backbone_weights(self, backbone_weights)

    def get_config(self):
        return {**super().get_config(), "depth": self.depth, "output_stride": self.output_stride,
                "width": self.width}


@keras.saving.register_keras_serializable(package="mtl_keras")
class DenseUNetEncoder(Backbone):
    """MT-UNet's encoder (the MT-UNet paper): blocks of ``base_filters * 2**i`` channels (64..512 in the paper).

    A dense block's output, taken before dropout, is both the skip (level P1..P4) and, after dropout and pooling,
    the next block's input; P5 is the last pooled output (the bottleneck's input). Input height and width must be
    multiples of 16.
    """

    NUM_BLOCKS = 4

    def __init__(self, base_filters=64, dropout=0.1, input_shape=(None, None, 3), **kwargs):
        kwargs.setdefault("name", "dense_unet_encoder")
        # === Functional graph ===
        image = keras.Input(shape=tuple(input_shape), name="image")
        x = image_normalization()(image)
        pyramid = {}
        for i in range(1, self.NUM_BLOCKS + 1):
            x = dense_block(x, base_filters * 2 ** (i - 1), name=f"encoder_block{i}")
            pyramid[f"P{i}"] = x
            x = keras.layers.Dropout(dropout, name=f"encoder_block{i}_dropout")(x)
            x = keras.layers.MaxPooling2D(2, name=f"encoder_block{i}_pool")(x)
        pyramid[f"P{self.NUM_BLOCKS + 1}"] = x
        super().__init__(inputs=image, outputs=pyramid, **kwargs)
        # === Config ===
        self.base_filters = base_filters
        self.dropout = dropout
        self.pyramid_strides = {f"P{i}": 2 ** (i - 1) for i in range(1, self.NUM_BLOCKS + 2)}

    def get_config(self):
        return {**super().get_config(), "base_filters": self.base_filters, "dropout": self.dropout}


def dense_block(x, filters, name):
    """Two 3x3 conv-BN-ReLU units; the second sees the concatenation of the block input and the first's output."""
    first = conv_bn_relu(x, filters, 3, name=f"{name}_conv1")
    dense = keras.layers.Concatenate(name=f"{name}_dense_concat")([x, first])
    return conv_bn_relu(dense, filters, 3, name=f"{name}_conv2")


def load_backbone_weights(model, weights):
    """ImageNet weights (``"imagenet"`` or a local ``keras.applications`` file) into the dilated ResNet of
    ``model`` (a backbone or a task model built on one); errors name the file."""
    if weights != "imagenet":
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"backbone weights {weights!r}: no such file (expected a keras.applications "
                                    f"ResNet50/101 .h5 file, or 'imagenet').")
    depth = getattr(model, "backbone_depth", None)
    if depth not in (50, 101) or getattr(model, "backbone_width", getattr(model, "width", 64)) != 64:
        raise ValueError(f"backbone weights {weights!r}: ImageNet weights exist for the full-width dilated ResNet-50 "
                         f"and ResNet-101 only; {model.name} has depth {depth} and width "
                         f"{getattr(model, 'backbone_width', getattr(model, 'width', None))}.")
    try:
        return load_resnet_weights(model, weights, depth=depth)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ValueError) and str(e).startswith("backbone weights"):
            raise
        raise ValueError(f"backbone weights {weights!r} do not load into the dilated ResNet-{depth} of "
                         f"{model.name}: {' '.join(str(e).split())[:300]}") from e


def build_backbone(backbone, input_shape=None):
    """A ``Backbone`` from an instance, or from its config dict (``keras.saving.serialize_keras_object`` form, or
    ``{"class_name": "DilatedResNetBackbone", "config": {...}}``); ``input_shape`` replaces the config's."""
    if isinstance(backbone, Backbone):
        if input_shape is not None and tuple(input_shape) != backbone.image_shape:
            raise ValueError(f"input_shape {tuple(input_shape)} differs from the backbone's {backbone.image_shape}; "
                             f"build the backbone with input_shape={tuple(input_shape)}.")
        return backbone
    if isinstance(backbone, dict):
        config = dict(backbone)
        inner = dict(config.get("config", {}))
        if input_shape is not None:
            inner["input_shape"] = list(input_shape)
        config["config"] = inner
        config.setdefault("module", None)
        config.setdefault("registered_name", f"mtl_keras>{config.get('class_name')}")
        obj = keras.saving.deserialize_keras_object(config, safe_mode=True)
        if not isinstance(obj, Backbone):
            raise ValueError(f"backbone config {config.get('class_name')!r} is not an mtl_keras Backbone.")
        return obj
    raise TypeError(f"backbone must be an mtl_keras Backbone or its config dict, got {type(backbone).__name__}.")


def serialize_backbone(backbone):
    """The config dict of ``backbone`` that :func:`build_backbone` reads back."""
    return {"class_name": type(backbone).__name__, "config": backbone.get_config()}


__all__ = ["Backbone", "DenseUNetEncoder", "DilatedResNetBackbone", "build_backbone", "dense_block",
           "load_backbone_weights", "serialize_backbone"]
