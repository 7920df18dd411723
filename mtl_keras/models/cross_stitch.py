"""Stage-wise sharing on one backbone copy per task: Cross-stitch networks and NDDR-CNN.

Each task has its own copy of the encoder (:meth:`SharingModel._copies`), split into a stem and stages by
:func:`~mtl_keras.models.backbones.resnet_style_stages` (on the dilated ResNet: LibMTL's stem, conv1..max-pool, then
layer1..layer4 = levels P2..P5; on other backbones their own stem and stages). Units between the stages mix the
tasks' features; each task's head reads its own copy's deepest level.

- **Cross-stitch** (Misra et al., CVPR 2016; LibMTL's ``Cross_stitch``): after every stage but the deepest (P2, P3,
  P4 on the ResNet: after layer1..layer3), task ``t`` continues with ``sum_j a[t, j] x_j``, one scalar per pair of
  tasks.
- **NDDR-CNN** (Gao et al., CVPR 2019; Vandenhende et al.'s ``models/nddr_cnn.py``): after the chosen stages (their
  NYUD/PASCAL configs: the stem and every stage, the deepest included), task ``t`` continues with
  ReLU(BN(1x1 conv, no bias, of the concatenation of all tasks' features)), the conv starting as ``alpha`` times the
  identity on the task's own channels and ``beta`` times the identity on each other task's.
"""

import keras
from keras import ops

from mtl_keras.layers import BatchNormalization
from mtl_keras.models.backbones import resnet_style_stages
from mtl_keras.models.sharing import SharingModel, task_heads
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks

STEM = "stem"  # the name of the stem's output among NDDR-CNN's stages
# PyTorch's BatchNorm2d(momentum=0.05) of Vandenhende et al.'s NDDR layer ("as NDDR-CNN repo"): Keras' momentum is
# the weight of the old moving average, 1 - 0.05.
NDDR_BN_MOMENTUM = 0.95


# --------------------------------------------------------------------------------------------------- copies, stages
def task_copies(backbone, tasks, pretrained):
    """``[(stem, stages, levels)]``, one per task: ``backbone`` for the first task and renamed copies of it for the
    others (:meth:`SharingModel._copies`), each split by :func:`resnet_style_stages`."""
    names = [backbone.name] + [f"{backbone.name}_{task}" for task in tasks[1:]]
    return [resnet_style_stages(copy) for copy in SharingModel._copies(backbone, names, pretrained=pretrained)]


def stem_outputs(splits, image):
    """Each task's stem on ``image``."""
    return [stem(image) for stem, _, _ in splits]


def stage_outputs(splits, index, features):
    """Each task's stage ``index`` on its own entry of ``features``."""
    return [stages[index](x) for (_, stages, _), x in zip(splits, features)]


# ----------------------------------------------------------------------------------------------------- cross-stitch
@keras.saving.register_keras_serializable(package="mtl_keras")
class CrossStitchUnits(keras.layers.Layer):
    """Cross-stitch units as LibMTL allocates them: one ``(num_units, T, T)`` weight, all ones at the start (LibMTL's
    ``torch.ones``; Misra et al. start at 0.9 on the diagonal and 0.1 elsewhere). Called on the T tasks' features
    with ``index=i``, it returns ``[sum_j alpha[i, t, j] x_j for t]``."""

    def __init__(self, num_tasks, num_units, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = int(num_tasks)
        self.num_units = int(num_units)

    def build(self, input_shape):
        self.alpha = self.add_weight(shape=(self.num_units, self.num_tasks, self.num_tasks), initializer="ones",
                                     name="alpha")

    def call(self, inputs, index=0):
        if len(inputs) != self.num_tasks:
            raise ValueError(f"{self.name}: expected the features of {self.num_tasks} tasks, got {len(inputs)}.")
        alpha = ops.cast(self.alpha[index], inputs[0].dtype)
        return [sum(alpha[t, j] * x for j, x in enumerate(inputs)) for t in range(self.num_tasks)]

    def compute_output_shape(self, input_shape):
        return list(input_shape)

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "num_units": self.num_units}


@keras.saving.register_keras_serializable(package="mtl_keras")
class CrossStitchNetwork(SharingModel):
    """Cross-stitch networks (LibMTL's ``Cross_stitch``): one encoder copy per task, a cross-stitch unit after every
    stage but the deepest, each task's head on its own copy's deepest level. Arguments: :class:`SharingModel`'s.

    The unit weights are one ``(S, T, T)`` variable for the S stages, as LibMTL's ``cross_unit`` (4, T, T) on a ResNet:
    the unit after the deepest stage is allocated (the trainable parameter count matches LibMTL's) and never used."""

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **kwargs):
        tasks = validate_tasks(tasks)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        splits = task_copies(backbone, tasks, pretrained=encoder["backbone_weights"] is not None or custom)
        num_stages = len(splits[0][1])
        units = CrossStitchUnits(len(tasks), num_units=num_stages, name="cross_stitch")
        # === Functional graph ===
        image = keras.Input(backbone.image_shape, name="image")
        features = stem_outputs(splits, image)
        for i in range(num_stages):
            features = stage_outputs(splits, i, features)
            if i < num_stages - 1:
                features = units(features, index=i)
        outputs = task_heads(dict(zip(tasks, features)), tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)


@register_model
def cross_stitch(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """Cross-stitch networks: a dilated ResNet-50 (output stride 8) per task, cross-stitch units after layer1..3,
    a DeepLab head per task."""
    return CrossStitchNetwork(tasks, num_classes, input_shape, **{"name": "cross_stitch", **overrides})


# --------------------------------------------------------------------------------------------------------- NDDR-CNN
@keras.saving.register_keras_serializable(package="mtl_keras")
class NDDRInitializer(keras.initializers.Initializer):
    """The start of task ``task``'s NDDR 1x1 conv (kernel ``(1, 1, T * C, C)``): ``alpha`` times the identity on its
    own task's C channels, ``beta`` times the identity on every other task's (Vandenhende et al.'s ``NDDRLayer``)."""

    def __init__(self, task, num_tasks, alpha=0.9, beta=0.1):
        self.task, self.num_tasks, self.alpha, self.beta = int(task), int(num_tasks), float(alpha), float(beta)

    def __call__(self, shape, dtype=None):
        channels = int(shape[-1])
        if tuple(shape) != (1, 1, self.num_tasks * channels, channels):
            raise ValueError(f"NDDRInitializer: expected a kernel (1, 1, {self.num_tasks} * C, C), got {shape}.")
        eye = ops.eye(channels, dtype=dtype)
        blocks = [eye * (self.alpha if j == self.task else self.beta) for j in range(self.num_tasks)]
        return ops.reshape(ops.concatenate(blocks, axis=0), tuple(shape))

    def get_config(self):
        return {"task": self.task, "num_tasks": self.num_tasks, "alpha": self.alpha, "beta": self.beta}


def nddr_unit(features, tasks, stage, alpha=0.9, beta=0.1):
    """Vandenhende et al.'s ``NDDRLayer`` on the tasks' ``features`` at ``stage``: for each task, 1x1 conv (no bias)
    of the concatenation + BN + ReLU, back to the stage's channels."""
    channels = int(features[0].shape[-1])
    x = keras.layers.Concatenate(name=f"nddr_{stage}_concat")(features)
    out = []
    for t, task in enumerate(tasks):
        name = f"nddr_{stage}_{task}"
        y = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_conv",
                                kernel_initializer=NDDRInitializer(t, len(tasks), alpha, beta))(x)
        y = BatchNormalization(epsilon=1e-5, momentum=NDDR_BN_MOMENTUM, name=f"{name}_bn")(y)
        out.append(keras.layers.Activation("relu", name=f"{name}_relu")(y))
    return out


def default_nddr_stages(stem, levels):
    """Vandenhende et al.'s NDDR stages: after the stem (where it has weights: on the ResNet, conv1..max-pool) and
    after every stage."""
    return ([STEM] if stem.weights else []) + list(levels)


@keras.saving.register_keras_serializable(package="mtl_keras")
class NDDRCNN(SharingModel):
    """NDDR-CNN (Gao et al., CVPR 2019; Vandenhende et al.'s implementation): one encoder copy per task, an NDDR
    unit after each of ``nddr_stages`` ("stem" and pyramid levels; None: the stem, where it has weights, and every
    stage, their configs), each task's head on its own path's deepest level. ``nddr_alpha``, ``nddr_beta``: the
    units' start (their NYUD config's 0.9 / 0.1). Other arguments: :class:`SharingModel`'s."""

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                 nddr_alpha=0.9, nddr_beta=0.1, nddr_stages=None, **kwargs):
        tasks = validate_tasks(tasks)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        splits = task_copies(backbone, tasks, pretrained=encoder["backbone_weights"] is not None or custom)
        stem, _, levels = splits[0]
        chosen = default_nddr_stages(stem, levels) if nddr_stages is None else list(nddr_stages)
        unknown = [s for s in chosen if s not in [STEM] + levels]
        if unknown:
            raise ValueError(f"nddr_stages {unknown} are not stages of {backbone.name}: choose among "
                             f"{[STEM] + levels}.")
        # === Functional graph (the NDDR units' layers are made where they are used) ===
        image = keras.Input(backbone.image_shape, name="image")
        features = stem_outputs(splits, image)
        if STEM in chosen:
            features = nddr_unit(features, tasks, STEM, nddr_alpha, nddr_beta)
        for i, level in enumerate(levels):
            features = stage_outputs(splits, i, features)
            if level in chosen:
                features = nddr_unit(features, tasks, level, nddr_alpha, nddr_beta)
        outputs = task_heads(dict(zip(tasks, features)), tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.nddr_alpha, self.nddr_beta = float(nddr_alpha), float(nddr_beta)
        self.nddr_stages = None if nddr_stages is None else tuple(nddr_stages)

    def get_config(self):
        return {**super().get_config(), "nddr_alpha": self.nddr_alpha, "nddr_beta": self.nddr_beta,
                "nddr_stages": None if self.nddr_stages is None else list(self.nddr_stages)}


@register_model
def nddr_cnn(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """NDDR-CNN: a dilated ResNet-50 (output stride 8) per task, NDDR units after the stem and after every stage
    (alpha 0.9, beta 0.1), a DeepLab head per task."""
    return NDDRCNN(tasks, num_classes, input_shape, **{"name": "nddr_cnn", **overrides})
