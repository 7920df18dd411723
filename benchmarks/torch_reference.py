"""Kendall, Gal & Cipolla's DeepLabV3 multi-task model written in plain PyTorch, as a speed reference for the Keras
model (``mtl_keras.models.kendall``): same layers, losses, uncertainty weighting and optimiser, no Keras.

    python benchmarks/torch_reference.py --depth 50 --height 128 --width 256 --batch 8 --steps 5

Layer for layer the same as ``KendallMultiTaskModel`` (mtl_keras/models/kendall.py, resnet.py, heads.py, layers.py):

- ImageNet normalisation of 0..255 RGB images inside the model.
- Dilated ResNet v1 bottleneck in keras.applications' layout: biased convs, stride on the first 1x1 conv of a block,
  BN epsilon 1.001e-5; output stride 8 or 16 by turning the last stages' strides into dilation, the first block of a
  dilated stage keeping the previous stage's dilation (torchvision's rule).
- ASPP: 1x1 and 3x3 at rates 12/24/36 plus image pooling, each conv (no bias) + BN (epsilon 1e-5) + ReLU, concat.
- Per task: conv (1x1 by default, no bias) + BN + ReLU, a biased 1x1 conv to the task's channels, bilinear
  upsampling to the input size (half-pixel centres, as ``tf.image.resize`` and ``keras.ops.image.resize``).
- Losses as in ``mtl_keras.losses``: softmax cross entropy over pixels whose label is not 255, per-pixel L1 norm
  over masked pixels; each a sum over valid pixels divided by max(count, 1). Weighted by learned ``s = log sigma^2``:
  ``exp(-s) L + s/2`` (classification), ``0.5 exp(-s) L + s/2`` (regression), as ``UncertaintyWeightingLayer``.
- Optimiser as ``mtl_keras.training.kendall_sgd``: SGD with Nesterov momentum 0.9, learning rate 2.5e-3 with
  polynomial decay (power 0.9), weight decay 1e-4 on the conv kernels only, decoupled as Keras applies it
  (``w -= lr * wd * w`` before the update). PyTorch's Nesterov form (``v = mu v + g; w -= lr (g + mu v)``) equals
  Keras' (``v = mu v - lr g; w += mu v - lr g``) at a constant learning rate; the tiny per-step learning-rate change
  of the schedule makes them differ in the last digits only.

``parameter_counts`` compares like with like against Keras' ``count_params()`` (trainable weights + BN moving
statistics): PyTorch's trainable parameters against Keras' trainable weights, and the BN ``running_mean`` /
``running_var`` buffers against Keras' non-trainable ``moving_mean`` / ``moving_variance``
(``num_batches_tracked``, a scalar counter Keras has no equivalent of, is left out). ``copy_keras_weights`` loads a
Keras model's weights, so that a test can check the two give the same outputs.

Images and outputs are NCHW here (PyTorch's layout); ``channels_last=True`` keeps the same logical layout but
stores the tensors NHWC (``torch.channels_last``), which some CPU and GPU kernels prefer.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from common import timed

# Same as mtl_keras.models.resnet.RESNET_BLOCKS; not imported, so that this file needs PyTorch only (importing
# mtl_keras imports Keras and its backend). The parameter-count test catches any drift.
RESNET_BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RESNET_BN_EPS = 1.001e-5  # keras.applications' ResNet
HEAD_BN_EPS = 1e-5  # mtl_keras.layers.conv_bn_relu
KERAS_BN_MOMENTUM = 0.99  # Keras' moving average keeps 0.99 of the old value: PyTorch's momentum is 1 - that
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
IGNORE_LABEL = 255
TASK_CHANNELS = {"semantic": None, "instance": 2, "depth": 1}  # None: num_classes
TASK_TYPES = {"semantic": "classification", "instance": "regression", "depth": "regression"}


def batch_norm(channels, eps):
    return nn.BatchNorm2d(channels, eps=eps, momentum=1.0 - KERAS_BN_MOMENTUM)


def init_like_keras(conv):
    """Keras' Conv2D defaults (Glorot-uniform kernel, zero bias), so that both models start from alike weights."""
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def stage_strides_and_dilations(output_stride):
    """(stride, dilation of the first block, dilation of the other blocks) for stages conv2..conv5, as
    ``mtl_keras.models.resnet.stage_strides_and_dilations``."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}.")
    plan, current_stride, dilation = [], 4, 1  # the stem (conv1 + max-pool) has stride 4
    for stride in (1, 2, 2, 2):
        first_dilation = dilation
        if stride > 1 and current_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            current_stride *= stride
        plan.append((stride, first_dilation, dilation))
    return plan


# --------------------------------------------------------------------------------------------------------- blocks
class Bottleneck(nn.Module):
    """keras.applications ``residual_block_v1`` (biased convs, stride on the first 1x1) with a dilated 3x3 conv."""

    def __init__(self, in_channels, filters, stride=1, dilation=1, conv_shortcut=False):
        super().__init__()
        out_channels = 4 * filters
        self.shortcut = None
        if conv_shortcut:
            self.shortcut = nn.Sequential(init_like_keras(nn.Conv2d(in_channels, out_channels, 1, stride=stride)),
                                          batch_norm(out_channels, RESNET_BN_EPS))
        self.conv1 = init_like_keras(nn.Conv2d(in_channels, filters, 1, stride=stride))
        self.bn1 = batch_norm(filters, RESNET_BN_EPS)
        # "same" padding of a stride-1 3x3 conv at dilation d is d pixels on each side.
        self.conv2 = init_like_keras(nn.Conv2d(filters, filters, 3, padding=dilation, dilation=dilation))
        self.bn2 = batch_norm(filters, RESNET_BN_EPS)
        self.conv3 = init_like_keras(nn.Conv2d(filters, out_channels, 1))
        self.bn3 = batch_norm(out_channels, RESNET_BN_EPS)

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return F.relu(shortcut + x)


class ConvBNReLU(nn.Sequential):
    """``mtl_keras.layers.conv_bn_relu``: conv without bias ("same" padding, stride 1), BN, ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation=1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            init_like_keras(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                      bias=False)),
            batch_norm(out_channels, HEAD_BN_EPS),
            nn.ReLU())


class DilatedResNet(nn.Module):
    """``mtl_keras.models.resnet.dilated_resnet``: the stem (7x7/2 conv, 3x3/2 max-pool) and four bottleneck stages.

    The stem's explicit zero padding (3, then 1 before the max-pool) equals PyTorch's conv/pool padding: the pool
    follows a ReLU, so its zero padding never wins a max, like PyTorch's -inf padding.
    """

    def __init__(self, depth=50, width=64, output_stride=8):
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}.")
        self.conv1 = init_like_keras(nn.Conv2d(3, width, 7, stride=2, padding=3))
        self.bn1 = batch_norm(width, RESNET_BN_EPS)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_channels = [], width
        plan = stage_strides_and_dilations(output_stride)
        for stage, (blocks, (stride, first_dilation, dilation)) in enumerate(zip(RESNET_BLOCKS[depth], plan)):
            filters = width * 2 ** stage
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(in_channels, filters, stride=stride if b == 0 else 1,
                                         dilation=first_dilation if b == 0 else dilation, conv_shortcut=b == 0))
                in_channels = 4 * filters
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        return self.stages(x)


class ASPP(nn.Module):
    """``mtl_keras.models.kendall.aspp``: 1x1, one 3x3 per rate, image pooling; concatenated."""

    def __init__(self, in_channels, channels=256, rates=(12, 24, 36)):
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(in_channels, channels, 1)] +
                                      [ConvBNReLU(in_channels, channels, 3, dilation=r) for r in rates])
        self.pool = ConvBNReLU(in_channels, channels, 1)
        self.out_channels = channels * (len(rates) + 2)

    def forward(self, x):
        outputs = [branch(x) for branch in self.branches]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        outputs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))  # bilinear resize of a 1x1 map: a broadcast
        return torch.cat(outputs, dim=1)


class TaskDecoder(nn.Module):
    """``mtl_keras.models.kendall.task_decoder`` + ``heads.task_output``: conv-BN-ReLU, biased 1x1 conv, upsampling."""

    def __init__(self, in_channels, out_channels, channels=256, kernel_size=1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, kernel_size)
        self.logits = init_like_keras(nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, size):
        x = self.logits(self.conv(x))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------- model
class KendallDeepLabV3(nn.Module):
    """Images (N, 3, H, W), RGB 0..255 -> {task: (N, channels, H, W)}; the arguments are KendallMultiTaskModel's."""

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, backbone_depth=50,
                 backbone_width=64, output_stride=8, aspp_channels=256, aspp_rates=(12, 24, 36),
                 decoder_channels=256, decoder_kernel_size=1):
        super().__init__()
        unknown = [t for t in tasks if t not in TASK_CHANNELS]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; this reference has {list(TASK_CHANNELS)}.")
        self.tasks = tuple(t for t in TASK_CHANNELS if t in tasks)  # mtl_keras' canonical order
        self.num_classes = num_classes
        # Not saved with the weights and not counted: Keras' Normalization with given statistics holds no weights.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1), persistent=False)
        self.backbone = DilatedResNet(backbone_depth, backbone_width, output_stride)
        self.aspp = ASPP(self.backbone.out_channels, aspp_channels, tuple(aspp_rates))
        self.decoders = nn.ModuleDict({
            t: TaskDecoder(self.aspp.out_channels, TASK_CHANNELS[t] or num_classes, decoder_channels,
                           decoder_kernel_size) for t in self.tasks})

    @classmethod
    def from_keras_config(cls, config):
        """The same architecture as a ``KendallMultiTaskModel`` with this ``get_config()``."""
        keys = ("tasks", "num_classes", "backbone_depth", "backbone_width", "output_stride", "aspp_channels",
                "aspp_rates", "decoder_channels", "decoder_kernel_size")
        return cls(**{k: config[k] for k in keys if k in config})

    def forward(self, images):
        x = (images - self.mean) / self.std
        shared = self.aspp(self.backbone(x))
        size = images.shape[2:]
        return {t: decoder(shared, size) for t, decoder in self.decoders.items()}


def parameter_counts(model):
    """``trainable`` (parameters) and ``moving_stats`` (BN running mean and variance) element counts; their sum
    compares with Keras' ``count_params()``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moving = sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)
    return {"trainable": trainable, "moving_stats": moving, "total": trainable + moving}


# ------------------------------------------------------------------------------------------------- Keras weights
def _keras_layer_names(model):
    """{Keras layer name: this model's conv or BN module}, following mtl_keras' layer names."""
    names = {"conv1_conv": model.backbone.conv1, "conv1_bn": model.backbone.bn1}
    for s, stage in enumerate(model.backbone.stages):
        for b, block in enumerate(stage):
            prefix = f"conv{s + 2}_block{b + 1}"
            if block.shortcut is not None:
                names[f"{prefix}_0_conv"], names[f"{prefix}_0_bn"] = block.shortcut[0], block.shortcut[1]
            for i in (1, 2, 3):
                names[f"{prefix}_{i}_conv"] = getattr(block, f"conv{i}")
                names[f"{prefix}_{i}_bn"] = getattr(block, f"bn{i}")
    branch_names = ["aspp_1x1"] + [f"aspp_atrous{i}" for i in range(1, len(model.aspp.branches))]
    for name, unit in list(zip(branch_names, model.aspp.branches)) + [("aspp_pool", model.aspp.pool)]:
        names[f"{name}_conv"], names[f"{name}_bn"] = unit[0], unit[1]
    for task, decoder in model.decoders.items():
        names[f"{task}_decoder_conv"], names[f"{task}_decoder_bn"] = decoder.conv[0], decoder.conv[1]
        names[f"{task}_decoder_logits"] = decoder.logits
    return names


@torch.no_grad()
def copy_keras_weights(model, keras_model):
    """Loads a ``KendallMultiTaskModel``'s weights (any Keras backend) into ``model``, matched by layer name.

    Keras conv kernels are (kh, kw, in, out), PyTorch's (out, in, kh, kw); BN weights are gamma, beta, moving mean,
    moving variance in both. Raises if a layer of either side has no counterpart.
    """
    import numpy as np

    modules = _keras_layer_names(model)
    keras_names = {layer.name for layer in keras_model.layers if layer.weights}
    if keras_names != set(modules):
        raise ValueError(f"Layers without a counterpart: Keras only {sorted(keras_names - set(modules))}, "
                         f"PyTorch only {sorted(set(modules) - keras_names)}.")
    for name, module in modules.items():
        values = [torch.from_numpy(np.asarray(w)) for w in keras_model.get_layer(name).get_weights()]
        if isinstance(module, nn.Conv2d):
            module.weight.copy_(values[0].permute(3, 2, 0, 1))
            if module.bias is not None:
                module.bias.copy_(values[1])
        else:
            gamma, beta, mean, variance = values
            module.weight.copy_(gamma)
            module.bias.copy_(beta)
            module.running_mean.copy_(mean)
            module.running_var.copy_(variance)


# ------------------------------------------------------------------------------------------- losses and weighting
def masked_mean(values, mask):
    """sum(values * mask) / max(sum(mask), 1), as ``mtl_keras.losses.masked_mean`` (0, not NaN, when all masked)."""
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def semantic_cross_entropy(labels, logits, ignore_label=IGNORE_LABEL):
    """labels (N, H, W) int64, logits (N, C, H, W): softmax cross entropy averaged over non-ignored pixels."""
    valid = labels != ignore_label
    per_pixel = F.cross_entropy(logits.float(), torch.where(valid, labels, torch.zeros_like(labels)),
                                reduction="none")
    return masked_mean(per_pixel, valid)


def masked_l1(targets, predictions, mask):
    """targets/predictions (N, K, H, W), mask (N, 1, H, W): per-pixel L1 norm over K averaged over masked pixels.
    Targets behind the mask are zeroed first (a NaN there would still make the gradient NaN)."""
    mask = mask.to(predictions.dtype)
    targets = torch.where(mask > 0, targets, torch.zeros_like(targets))
    return masked_mean((targets - predictions.float()).abs().sum(dim=1), mask[:, 0])


def task_loss(task, targets, outputs):
    if task == "semantic":
        return semantic_cross_entropy(targets["semantic"], outputs["semantic"])
    mask = targets.get(f"{task}_mask")
    if mask is None:
        mask = torch.ones_like(targets[task][:, :1])
    return masked_l1(targets[task], outputs[task], mask)


class UncertaintyWeighting(nn.Module):
    """``mtl_keras.weighting.UncertaintyWeightingLayer``: one learned ``s = log sigma^2`` per task."""

    def __init__(self, tasks, initial_log_variance=0.0):
        super().__init__()
        self.tasks = tuple(tasks)
        self.log_variances = nn.ParameterDict(
            {t: nn.Parameter(torch.tensor(float(initial_log_variance))) for t in self.tasks})

    def forward(self, task_losses):
        total = 0.0
        for t in self.tasks:
            s = self.log_variances[t]
            factor = 1.0 if TASK_TYPES[t] == "classification" else 0.5
            total = total + factor * torch.exp(-s) * task_losses[t] + 0.5 * s
        return total


# ------------------------------------------------------------------------------------------------------- training
class ReferenceTrainer:
    """Model + uncertainty weighting + ``kendall_sgd``'s optimiser; ``train_step`` is one full training step."""

    def __init__(self, model, learning_rate=2.5e-3, total_steps=1000, power=0.9, momentum=0.9, weight_decay=1e-4):
        self.model = model
        self.weighting = UncertaintyWeighting(model.tasks)
        self.learning_rate, self.total_steps, self.power = learning_rate, max(int(total_steps), 1), power
        self.weight_decay = weight_decay
        # kendall_sgd decays conv kernels only (Keras excludes biases, BN gamma/beta and the log variances).
        self.decayed = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        parameters = list(model.parameters()) + list(self.weighting.parameters())
        self.optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=momentum, nesterov=True)
        self.step = 0

    def current_learning_rate(self):
        """Keras' PolynomialDecay to 0 over ``total_steps``."""
        return self.learning_rate * (1.0 - min(self.step, self.total_steps) / self.total_steps) ** self.power

    def train_step(self, images, targets):
        """Forward, losses, backward, optimiser step; returns the weighted total loss as a float."""
        self.model.train()
        outputs = self.model(images)
        task_losses = {t: task_loss(t, targets, outputs) for t in self.model.tasks}
        total = self.weighting(task_losses)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        lr = self.current_learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            torch._foreach_mul_(self.decayed, 1.0 - lr * self.weight_decay)  # Keras' decoupled decay, before update
        self.optimizer.step()
        self.step += 1
        return float(total.detach())


def random_batch(batch, height, width, num_classes=19, tasks=("semantic", "instance", "depth"), seed=0,
                 channels_last=False):
    """Random images (0..255) and targets in this module's NCHW layout, like the Keras benchmarks' random data."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator) * 255.0
    targets = {}
    if "semantic" in tasks:
        targets["semantic"] = torch.randint(0, num_classes, (batch, height, width), generator=generator)
    if "instance" in tasks:
        targets["instance"] = torch.randn(batch, 2, height, width, generator=generator)
        targets["instance_mask"] = torch.ones(batch, 1, height, width)
    if "depth" in tasks:
        targets["depth"] = torch.rand(batch, 1, height, width, generator=generator)
        targets["depth_mask"] = torch.ones(batch, 1, height, width)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def time_training(model=None, height=128, width=256, batch=8, steps=5, warmup=2, threads=None, channels_last=False,
                  **model_kwargs):
    """Times ``steps`` full training steps after ``warmup`` on one random batch (reused, as the Keras benchmarks do).

    ``model``: a ``KendallDeepLabV3`` (default: one built from ``model_kwargs``). ``threads``: PyTorch's intra-op
    threads (default: PyTorch's choice). Returns ``common.timed``'s figures (``times_s``: each timed step's seconds, ``median_s``, ``best_s``, ...),
    ``images_per_s`` (batch / median step; the median keeps one disturbed step on a shared machine from moving the
    figure), ``warmup_s`` and ``threads``.
    """
    if threads:
        torch.set_num_threads(int(threads))
    model = model if model is not None else KendallDeepLabV3(**model_kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = ReferenceTrainer(model)
    images, targets = random_batch(batch, height, width, model.num_classes, model.tasks, channels_last=channels_last)
    # train_step returns a float: the step has finished when it returns (CPU ops are synchronous).
    timing = timed(lambda: trainer.train_step(images, targets), steps, warmup)
    return {**timing, "images_per_s": batch / timing["median_s"], "threads": torch.get_num_threads()}


def train_images_per_s(depth=50, height=128, width=256, batch=8, steps=5, warmup=2, threads=None,
                       channels_last=False, **model_kwargs):
    """Training images/s of the ResNet-``depth`` model (batch / median step time; see ``time_training``)."""
    return time_training(height=height, width=width, batch=batch, steps=steps, warmup=warmup, threads=threads,
                         channels_last=channels_last, backbone_depth=depth, **model_kwargs)["images_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=sorted(RESNET_BLOCKS))
    parser.add_argument("--backbone_width", type=int, default=64)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--channels_last", action="store_true")
    args = parser.parse_args()
    model = KendallDeepLabV3(backbone_depth=args.depth, backbone_width=args.backbone_width)
    result = time_training(model, args.height, args.width, args.batch, args.steps, args.warmup, args.threads,
                           args.channels_last)
    print(f"ResNet-{args.depth} {args.height}x{args.width} batch {args.batch}: "
          f"{parameter_counts(model)['total']:,} parameters, {result['images_per_s']:.2f} img/s, "
          f"{result['median_s']:.3f} s/step (median of {args.steps}), {result['threads']} threads")


if __name__ == "__main__":
    main()
