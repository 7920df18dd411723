"""MT-UNet ("End-to-End Multi-Task Learning Driven by a Novel Task-Specific Feature Learning"): a densely connected
U-Net encoder shared by attention task decoders with cross-decoder skips.

The paper fixes: four dense encoder blocks of two 3x3 convs (64..512 channels), each followed by dropout and 2x2
max-pooling, their outputs the skips; a bottleneck of two 3x3 convs and a transposed conv to 1024 channels; per task,
four decoder blocks (concat skip and previous block, two 3x3 convs), each gated by an attention mask (two 3x3 convs,
BN, ReLU then sigmoid, on the first conv's output) multiplying the second conv's output; cross talk from decoder
block 2 of each task into block 3 of the others. Table 3 ablates ``attention`` and ``cross_talk``.

Where the paper is vague, this implementation chooses:
- conv -> BN -> ReLU, as everywhere in the zoo (the paper writes BN after the ReLU);
- a dense block outputs its second conv (``width`` channels): concatenating all outputs would exceed the paper's
  64..512 depths;
- ``dropout=0.1`` (the paper gives no rate);
- bottleneck convs of 1024 channels (U-Net); its 2x2 stride-2 transposed conv (bias, no BN) brings 1/16 to 1/8, so
  decoder block 1 does not upsample; blocks 2..4 upsample with U-Net's halving up-convolution; decoder widths 8, 4,
  2, 1 x ``base_filters``;
- cross talk concatenates the other tasks' block-2 outputs before block 3's upsampling (a learned upsampling of
  them); with one task it has no effect;
- attention convs have the block's width, so the mask gates every channel.
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
    """Two 3x3 conv-BN-ReLU units, then a transposed conv (kernel = stride = ``upsample``; none if 1)."""
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
    """[Concat ``cross``, other tasks' outputs at ``x``'s resolution], [transposed conv if ``upsample`` > 1], concat
    with ``skip``, two 3x3 conv-BN-ReLU, [attention]."""
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

    The encoder is the paper's dense encoder (``base_filters``, ``dropout``) or any ``backbone`` whose strides are
    powers of two. Decoder block ``i`` reads the ``i``-th finer skip (``heads.skip_levels``) with ``decoder_filters``
    channels (default: the skip's); ``bottleneck_filters`` defaults to twice the first block's. Cross talk enters
    block 3 (the last if fewer). Input height and width must be multiples of ``size_multiple`` (the deepest stride).
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
    """The paper's model: dense U-Net encoder (64..512), 1024-channel bottleneck, attention decoders, cross talk."""
    overrides.setdefault("name", "mt_unet")
    return MTUNet(tasks=tasks, num_classes=num_classes, input_shape=input_shape, **overrides)


@register_model
def mt_unet_dilated_resnet50(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                             **overrides):
    """MT-UNet's decoders on Kendall et al.'s dilated ResNet-50 (output stride 8): skips at strides 8, 4 and 2,
    decoders of 256/128/64 channels, a 512-channel bottleneck."""
    kwargs = dict(encoder="dilated_resnet", backbone_depth=50, output_stride=8, backbone_width=64,
                  decoder_filters=(256, 128, 64), bottleneck_filters=512, name="mt_unet_dilated_resnet50")
    kwargs.update(overrides)
    return MTUNet(tasks=tasks, num_classes=num_classes, input_shape=input_shape, **kwargs)
