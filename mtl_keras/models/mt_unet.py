"""MT-UNet ("End-to-End Multi-Task Learning Driven by a Novel Task-Specific Feature Learning"): a densely connected
U-Net encoder shared by attention task decoders with cross-decoder skips.

Order of this file: blocks (dense encoder block, bottleneck, attention mask, decoder block), the model, registered
entry points.

What the paper fixes (its "Architecture Design and Protocols"):
- Encoder: four blocks of two 3x3 convs, connected as in a DenseNet block (the input of each conv is the
  concatenation of all earlier outputs, block input included), of 64, 128, 256 and 512 channels; each block is
  followed by dropout and 2x2 max-pooling (stride 2). The blocks' outputs are the U-Net bridge (skip) connections.
- Bottleneck: two 3x3 convs, then one transposed convolution that gives 1024 channels.
- One decoder per task, four blocks; each block's input is the concatenation of the matching encoder block's output
  and the previous decoder block's output, followed by two 3x3 convs.
- Attention per decoder block: two 3x3 convs with BN, ReLU then sigmoid, fed by the block's first conv output; the
  mask multiplies (element-wise) the block's second conv output, and that product is the block's output.
- Cross talk: decoder block 2 of task 1 feeds decoder block 3 of task 2 and vice versa (Table 3 ablates it).

Where the paper is vague, this implementation chooses (the switches of Table 3 are ``attention`` and ``cross_talk``):
- Unit order: conv -> BN -> ReLU (``conv_bn_relu``, as everywhere in the zoo); the paper writes "ReLU ... and a
  batchnorm layer", i.e. BN after the ReLU.
- A dense block's output is its second conv's output (``width`` channels): the paper gives the blocks' depths as
  64..512, which a DenseNet-style concatenation of all outputs would exceed. That output, taken before dropout, is
  both the skip and (after dropout and pooling) the next block's input.
- Dropout: the paper gives no rate; ``dropout=0.1`` by default.
- Bottleneck convs have 16 * ``base_filters`` (1024) channels, as in U-Net; the transposed conv (2x2, stride 2, to
  1024 channels, bias, no BN or activation, as U-Net's up-convolution) is the 2x upsampling from 1/16 back to the
  deepest skip's resolution (1/8). Decoder block 1 therefore has no upsampling of its own.
- Decoder blocks 2..4 upsample with a 2x2 stride-2 transposed conv to the block's width (U-Net's halving
  up-convolution; the paper upsamples with a transposed conv in the bottleneck). Decoder widths mirror the encoder:
  8, 4, 2, 1 x ``base_filters``.
- Cross talk with T tasks: decoder block 2's output of every other task is concatenated with the task's own block-2
  output at the input of block 3, i.e. before block 3's upsampling, so the other tasks' features pass through a
  learned upsampling. With one task there is nothing to concatenate and ``cross_talk`` has no effect.
- The attention convs have the block's width, so the mask gates every channel of the second conv's output.
"""

import keras

from mtl_keras.layers import BatchNormalization, conv_bn_relu
from mtl_keras.models.backbones import DenseUNetEncoder, DilatedResNetBackbone
from mtl_keras.models.heads import deepest_level, skip_levels, task_output
from mtl_keras.models.task_model import MultiTaskModel
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks

NUM_POOLS = DenseUNetEncoder.NUM_BLOCKS  # 2x2 max-pools of the paper's encoder: H and W divisible by 2**4


# --------------------------------------------------------------------------------------------------------- blocks
def bottleneck(x, filters, name="bottleneck", upsample=2):
    """Two 3x3 conv-BN-ReLU units, then a transposed conv (kernel = stride = ``upsample``, the upsampling to the
    deepest skip; none when the skip has the same stride, as on a dilated ResNet)."""
    x = conv_bn_relu(x, filters, 3, name=f"{name}_conv1")
    x = conv_bn_relu(x, filters, 3, name=f"{name}_conv2")
    if upsample > 1:
        x = keras.layers.Conv2DTranspose(filters, upsample, strides=upsample, name=f"{name}_up")(x)
    return x


def attention_mask(x, filters, name):
    """The soft attention module: 3x3 conv-BN-ReLU, then 3x3 conv-BN-sigmoid; a mask in [0, 1]."""
    x = conv_bn_relu(x, filters, 3, name=f"{name}1")
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}2_conv")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}2_bn")(x)
    return keras.layers.Activation("sigmoid", name=f"{name}2_sigmoid")(x)


def decoder_block(x, skip, filters, name, upsample=2, attention=True, cross=()):
    """[Concat ``cross``], [transposed conv, kernel = stride = ``upsample`` if > 1], concat with ``skip``, two 3x3
    conv-BN-ReLU, [attention].

    ``cross`` are other tasks' decoder outputs at ``x``'s resolution (cross-decoder skips).
    """
    if cross:
        x = keras.layers.Concatenate(name=f"{name}_cross_concat")([x, *cross])
    if upsample > 1:
        x = keras.layers.Conv2DTranspose(filters, upsample, strides=upsample, name=f"{name}_up")(x)
    x = keras.layers.Concatenate(name=f"{name}_concat")([skip, x])
    first = conv_bn_relu(x, filters, 3, name=f"{name}_conv1")
    out = conv_bn_relu(first, filters, 3, name=f"{name}_conv2")
    if attention:
        mask = attention_mask(first, filters, name=f"{name}_att")
        out = keras.layers.Multiply(name=f"{name}_attention")([out, mask])
    return out


# ---------------------------------------------------------------------------------------------------------- model
@keras.saving.register_keras_serializable(package="mtl_keras")
class MTUNet(MultiTaskModel):
    """Encoder, bottleneck, one attention U-Net decoder per task; images (0..255 RGB) -> {task: output}.

    Outputs: ``semantic`` logits (C channels), ``instance`` (dy, dx) vectors, ``depth`` inverse depth, ``normals``,
    all at the input resolution. ``attention`` and ``cross_talk`` switch the paper's two decoder extensions
    (Table 3).

    The encoder is a :class:`~mtl_keras.models.backbones.Backbone`: the paper's dense encoder by default
    (``base_filters``, ``dropout``), or any ``backbone`` whose strides are powers of two (e.g. the dilated ResNet:
    ``mt_unet_dilated_resnet50``). The bottleneck reads the deepest level; decoder block ``i`` reads the skip of the
    ``i``-th finer stride (``heads.skip_levels``), with ``decoder_filters`` channels (default: the skip's) and
    ``bottleneck_filters`` (default: twice the first decoder block's). Cross talk enters decoder block 3 (the last
    one if there are fewer). Input height and width must be multiples of ``size_multiple`` (the deepest stride; 16
    for the paper's encoder).
    """

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                 base_filters=64, dropout=0.1, attention=True, cross_talk=True, decoder_filters=None,
                 bottleneck_filters=None, encoder="dense_unet", backbone_depth=50, backbone_width=64, output_stride=8,
                 backbone=None, backbone_weights=None, **kwargs):
        tasks = validate_tasks(tasks)

        def default_encoder():
            if encoder == "dense_unet":
                _check_size_multiple(input_shape, 2 ** NUM_POOLS)
                return DenseUNetEncoder(base_filters=base_filters, dropout=dropout, input_shape=tuple(input_shape))
            if encoder == "dilated_resnet":
                return DilatedResNetBackbone(depth=backbone_depth, output_stride=output_stride, width=backbone_width,
                                             input_shape=tuple(input_shape))
            raise ValueError(f"encoder must be 'dense_unet' or 'dilated_resnet' (or pass backbone=...), got "
                             f"{encoder!r}.")

        # === Layers: the encoder ===
        backbone, custom_backbone = self._resolve_encoder(backbone, input_shape, default_encoder, backbone_weights)
        strides, channels = backbone.pyramid_strides, backbone.pyramid_channels
        deepest, skips = deepest_level(backbone), skip_levels(backbone)
        _check_size_multiple(backbone.image_shape, strides[deepest])
        widths = tuple(int(w) for w in decoder_filters) if decoder_filters else tuple(channels[lv] for lv in skips)
        if len(widths) != len(skips):
            raise ValueError(f"decoder_filters has {len(widths)} entries; the backbone {backbone.name} gives "
                             f"{len(skips)} skips ({', '.join(skips)}).")
        bottleneck_width = int(bottleneck_filters or 2 * widths[0])
        cross_block = min(3, len(skips))
        # === Functional graph ===
        pyramid = backbone.pyramid_outputs
        shared = bottleneck(pyramid[deepest], bottleneck_width, upsample=strides[deepest] // strides[skips[0]])
        features = {task: shared for task in tasks}
        previous_stride = strides[skips[0]]
        for i, (width, level) in enumerate(zip(widths, skips), start=1):
            upsample, previous_stride = previous_stride // strides[level], strides[level]
            block_inputs = dict(features)
            for task in tasks:
                cross = [block_inputs[t] for t in tasks if t != task] if cross_talk and i == cross_block else []
                features[task] = decoder_block(block_inputs[task], pyramid[level], width,
                                               name=f"{task}_decoder_block{i}", upsample=upsample,
                                               attention=attention, cross=cross)
        outputs = {task: task_output(features[task], task, num_classes, backbone.input, name=f"{task}_decoder")
                   for task in tasks}
        super().__init__(inputs=backbone.input, outputs=outputs, **kwargs)
        # === Config ===
        self._set_common(backbone, custom_backbone, tasks, num_classes, size_multiple=strides[deepest])
        self.base_filters = base_filters
        self.dropout = dropout
        self.attention = attention
        self.cross_talk = cross_talk
        self.decoder_filters = None if decoder_filters is None else widths
        self.bottleneck_filters = bottleneck_filters
        self.encoder_kind = encoder
        self.backbone_depth = getattr(backbone, "depth", None)
        self.backbone_width = getattr(backbone, "width", None)
        self.output_stride = getattr(backbone, "output_stride", None)

    def get_config(self):
        if self.encoder_kind == "dense_unet":
            encoder = dict(base_filters=self.base_filters, dropout=self.dropout)
        else:
            encoder = dict(encoder=self.encoder_kind, backbone_depth=self.backbone_depth,
                           backbone_width=self.backbone_width, output_stride=self.output_stride)
        head = dict(attention=self.attention, cross_talk=self.cross_talk)
        if self.decoder_filters is not None:
            head["decoder_filters"] = list(self.decoder_filters)
        if self.bottleneck_filters is not None:
            head["bottleneck_filters"] = self.bottleneck_filters
        return self._config(encoder, head)


def _check_size_multiple(input_shape, factor):
    if any(s is not None and s % factor for s in tuple(input_shape)[:2]):
        raise ValueError(f"MT-UNet needs input height and width divisible by {factor}; got "
                         f"input_shape={tuple(input_shape)}.")


# ------------------------------------------------------------------------------------------- registered entry points
@register_model
def mt_unet(tasks=("semantic", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """The paper's model: dense U-Net encoder (64..512), 1024-channel bottleneck, attention decoders, cross talk.

    ``overrides``: ``base_filters``, ``dropout``, ``attention``, ``cross_talk`` (Table 3: ``cross_talk=False``).
    """
    kwargs = dict(overrides)
    kwargs.setdefault("name", "mt_unet")
    return MTUNet(tasks=tasks, num_classes=num_classes, input_shape=input_shape, **kwargs)


@register_model
def mt_unet_dilated_resnet50(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                             **overrides):
    """MT-UNet's attention decoders (cross talk) on the dilated ResNet-50 (output stride 8) that Kendall et al.'s
    models use: skips at strides 8 (conv4), 4 (conv2) and 2 (stem), decoders of 256/128/64 channels and a
    512-channel bottleneck. ``backbone_weights="imagenet"`` (or a local file) starts the encoder from ImageNet.

    ``overrides``: ``output_stride``, ``backbone_width``, ``decoder_filters``, ``bottleneck_filters``,
    ``attention``, ``cross_talk``, ``backbone_weights``, or ``backbone`` (another encoder).
    """
    kwargs = dict(encoder="dilated_resnet", backbone_depth=50, output_stride=8, backbone_width=64,
                  decoder_filters=(256, 128, 64), bottleneck_filters=512, name="mt_unet_dilated_resnet50")
    kwargs.update(overrides)
    return MTUNet(tasks=tasks, num_classes=num_classes, input_shape=input_shape, **kwargs)
