"""MT-UNet (seed 003): a densely connected U-Net encoder shared by attention task decoders with cross-decoder skips.

Order of this file: blocks (dense encoder block, bottleneck, attention mask, decoder block), the model, registered
entry points.

What the paper fixes ("Architecture Design and Protocols", seed 003):
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

from mtl_keras.layers import BatchNormalization, conv_bn_relu, image_normalization
from mtl_keras.models.heads import task_output
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks

NUM_POOLS = 4  # encoder blocks, each followed by a 2x2 max-pool: H and W must be divisible by 2**4


# --------------------------------------------------------------------------------------------------------- blocks
def dense_block(x, filters, name):
    """Two 3x3 conv-BN-ReLU units; the second sees the concatenation of the block input and the first's output."""
    first = conv_bn_relu(x, filters, 3, name=f"{name}_conv1")
    dense = keras.layers.Concatenate(name=f"{name}_dense_concat")([x, first])
    return conv_bn_relu(dense, filters, 3, name=f"{name}_conv2")


def bottleneck(x, filters, name="bottleneck"):
    """Two 3x3 conv-BN-ReLU units, then a 2x2 stride-2 transposed conv (the upsampling to the deepest skip)."""
    x = conv_bn_relu(x, filters, 3, name=f"{name}_conv1")
    x = conv_bn_relu(x, filters, 3, name=f"{name}_conv2")
    return keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}_up")(x)


def attention_mask(x, filters, name):
    """The soft attention module: 3x3 conv-BN-ReLU, then 3x3 conv-BN-sigmoid; a mask in [0, 1]."""
    x = conv_bn_relu(x, filters, 3, name=f"{name}1")
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}2_conv")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}2_bn")(x)
    return keras.layers.Activation("sigmoid", name=f"{name}2_sigmoid")(x)


def decoder_block(x, skip, filters, name, upsample=True, attention=True, cross=()):
    """[Concat ``cross``], [2x2 stride-2 transposed conv], concat with ``skip``, two 3x3 conv-BN-ReLU, [attention].

    ``cross`` are other tasks' decoder outputs at ``x``'s resolution (cross-decoder skips).
    """
    if cross:
        x = keras.layers.Concatenate(name=f"{name}_cross_concat")([x, *cross])
    if upsample:
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}_up")(x)
    x = keras.layers.Concatenate(name=f"{name}_concat")([skip, x])
    first = conv_bn_relu(x, filters, 3, name=f"{name}_conv1")
    out = conv_bn_relu(first, filters, 3, name=f"{name}_conv2")
    if attention:
        mask = attention_mask(first, filters, name=f"{name}_att")
        out = keras.layers.Multiply(name=f"{name}_attention")([out, mask])
    return out


# ---------------------------------------------------------------------------------------------------------- model
@keras.saving.register_keras_serializable(package="mtl_keras")
class MTUNet(keras.Model):
    """Dense U-Net encoder, one attention U-Net decoder per task; images (0..255 RGB) -> {task: output}.

    Outputs: ``semantic`` logits (C channels), ``instance`` (dy, dx) vectors, ``depth`` inverse depth, all at the
    input resolution. ``attention`` and ``cross_talk`` switch the paper's two decoder extensions (Table 3).
    Input height and width must be divisible by 16 (four 2x2 poolings).
    """

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                 base_filters=64, dropout=0.1, attention=True, cross_talk=True, **kwargs):
        tasks = validate_tasks(tasks)
        input_shape = tuple(input_shape)
        factor = 2 ** NUM_POOLS
        if any(s is not None and s % factor for s in input_shape[:2]):
            raise ValueError(f"MT-UNet needs input height and width divisible by {factor}; got "
                             f"input_shape={input_shape}.")
        widths = [base_filters * 2 ** i for i in range(NUM_POOLS)]  # 64, 128, 256, 512
        # === Functional graph ===
        image = keras.Input(shape=input_shape, name="image")
        x = image_normalization()(image)
        skips = []
        for i, width in enumerate(widths, start=1):
            x = dense_block(x, width, name=f"encoder_block{i}")
            skips.append(x)
            x = keras.layers.Dropout(dropout, name=f"encoder_block{i}_dropout")(x)
            x = keras.layers.MaxPooling2D(2, name=f"encoder_block{i}_pool")(x)
        shared = bottleneck(x, base_filters * 2 ** NUM_POOLS)

        features = {task: shared for task in tasks}
        for i, (width, skip) in enumerate(zip(widths[::-1], skips[::-1]), start=1):
            block_inputs = dict(features)
            for task in tasks:
                cross = [block_inputs[t] for t in tasks if t != task] if cross_talk and i == 3 else []
                features[task] = decoder_block(block_inputs[task], skip, width, name=f"{task}_decoder_block{i}",
                                               upsample=i > 1, attention=attention, cross=cross)
        outputs = {task: task_output(features[task], task, num_classes, image, name=f"{task}_decoder")
                   for task in tasks}
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self.tasks = tasks
        self.num_classes = num_classes
        self.image_shape = input_shape
        self.base_filters = base_filters
        self.dropout = dropout
        self.attention = attention
        self.cross_talk = cross_talk

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "tasks": list(self.tasks),
            "num_classes": self.num_classes,
            "input_shape": list(self.image_shape),
            "base_filters": self.base_filters,
            "dropout": self.dropout,
            "attention": self.attention,
            "cross_talk": self.cross_talk,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# ------------------------------------------------------------------------------------------- registered entry points
@register_model
def mt_unet(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """The paper's model: dense U-Net encoder (64..512), 1024-channel bottleneck, attention decoders, cross talk.

    ``overrides``: ``base_filters``, ``dropout``, ``attention``, ``cross_talk`` (Table 3: ``cross_talk=False``).
    """
    kwargs = dict(overrides)
    kwargs.setdefault("name", "mt_unet")
    return MTUNet(tasks=tasks, num_classes=num_classes, input_shape=input_shape, **kwargs)
