"""MTAN (Liu et al., End-To-End Multi-Task Learning With Attention, CVPR 2019), as LibMTL's
``_transform_resnet_MTAN`` builds it on a ResNet: one shared encoder, and per task a chain of attention modules that
read the shared features of every stage.

Per stage ``i`` (LibMTL's ``layer{i+1}``), split into its blocks but the last (the penultimate features ``p_i``) and
its last block (the stage output ``s_i``), each task computes ``a_i = att_i([p_i, a'_{i-1}]) * s_i``, where
``att_i`` is the task's attention module (1x1 conv (biased) + BN + ReLU + 1x1 conv (biased) + BN + sigmoid; at stage 0
it reads ``p_0`` alone) and ``a'_{i-1}`` the task's previous attended features after ``encoder_block_att[i-1]`` (a
torchvision Bottleneck with a 1x1 projection shortcut, to the next stage's width) and, where the next stage is
coarser, a 2x2 max-pool. The task's head reads the last ``a_i``.
"""

import keras

from mtl_keras.layers import BatchNormalization
from mtl_keras.models.backbones import DilatedResNetBackbone
from mtl_keras.models.resnet import RESNET_BLOCKS, bottleneck_block
from mtl_keras.models.sharing import SharingModel, task_heads
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks


def attention_module(x, intermediate, channels, name):
    """LibMTL's ``_att_layer``: 1x1 conv (biased) + BN + ReLU + 1x1 conv (biased) + BN + sigmoid."""
    x = keras.layers.Conv2D(intermediate, 1, name=f"{name}_conv1")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}_bn1")(x)
    x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
    x = keras.layers.Conv2D(channels, 1, name=f"{name}_conv2")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}_bn2")(x)
    return keras.layers.Activation("sigmoid", name=f"{name}_sigmoid")(x)


def block_att(in_channels, out_channels, name):
    """LibMTL's ``_conv_layer``: a torchvision Bottleneck from ``in_channels`` to ``4 * (out_channels // 4)`` with a
    1x1 conv + BN shortcut, as one Model, so that every task calls the same layers (LibMTL's ``encoder_block_att[i]``
    is indexed by stage only)."""
    x = keras.Input((None, None, in_channels), name=f"{name}_input")
    y = bottleneck_block(x, max(1, out_channels // 4), conv_shortcut=True, name=name, layout="torchvision")
    return keras.Model(x, y, name=name)


def mtan_stages(backbone):
    """``[(level, penultimate features, stage output)]`` of the shared ``backbone``, tensors of its graph.

    On a :class:`DilatedResNetBackbone`: LibMTL's layer1..layer4 (levels P2..P5), the penultimate features being the
    output of the stage's last block but one (``conv{k}_block{n-1}_out``; the stage's input, i.e. the stem's max-pool
    or the previous level, if the stage has one block). On any other backbone (e.g. keras-hub's): its pyramid levels,
    the stage output standing for the penultimate features too (their blocks are not named alike)."""
    outputs = backbone.pyramid_outputs
    if not isinstance(backbone, DilatedResNetBackbone):
        return [(level, x, x) for level, x in outputs.items()]
    stages, previous = [], backbone.get_layer("pool1_pool").output
    for stage, blocks in enumerate(RESNET_BLOCKS[backbone.depth]):
        level = f"P{stage + 2}"
        penultimate = backbone.get_layer(f"conv{stage + 2}_block{blocks - 1}_out").output if blocks > 1 else previous
        stages.append((level, penultimate, outputs[level]))
        previous = outputs[level]
    return stages


@keras.saving.register_keras_serializable(package="mtl_keras")
class MTAN(SharingModel):
    """Multi-Task Attention Network (Liu et al., CVPR 2019; LibMTL's ``MTAN``) on one shared backbone; see the module
    docstring. Every task's head (``head``) reads its attended features of the last stage.

    On the dilated ResNet the stages are LibMTL's (layer1..layer4 = P2..P5, stage 0 starting after the stem's
    max-pool) and the penultimate features the output of each stage's last block but one; on other backbones (e.g.
    keras-hub's) the stages are the pyramid levels and each level's output serves as both the penultimate and the
    final features of its stage. The max-pool (2x2, LibMTL's ``down_sampling``) is placed where a stage's stride
    exceeds that of the attended features, read statically from ``pyramid_strides``: on ResNets that is LibMTL's
    pool after stage 0 (and before any stage that is not dilated); it pads "same", so odd sizes match the backbone's
    own (ceil) downsampling. The attention width (a quarter of the stage's) and the Bottleneck ``encoder_block_att``
    are LibMTL's ResNet-50/101 choices (expansion 4), kept on every backbone (LibMTL takes expansion 1 and BasicBlocks
    on ResNet-18/34).

    ``encoder_block_att[i]`` is one set of layers called by every task, as in LibMTL; LibMTL's gradient methods
    treat it as task-specific (not in ``get_share_params``), while the zoo's partition (read off the graph) calls it
    shared because it reaches every task's output.
    """

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **kwargs):
        tasks = validate_tasks(tasks)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        stages = mtan_stages(backbone)
        channels = [int(out.shape[-1]) for _, _, out in stages]
        blocks = [block_att(channels[i], channels[i + 1], name=f"encoder_block_att{i}") for i in range(len(stages) - 1)]
        # === Functional graph ===
        image = backbone.input
        strides = backbone.pyramid_strides
        features = {}
        for task in tasks:
            attended, stride = None, None
            for i, (level, penultimate, output) in enumerate(stages):
                name = f"{task}_encoder_att{i}"
                if attended is None:
                    x = penultimate
                else:
                    if strides[level] > stride:  # LibMTL's down_sampling: the stage is coarser than the attention
                        factor = strides[level] // stride
                        attended = keras.layers.MaxPooling2D(factor, padding="same", name=f"{name}_pool")(attended)
                    x = keras.layers.Concatenate(name=f"{name}_concat")([penultimate, attended])
                mask = attention_module(x, max(1, channels[i] // 4), channels[i], name=name)
                attended = keras.layers.Multiply(name=f"{name}_apply")([mask, output])
                stride = strides[level]
                if i < len(blocks):
                    attended = blocks[i](attended)
            features[task] = attended
        outputs = task_heads(features, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)


@register_model
def mtan(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """MTAN: a dilated ResNet-50 (output stride 8) shared, per-task attention modules on every stage (LibMTL's
    layout), a DeepLab head per task."""
    return MTAN(tasks, num_classes, input_shape, **{"name": "mtan", **overrides})
