"""keras-hub backbones as mtl_keras backbones: any ``keras_hub.models.FeaturePyramidBackbone`` (ResNet, EfficientNet,
MiT, CSPNet, DenseNet, ...) under the zoo's conventions (``pip install -e ".[hub]"``).

:class:`KerasHubBackbone` takes RGB images in 0..255 (as every mtl_keras backbone), normalises them inside (ImageNet's
statistics, or the scale and offset of the preset's ``ImageConverter`` when built from a preset) and returns the
keras-hub model's ``pyramid_outputs`` under their own names (``P2``..``P5`` for a ResNet, ``P1``..``P4`` for MiT:
``pyramid_strides`` gives the real strides, read off the static shapes). The keras-hub model is called as one nested
layer; ``stages`` are Models on its own graph, from one pyramid level to the next, so stage-wise sharing schemes run
on it where each level is computed from the previous one only.

A task model takes a keras-hub backbone as ``backbone=``: the instance, ``"keras_hub:PRESET"`` (a preset name, with
its pretrained weights, or a local preset folder written by keras-hub's ``save_to_preset``), a
:class:`KerasHubBackbone` or its config (:func:`hub_backbone_spec` turns the first two into the third).
"""

import functools
import sys

import keras
import numpy as np

from mtl_keras.layers import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Normalization
from mtl_keras.models.backbones import Backbone

PREFIX = "keras_hub:"
INSTALL_HINT = 'pip install -e ".[hub]"'
PROBE_SIZE = 256  # the square probe image that gives the strides of a backbone without a static input size
SHAPE_KEYS = ("image_shape", "input_shape")  # keras-hub's names of the input-shape argument (EfficientNet: input_shape)


def import_keras_hub(spec="a keras-hub backbone"):
    """The ``keras_hub`` module, or one clear ImportError saying how to install it."""
    try:
        import keras_hub
    except ImportError as e:
        raise ImportError(f"{spec} needs the keras-hub package, which is not installed: {INSTALL_HINT}") from e
    return keras_hub


def is_keras_hub_backbone(obj):
    """Whether ``obj`` is a ``keras_hub.models.Backbone`` (without importing keras_hub: an object of its classes
    exists only once it is imported)."""
    keras_hub = sys.modules.get("keras_hub")
    return keras_hub is not None and isinstance(obj, keras_hub.models.Backbone)


def _compatible(shape, other):
    return len(shape) == len(other) and all(a is None or b is None or a == b for a, b in zip(shape, other))


def _conform(hub, input_shape):
    """``hub``, or a rebuild of it (same config and weights) whose input shape fits ``input_shape`` (keras-hub
    backbones with static sizes inside, e.g. MiT's reshapes, are built for one input size)."""
    shape = tuple(hub.input.shape[1:])
    if _compatible(shape, input_shape):
        return hub
    config = hub.get_config()
    key = next((k for k in SHAPE_KEYS if k in config), None)
    if key is None:
        raise ValueError(f"keras-hub backbone {hub.name} takes images of shape {shape}, not {tuple(input_shape)}, "
                         f"and its config has no {' or '.join(SHAPE_KEYS)} to rebuild it with.")
    rebuilt = type(hub).from_config({**config, key: tuple(input_shape)})
    try:
        rebuilt.set_weights(hub.get_weights())
    except ValueError as e:
        raise ValueError(f"keras-hub backbone {hub.name}: its weights do not fit a rebuild for input shape "
                         f"{tuple(input_shape)} (built for {shape}); build it with {key}={tuple(input_shape)}.") from e
    return rebuilt


def normalization_from_converter(converter, channels=3):
    """``{"mean": [...], "std": [...]}`` in 0..255 pixel units equal to a keras-hub ``ImageConverter``'s
    ``x * scale + offset`` (``(x - mean) / std`` with ``std = 1 / scale``, ``mean = -offset / scale``)."""
    scale = np.broadcast_to(np.asarray(1.0 if converter.scale is None else converter.scale, "float64"), (channels,))
    offset = np.broadcast_to(np.asarray(0.0 if converter.offset is None else converter.offset, "float64"),
                             (channels,))
    if not np.all(scale != 0):
        raise ValueError(f"image converter {converter.name}: a scale of 0 ({converter.scale}) maps every image to a "
                         f"constant.")
    return {"mean": [float(v) for v in -offset / scale], "std": [float(v) for v in 1.0 / scale]}


def preset_normalization(keras_hub, preset, channels=3):
    """The normalisation of ``preset``'s image converter (``image_converter.json``), or None if it has none."""
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except (FileNotFoundError, ValueError):  # no image_converter.json, or no converter class for this backbone
        return None
    return normalization_from_converter(converter, channels)


def _stride(size, level_size):
    return max(1, round(size / level_size))


@keras.saving.register_keras_serializable(package="mtl_keras")
class KerasHubBackbone(Backbone):
    """A keras-hub ``FeaturePyramidBackbone`` as an mtl_keras :class:`~mtl_keras.models.backbones.Backbone`.

    ``hub_backbone``: the keras-hub backbone (an instance, or its ``keras.saving.serialize_keras_object`` dict: the
    config rebuilds it with no download). ``input_shape``: the image shape, None for the keras-hub model's; a
    keras-hub model built for another static size is rebuilt for this one (same config and weights).
    ``normalization``: ``{"mean": [...], "std": [...]}`` in 0..255 pixel units, None for ImageNet's (torchvision's,
    as the zoo's backbones; :meth:`from_hub_preset` reads the preset's image converter instead).

    ``pyramid_strides`` come from the static shapes of the pyramid (input height over level height); with no static
    input size, from a ``PROBE_SIZE`` square probe run symbolically through the keras-hub model. ``stem`` is the
    normalisation (no weights), ``stages`` the keras-hub model's own graph between consecutive pyramid levels.
    """

    def __init__(self, hub_backbone, input_shape=None, normalization=None, **kwargs):
        if isinstance(hub_backbone, dict):
            import_keras_hub("KerasHubBackbone")  # registers keras-hub's classes for deserialisation
            hub_backbone = keras.saving.deserialize_keras_object(hub_backbone)
        pyramid = getattr(hub_backbone, "pyramid_outputs", None)
        if not isinstance(hub_backbone, keras.Model) or not pyramid:
            raise ValueError(f"{type(hub_backbone).__name__} {getattr(hub_backbone, 'name', '')!s} has no feature "
                             f"pyramid: mtl_keras needs a keras_hub.models.FeaturePyramidBackbone (ResNet, "
                             f"EfficientNet, MiT, CSPNet, DenseNet, ...).")
        hub_shape = tuple(hub_backbone.input.shape[1:])
        if input_shape is None:
            input_shape = hub_shape
        input_shape = tuple(a if a is not None else b for a, b in zip(input_shape, hub_shape)) \
            if len(input_shape) == len(hub_shape) else tuple(input_shape)
        hub_backbone = _conform(hub_backbone, input_shape)
        pyramid = hub_backbone.pyramid_outputs
        channels = input_shape[-1] or 3
        if normalization is None:
            normalization = {"mean": list(IMAGENET_MEAN_RGB), "std": list(IMAGENET_STD_RGB)}
        mean = np.broadcast_to(np.asarray(normalization["mean"], "float64"), (channels,))
        std = np.broadcast_to(np.asarray(normalization["std"], "float64"), (channels,))
        kwargs.setdefault("name", f"keras_hub_{hub_backbone.name}")

        # === Layers ===
        normalize = Normalization(axis=-1, mean=mean, variance=np.square(std), name=self.stem_layer)
        extractor = keras.Model(hub_backbone.inputs, dict(pyramid), name=f"{kwargs['name']}_pyramid")
        # === Functional graph ===
        image = keras.Input(shape=input_shape, name="image")
        outputs = extractor(normalize(image))
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        # Outside keras' tracking (as Backbone.stem): the model's weights are the pyramid's, the layers the extractor's.
        self.__dict__["_hub_backbone"] = hub_backbone
        self.__dict__["_extractor"] = extractor
        self.normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        self.pyramid_strides, self.strides_from = self._strides()

    @property
    def hub_backbone(self):
        """The wrapped keras-hub backbone (its layers are this backbone's)."""
        return self.__dict__["_hub_backbone"]

    def _strides(self):
        """``({level: stride}, "static shapes" or "probe")``."""
        height, width = self.image_shape[:2]
        outputs = dict(self.output)
        if height is None or width is None or any(t.shape[1] is None for t in outputs.values()):
            height = width = PROBE_SIZE
            probe = keras.KerasTensor((1, PROBE_SIZE, PROBE_SIZE, self.image_shape[-1]))
            outputs = self.__dict__["_extractor"].compute_output_spec(probe)
            how = "probe"
        else:
            how = "static shapes"
        return {level: _stride(height, int(t.shape[1])) for level, t in outputs.items()}, how

    @functools.cached_property
    def stages(self):
        """One Model per pyramid level on the keras-hub model's own graph: the hub input -> the first level, then
        level k-1 -> level k (weights shared with the backbone)."""
        hub = self.hub_backbone
        pyramid = hub.pyramid_outputs
        inputs, stages = hub.input, []
        for level in self.stage_names:
            try:
                stage = keras.Model(inputs, pyramid[level], name=f"{self.name}_{level}")
            except ValueError as e:
                raise ValueError(
                    f"keras-hub backbone {hub.name} ({type(hub).__name__}) does not split into stages at its "
                    f"pyramid levels: level {level} is not computed from the previous level only; stage-wise "
                    f"schemes need a sequential pyramid ({' '.join(str(e).split())[:200]})") from e
            stages.append(stage)
            inputs = pyramid[level]
        owners = [id(w) for stage in stages for w in stage.weights]
        if len(owners) != len(set(owners)):
            raise ValueError(f"keras-hub backbone {hub.name} ({type(hub).__name__}) does not split into stages at "
                             f"its pyramid levels: some layers are used by two stages; stage-wise schemes need a "
                             f"sequential pyramid.")
        return stages

    def get_config(self):
        return {**super().get_config(), "hub_backbone": keras.saving.serialize_keras_object(self.hub_backbone),
                "normalization": {k: list(v) for k, v in self.normalization.items()}}

    @classmethod
    def from_hub_preset(cls, preset, input_shape=None, **kwargs):
        """``keras_hub.models.Backbone.from_preset(preset)`` (a preset name, downloading its weights, or a local
        preset folder) wrapped, with the preset image converter's normalisation where it has one."""
        keras_hub = import_keras_hub(f"backbone {PREFIX}{preset}")
        try:
            hub = keras_hub.models.Backbone.from_preset(preset)
        except Exception as e:  # keras-hub raises ValueError, FileNotFoundError, download errors...
            raise ValueError(f"backbone {PREFIX}{preset}: keras-hub cannot load preset {preset!r} "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
        if not getattr(hub, "pyramid_outputs", None):
            raise ValueError(f"backbone {PREFIX}{preset}: keras-hub's {type(hub).__name__} has no feature pyramid; "
                             f"mtl_keras needs a keras_hub.models.FeaturePyramidBackbone (ResNet, EfficientNet, MiT, "
                             f"CSPNet, DenseNet, ...).")
        channels = (tuple(input_shape) if input_shape is not None else tuple(hub.input.shape[1:]))[-1] or 3
        kwargs.setdefault("normalization", preset_normalization(keras_hub, preset, channels))
        return cls(hub, input_shape=input_shape, **kwargs)


def hub_backbone_spec(backbone, input_shape=None):
    """A task model's ``backbone=`` argument with the keras-hub forms resolved: a keras-hub backbone instance or
    ``"keras_hub:PRESET"`` becomes a :class:`KerasHubBackbone` for ``input_shape``; anything else is returned as
    given (an mtl_keras backbone or its config)."""
    if isinstance(backbone, str):
        if not backbone.startswith(PREFIX) or not backbone[len(PREFIX):]:
            raise ValueError(f"backbone {backbone!r}: a string backbone is '{PREFIX}PRESET' (a keras-hub preset name "
                             f"or a local preset folder).")
        return KerasHubBackbone.from_hub_preset(backbone[len(PREFIX):], input_shape=input_shape)
    if is_keras_hub_backbone(backbone):
        return KerasHubBackbone(backbone, input_shape=input_shape)
    return backbone


__all__ = ["KerasHubBackbone", "hub_backbone_spec", "import_keras_hub", "is_keras_hub_backbone",
           "normalization_from_converter", "preset_normalization"]
