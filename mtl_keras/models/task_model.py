"""The base of the zoo's task models: a functional graph from a backbone's input to ``{task: output}``."""

import keras

from mtl_keras.models.backbones import Backbone, build_backbone, load_backbone_weights, serialize_backbone
from mtl_keras.models.hub import hub_backbone_spec
from mtl_keras.presets import PresetMixin


class MultiTaskModel(PresetMixin, keras.Model):
    """Per-task decoders on a :class:`~mtl_keras.models.backbones.Backbone`, as one flat functional graph.

    Subclasses resolve the encoder (:meth:`_resolve_encoder`), build on ``backbone.pyramid_outputs``, then call
    ``super().__init__`` and :meth:`_set_common`. The weights file lists the layers flat (no backbone group): the
    published files' layout, whichever backbone built them.
    """

    @staticmethod
    def _resolve_encoder(backbone, input_shape, build_default, backbone_weights=None):
        """``(backbone, custom)``: the given backbone (a config is resized to ``input_shape``), else
        ``build_default()``, with ``backbone_weights`` loaded if given. A keras-hub ``FeaturePyramidBackbone``
        instance or ``"keras_hub:PRESET"`` is wrapped in a :class:`~mtl_keras.models.hub.KerasHubBackbone` for
        ``input_shape``."""
        custom = backbone is not None
        if custom:
            backbone = hub_backbone_spec(backbone, input_shape)
            backbone = build_backbone(backbone, None if isinstance(backbone, Backbone) else input_shape)
        else:
            backbone = build_default()
        if backbone_weights is not None:
            load_backbone_weights(backbone, backbone_weights)
        return backbone, custom

    def _set_common(self, backbone, custom_backbone, tasks, num_classes, size_multiple):
        self.backbone = backbone
        self.custom_backbone = custom_backbone
        self.tasks = tasks
        self.num_classes = num_classes
        self.image_shape = backbone.image_shape
        self.size_multiple = size_multiple  # input height and width must be multiples of it

    def _config(self, encoder_config, head_config):
        """The full config: common entries, the encoder's (``encoder_config``, or the serialized custom backbone),
        then the head's."""
        config = {"name": self.name, "trainable": self.trainable, "tasks": list(self.tasks),
                  "num_classes": self.num_classes, "input_shape": list(self.image_shape)}
        config.update({"backbone": serialize_backbone(self.backbone)} if self.custom_backbone else encoder_config)
        config.update(head_config)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
