"""Backbones (keras-hub style): functional models from RGB images (0..255) to a pyramid ``{"P1": ..., "P5": ...}``.

Level ``Pk`` is nominally at stride ``2**k`` (``pyramid_strides`` gives the real ones); the ImageNet normalisation is
inside. Heads build on ``pyramid_outputs`` as one flat graph sharing the backbone's layers, so the weights layout is
the same with or without a user-given backbone, and ``model.backbone.trainable = False`` freezes the encoder. The
pyramid also splits into ``stem`` and ``stages`` (models on the same layers), so a sharing scheme (cross-stitch, MTAN,
NDDR-CNN) can put units between stages (``tests/test_backbones.py`` builds a cross-stitch network). Kendall et al.'s
ASPP head fits any backbone; MT-UNet's decoders need strides that are powers of two.
"""

import functools
import os

import keras

from mtl_keras.layers import conv_bn_relu, image_normalization
from mtl_keras.models.resnet import dilated_resnet_pyramid, load_resnet_weights, pyramid_strides
from mtl_keras.presets import PresetMixin


@keras.saving.register_keras_serializable(package="mtl_keras")
class Backbone(PresetMixin, keras.Model):
    """Base class: ``image -> {level: features}``; subclasses set ``pyramid_strides``. Each level is computed from the
    previous one only (the first from the layer ``stem_layer``), so that the pyramid splits into stages."""

    pyramid_strides = {}
    stem_layer = "image_normalization"

    # Cached outside keras' attribute tracking (functools writes __dict__), so the saved layout stays the same.
    @functools.cached_property
    def stem(self):
        """images -> the first stage's input, a keras Model sharing the backbone's layers."""
        return keras.Model(self.input, self.get_layer(self.stem_layer).output, name=f"{self.name}_stem")

    @functools.cached_property
    def stages(self):
        """One Model per level, previous level -> this level: ``stages[-1](...stages[0](stem(images)))``."""
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
    """Dilated ResNet v1 of depth 26, 50 or 101; ``output_stride`` 8 or 16 dilates the last stages (DeepLab).
    ``backbone_weights``: None, ``"imagenet"`` or a local ``keras.applications.ResNet50/101`` file (width 64).
    ``layout``: "keras" (keras.applications' convention, whose ImageNet weights load) or "torchvision" (no conv bias,
    stride on the 3x3 conv: LibMTL's encoder, for parameter-count parity)."""

    def __init__(self, depth=101, output_stride=8, width=64, input_shape=(None, None, 3), backbone_weights=None,
                 layout="keras", **kwargs):
        kwargs.setdefault("name", f"dilated_resnet{depth}")
        image = keras.Input(shape=tuple(input_shape), name="image")
        x = image_normalization()(image)
        pyramid = dilated_resnet_pyramid(x, depth=depth, output_stride=output_stride, width=width, layout=layout)
        super().__init__(inputs=image, outputs=pyramid, **kwargs)
        self.layout = layout
        self.depth = depth
        self.backbone_depth = depth  # the name load_resnet_weights reads, as on task models
        self.output_stride = output_stride
        self.width = width
        self.pyramid_strides = pyramid_strides(output_stride)
        if backbone_weights is not None:
            load_backbone_weights(self, backbone_weights)

    def get_config(self):
        config = {**super().get_config(), "depth": self.depth, "output_stride": self.output_stride,
                  "width": self.width}
        if self.layout != "keras":  # the published configs stay as they were
            config["layout"] = self.layout
        return config


@keras.saving.register_keras_serializable(package="mtl_keras")
class DenseUNetEncoder(Backbone):
    """MT-UNet's encoder: four dense blocks of ``base_filters * 2**i`` channels (64..512 in the paper), each followed
    by dropout and 2x2 max-pooling. P1..P4 are the blocks' outputs before dropout (the skips), P5 the last pooled
    output (stride 16)."""

    NUM_BLOCKS = 4

    def __init__(self, base_filters=64, dropout=0.1, input_shape=(None, None, 3), **kwargs):
        kwargs.setdefault("name", "dense_unet_encoder")
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
    """ImageNet weights into the dilated ResNet of ``model`` (a backbone or a task model built on one)."""
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
    """A ``Backbone`` from an instance or its config dict (``{"class_name": ..., "config": {...}}``);
    ``input_shape`` replaces the config's."""
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


def copy_backbone(backbone, name, copy_weights=True):
    """A new backbone of ``backbone``'s class and config named ``name``, its own variables; with ``copy_weights`` they
    start as ``backbone``'s (a copy of a pretrained encoder), else from their own initialisation."""
    clone = type(backbone).from_config({**backbone.get_config(), "name": name})
    if copy_weights:
        clone.set_weights(backbone.get_weights())
    return clone


def resnet_style_stages(backbone):
    """``(stem, stages, levels)``: the split of LibMTL's ResNet schemes, images -> ``stem`` -> ``stages[0]`` -> ... ->
    ``stages[-1]``, ``levels[i]`` naming the output of ``stages[i]``; Models on ``backbone``'s own layers.

    On a :class:`DilatedResNetBackbone` the stem is LibMTL's (conv1, BN, ReLU and the max-pool: images -> stride 4)
    and the stages are conv2..conv5 (LibMTL's layer1..layer4; levels P2..P5). On any other backbone: its ``stem`` and
    ``stages`` (the levels are its pyramid levels)."""
    if not isinstance(backbone, DilatedResNetBackbone):
        return backbone.stem, list(backbone.stages), list(backbone.stage_names)
    cached = backbone.__dict__.get("_resnet_style_stages")  # outside keras' tracking, as Backbone.stem
    if cached is None:
        pooled = backbone.get_layer("pool1_pool").output
        stem = keras.Model(backbone.input, pooled, name=f"{backbone.name}_stem_pool")
        levels = [level for level in backbone.stage_names if level != "P1"]
        inputs, stages = pooled, []
        for level in levels:
            stages.append(keras.Model(inputs, backbone.output[level], name=f"{backbone.name}_{level}"))
            inputs = backbone.output[level]
        cached = backbone.__dict__["_resnet_style_stages"] = (stem, stages, levels)
    return cached[0], list(cached[1]), list(cached[2])


def serialize_backbone(backbone):
    """The config dict of ``backbone`` that :func:`build_backbone` reads back."""
    return {"class_name": type(backbone).__name__, "config": backbone.get_config()}


__all__ = ["Backbone", "DenseUNetEncoder", "DilatedResNetBackbone", "build_backbone", "copy_backbone", "dense_block",
           "load_backbone_weights", "resnet_style_stages", "serialize_backbone"]
