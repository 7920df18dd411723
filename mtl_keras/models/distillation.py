"""Multi-modal distillation: PAD-Net (Xu et al., CVPR 2018) and MTI-Net (Vandenhende et al., ECCV 2020), as
Vandenhende et al.'s code (``Multi-Task-Learning-PyTorch``: ``models/padnet.py``, ``models/mti_net.py``,
``models/layers.py``) builds them.

Both make an initial per-task prediction from the shared backbone features (a per-task feature refinement), then
distil: each task's features plus, from every other task, that task's features gated by a spatial attention mask
(``SABlock``: ``conv3x3(x) * sigmoid(conv3x3(x))``, no biases), then final heads. MTI-Net does it at every scale,
propagating the task features from coarser to finer scales (its feature propagation module, FPM) and aggregating the
distilled scales (upsampled to the finest and concatenated) before the heads.

Their code also decodes the refined features into initial predictions (a biased 1x1 conv per task and scale) trained
by deep-supervision losses; those predictions feed no final output, and the zoo's models output ``{task:
prediction}`` only (its trainer has no auxiliary outputs), so they are left out: the refined features that feed the
distillation are kept, and trained through the final predictions only.
"""

import keras
from keras import ops

from mtl_keras.layers import BatchNormalization, ResizeLike
from mtl_keras.models.heads import deepest_level, task_output
from mtl_keras.models.resnet import bottleneck_block
from mtl_keras.models.sharing import SharingModel, task_heads
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks


# ---------------------------------------------------------------------------------------------------------- blocks
def basic_block(x, filters, name):
    """torchvision's ``BasicBlock`` (stride 1): two 3x3 convs (no bias) + BN, the identity or, where the width
    changes, a 1x1 conv (no bias) + BN as the shortcut (their ``downsample``), then ReLU."""
    shortcut = x
    if int(x.shape[-1]) != filters:
        shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_0_conv")(x)
        shortcut = BatchNormalization(epsilon=1e-5, name=f"{name}_0_bn")(shortcut)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_1_conv")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}_1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}_2_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def bottleneck(x, channels, name):
    """torchvision's ``Bottleneck(in, channels // 4)``, with a 1x1 conv + BN shortcut where the width changes."""
    return bottleneck_block(x, channels // 4, conv_shortcut=int(x.shape[-1]) != channels, name=name,
                            layout="torchvision")


def sa_block(x, channels, name):
    """Their ``SABlock``: ``conv3x3(x) * sigmoid(conv3x3(x))``, both without bias."""
    mask = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, activation="sigmoid",
                               name=f"{name}_attention")(x)
    features = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    return keras.layers.Multiply(name=f"{name}_apply")([features, mask])


def se_block(x, channels, name, r=16):
    """Their ``SEBlock``: ``x * sigmoid(fc(relu(fc(mean over space))))``, ``channels // r`` hidden units (at least
    one: theirs has ``channels // r``, zero below ``r`` channels)."""
    squeeze = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    squeeze = keras.layers.Dense(max(1, channels // r), activation="relu", name=f"{name}_fc1")(squeeze)
    squeeze = keras.layers.Dense(channels, activation="sigmoid", name=f"{name}_fc2")(squeeze)
    return keras.layers.Multiply(name=f"{name}_apply")([x, squeeze])


def distill(features, tasks, channels, name):
    """Their ``MultiTaskDistillationModule``: ``{t: features[t] + sum over a != t of SA_{t<-a}(features[a])}``, one
    SABlock per ordered pair of tasks (T (T - 1) of them)."""
    out = {}
    for t in tasks:
        messages = [sa_block(features[a], channels, name=f"{name}_{t}_from_{a}") for a in tasks if a != t]
        out[t] = keras.layers.Add(name=f"{name}_{t}_add")([features[t]] + messages) if messages else features[t]
    return out


@keras.saving.register_keras_serializable(package="mtl_keras")
class TaskSoftmaxGate(keras.layers.Layer):
    """MTI-Net's FPM gate: the channels of ``logits`` (B, H, W, C) in groups of ``groups`` consecutive ones (their
    ``view(B, C // N, N, H, W)``), a softmax within each group, times ``features`` grouped alike."""

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)

    def call(self, inputs):
        logits, features = inputs
        shape = ops.shape(features)
        grouped = (shape[0], shape[1], shape[2], int(features.shape[-1]) // self.groups, self.groups)
        mask = ops.softmax(ops.reshape(logits, grouped), axis=-1)
        return ops.reshape(mask * ops.reshape(features, grouped), shape)

    def compute_output_shape(self, input_shapes):
        return tuple(input_shapes[1])

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


def feature_propagation(features, tasks, channels, name):
    """Their ``FPM``: on the tasks' features concatenated (N C channels), two BasicBlocks to N C / 4 and a biased 1x1
    conv back to N C give a softmax gate (:class:`TaskSoftmaxGate`); a BasicBlock reduces the gated features to C;
    per task, a squeeze-and-excitation block on them plus the task's own features."""
    n = len(tasks)
    concat = keras.layers.Concatenate(name=f"{name}_concat")([features[t] for t in tasks])
    shared = basic_block(concat, n * channels // 4, name=f"{name}_nonlinear1")
    shared = basic_block(shared, n * channels // 4, name=f"{name}_nonlinear2")
    shared = keras.layers.Conv2D(n * channels, 1, name=f"{name}_nonlinear_conv")(shared)
    shared = TaskSoftmaxGate(n, name=f"{name}_gate")([shared, concat])
    shared = basic_block(shared, channels, name=f"{name}_reduction")
    return {t: keras.layers.Add(name=f"{name}_{t}_add")([se_block(shared, channels, name=f"{name}_{t}_se"),
                                                          features[t]]) for t in tasks}


# --------------------------------------------------------------------------------------------------------- PAD-Net
@keras.saving.register_keras_serializable(package="mtl_keras")
class PADNet(SharingModel):
    """PAD-Net (Xu et al., CVPR 2018) as Vandenhende et al.'s ``PADNet``: on the backbone's deepest level, per task two
    torchvision Bottlenecks to ``head_channels`` (256 in their code; their initial task prediction's features),
    multi-modal distillation (:func:`distill`), and per task a final head of two Bottlenecks and the zoo's output
    (1x1 conv, upsampled to the input size).

    Their code also trains a 1x1-conv initial prediction per task on those features by deep supervision; it feeds no
    final output and the zoo's trainer has no auxiliary outputs, so it is left out and the features are trained
    through the final predictions only. The final heads are PAD-Net's own (not a zoo head): ``head`` and
    ``head_rates`` do not apply; ``head_channels`` (a multiple of 4) is the width of the task features throughout.
    """

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **kwargs):
        tasks = validate_tasks(tasks)
        for key in ("head", "head_rates"):
            if key in kwargs:
                raise ValueError(f"PAD-Net's final heads are its own (two Bottlenecks and a 1x1 conv); {key!r} does "
                                 f"not apply (head_channels sets their width).")
        encoder, head, kwargs = self._split_arguments(kwargs)
        channels = int(head["head_channels"])
        if channels % 4:
            raise ValueError(f"PAD-Net's head_channels must be a multiple of 4 (Bottleneck width), got {channels}.")
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        # === Functional graph ===
        image = backbone.input
        shared = backbone.pyramid_outputs[deepest_level(backbone)]
        initial = {}
        for t in tasks:
            x = bottleneck(shared, channels, name=f"{t}_initial_block1")
            initial[t] = bottleneck(x, channels, name=f"{t}_initial_block2")
        distilled = distill(initial, tasks, channels, name="distillation")
        outputs = {}
        for t in tasks:
            x = bottleneck(distilled[t], channels, name=f"{t}_head_block1")
            x = bottleneck(x, channels, name=f"{t}_head_block2")
            outputs[t] = task_output(x, t, num_classes, image, name=f"{t}_head")
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)

    def get_config(self):
        config = super().get_config()
        config.pop("head")
        config.pop("head_rates")
        return config


@register_model
def pad_net(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """PAD-Net: a dilated ResNet-50 (output stride 8) shared, per-task initial features (256 channels), multi-modal
    distillation, PAD-Net's final heads."""
    return PADNet(tasks, num_classes, input_shape, **{"name": "pad_net", **overrides})


# --------------------------------------------------------------------------------------------------------- MTI-Net
def mti_levels(backbone):
    """The pyramid levels MTI-Net uses, finest first: those of stride 4 or more (P2..P5 of the dilated ResNet, where
    P3..P5 all have the output stride 8, and of a keras-hub ResNet)."""
    levels = [level for level, stride in backbone.pyramid_strides.items() if stride >= 4]
    if not levels:
        raise ValueError(f"{backbone.name}: MTI-Net needs pyramid levels of stride 4 or more.")
    return levels


@keras.saving.register_keras_serializable(package="mtl_keras")
class MTINet(SharingModel):
    """MTI-Net (Vandenhende et al., ECCV 2020) as their ``MTINet``, on the backbone's levels of stride 4 or more
    (:func:`mti_levels`; their HRNet's four scales are strides 4/8/16/32, a keras-hub ResNet gives the same; the
    dilated ResNet at output stride 8 gives P2 at stride 4 and P3..P5 at stride 8, so three of its four "scales"
    share a resolution and the propagation between them resizes nothing).

    From the coarsest level to the finest: per task an initial prediction module (two BasicBlocks to
    ``task_channels[level]`` on the level's features, concatenated below the coarsest with the task's propagated
    features of the coarser level, upsampled bilinearly to this level's size), then (except at the finest) the
    feature propagation module (:func:`feature_propagation`). At every level the multi-modal distillation
    (:func:`distill`); per task the distilled levels upsampled to the finest and concatenated (their feature
    aggregation), then the zoo's head (``head``, DeepLab by default; their HRNet config's head is a 1x1 conv + BN +
    ReLU and a 1x1 conv on this concatenation: replaced by the zoo's heads as in every zoo architecture).

    ``task_channels``: the task features' width per level (finest first), one int for all, or None: each level's
    backbone channels // 8 (32/64/128/256 on ResNet-50; HRNet-18's own widths are 18/36/72/144).

    Their code trains the initial predictions (a 1x1 conv per task and scale) by deep supervision; they feed no final
    output and the zoo's trainer has no auxiliary outputs, so they are left out and the refined features are trained
    through the final predictions only.
    """

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                 task_channels=None, **kwargs):
        tasks = validate_tasks(tasks)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        levels = mti_levels(backbone)
        pyramid, strides = backbone.pyramid_outputs, backbone.pyramid_strides
        given_channels = task_channels if task_channels is None or isinstance(task_channels, int) \
            else [int(c) for c in task_channels]  # the config keeps the argument (None: from the levels)
        if task_channels is None:
            task_channels = [max(1, backbone.pyramid_channels[level] // 8) for level in levels]
        elif isinstance(task_channels, int):
            task_channels = [task_channels] * len(levels)
        task_channels = [int(c) for c in task_channels]
        if len(task_channels) != len(levels):
            raise ValueError(f"task_channels {task_channels}: one width per level {levels} expected.")
        width = dict(zip(levels, task_channels))
        # === Functional graph ===
        image = backbone.input
        refined, propagated = {}, None
        for k in reversed(range(len(levels))):
            level, x = levels[k], pyramid[levels[k]]
            refined[level] = {}
            for t in tasks:
                inputs = x
                if propagated is not None:
                    below = propagated[t]
                    if strides[levels[k + 1]] != strides[level]:
                        below = ResizeLike(interpolation="bilinear", name=f"{level}_{t}_propagated_resize")([below, x])
                    inputs = keras.layers.Concatenate(name=f"{level}_{t}_initial_concat")([x, below])
                y = basic_block(inputs, width[level], name=f"{level}_{t}_initial_block1")
                refined[level][t] = basic_block(y, width[level], name=f"{level}_{t}_initial_block2")
            if k > 0:
                propagated = feature_propagation(refined[level], tasks, width[level], name=f"{level}_fpm")
        distilled = {level: distill(refined[level], tasks, width[level], name=f"{level}_distillation")
                     for level in levels}
        finest = levels[0]
        features = {}
        for t in tasks:
            scales = [distilled[finest][t]]
            for level in levels[1:]:
                y = distilled[level][t]
                if strides[level] != strides[finest]:
                    y = ResizeLike(interpolation="bilinear", name=f"{level}_{t}_aggregation_resize")(
                        [y, distilled[finest][t]])
                scales.append(y)
            features[t] = keras.layers.Concatenate(name=f"{t}_aggregation")(scales) if len(scales) > 1 else scales[0]
        outputs = task_heads(features, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.levels = levels
        self.task_channels, self.given_task_channels = task_channels, given_channels

    def get_config(self):
        return {**super().get_config(), "task_channels": self.given_task_channels}


@register_model
def mti_net(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """MTI-Net: a dilated ResNet-50 (output stride 8) shared, per-task features at P2..P5 (32/64/128/256 channels),
    feature propagation, multi-modal distillation per level, aggregation at stride 4, a DeepLab head per task."""
    return MTINet(tasks, num_classes, input_shape, **{"name": "mti_net", **overrides})
