"""LibMTL's mixture-of-experts architectures on any backbone: MMoE, CGC, PLE and DSelect-k.

Each expert is a whole copy of the backbone (LibMTL: ``encoder_class()``), and the task features are a per-sample
weighted sum of expert features chosen by a per-task gate (LibMTL's ``einsum('ij..., ji -> j...')``):

- :class:`MMoE` (Ma et al., KDD 2018): ``num_experts`` shared experts (their deepest level), one softmax gate per
  task;
- :class:`CGC` (Tang et al., RecSys 2020): shared experts plus each task's own experts, the task's gate over
  [shared..., own...];
- :class:`PLE` (Tang et al., RecSys 2020): CGC at every stage of a ResNet (LibMTL's stem with the max-pool, then
  layer1..layer4, :func:`~mtl_keras.models.backbones.resnet_style_stages`): at each level each task mixes the
  shared and its own experts' stage run on the task's representation;
- :class:`DSelectK` (Hazimeh et al., NeurIPS 2021): MMoE's experts with DSelect-k gates (smooth-step binary codes).

LibMTL's gates read the flattened input image; here they read the image as the backbone's ``stem`` gives it (on the
dilated ResNet: normalised, as LibMTL's data loaders give it), so a gate's Dense has ``prod(H, W, 3)`` inputs for the
size the model is built for, ``gate_image_size`` (default: ``input_shape``'s). At that size the gates read their input
as it is; a model built for another size (the serving copy, ``input_shape=(None, None, 3)``, or any other) resizes what
each gate reads bilinearly to the size it has at ``gate_image_size``, so the models serve images of any size. The gates' Dense layers start as PyTorch's ``nn.Linear``
(kernel and bias uniform in +-1/sqrt(fan_in)), DSelect-k's as LibMTL sets them. The trainable parameters are LibMTL's
for the same encoder and heads (the layers are the same shapes; see each class).
"""

import math

import keras
import numpy as np
from keras import ops

from mtl_keras.models.backbones import resnet_style_stages
from mtl_keras.models.heads import deepest_level
from mtl_keras.models.sharing import SharingModel, task_heads
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks

DEFAULT_TASKS = ("semantic", "instance", "depth")
DEFAULT_INPUT_SHAPE = (128, 256, 3)


# ------------------------------------------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package="mtl_keras")
class ExpertMixture(keras.layers.Layer):
    """``[weights (B, E), expert_1, ..., expert_E] -> sum_e weights[:, e] * expert_e`` (any expert rank)."""

    def build(self, input_shape):
        weights, experts = input_shape[0], input_shape[1:]
        if weights[-1] is not None and int(weights[-1]) != len(experts):
            raise ValueError(f"{self.name}: {int(weights[-1])} gate weights for {len(experts)} experts.")

    def call(self, inputs):
        weights, experts = inputs[0], inputs[1:]
        weights = ops.cast(weights, experts[0].dtype)
        broadcast = (-1,) + (1,) * (len(experts[0].shape) - 1)
        mixture = None
        for e, expert in enumerate(experts):
            term = ops.reshape(weights[:, e], broadcast) * expert
            mixture = term if mixture is None else mixture + term
        return mixture

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[1])


def smooth_step(t, gamma=1.0):
    """DSelect-k's smooth step: 0 for ``t <= -gamma/2``, 1 for ``t >= gamma/2``, else
    ``-2/gamma**3 t**3 + 3/(2 gamma) t + 1/2`` (continuously differentiable)."""
    cubic = (-2.0 / gamma ** 3) * t ** 3 + (3.0 / (2.0 * gamma)) * t + 0.5
    return ops.where(t <= -gamma / 2, ops.zeros_like(t), ops.where(t >= gamma / 2, ops.ones_like(t), cubic))


@keras.saving.register_keras_serializable(package="mtl_keras")
class DSelectKGate(keras.layers.Layer):
    """DSelect-k's gate on flattened features ``(B, D)`` -> expert weights ``(B, num_experts)``.

    ``num_nonzeros`` selectors, each ``ceil(log2 E)`` smooth-step bits ``s = smooth_step(z, gamma)`` with
    ``z = x W_z + b_z`` (LibMTL's ``_z_logits``, initialised uniform in +-gamma/100); selector k's weight on expert e
    (binary code c_e, most significant bit first) is ``prod_b (s_kb if c_eb else 1 - s_kb)``; the selectors are mixed
    by ``softmax(x W_w + b_w)`` (``_w_logits``, uniform in +-0.05). With ``training``, the layer adds DSelect-k's
    regulariser with ``add_loss``: ``entropy_regularization * -sum(p log(p + 1e-6))`` over the selector outputs p
    (LibMTL's 1e-6) and, when E is not a power of two, ``sum(1 / sum_e p)`` (pushing each selector onto existing
    experts)."""

    def __init__(self, num_experts=2, num_nonzeros=2, gamma=1.0, entropy_regularization=1e-6, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 2:
            raise ValueError(f"DSelect-k needs num_experts >= 2, got {num_experts}.")
        if int(num_nonzeros) < 1:
            raise ValueError(f"DSelect-k needs num_nonzeros >= 1, got {num_nonzeros}.")
        self.num_experts = int(num_experts)
        self.num_nonzeros = int(num_nonzeros)
        self.gamma = float(gamma)
        self.entropy_regularization = entropy_regularization
        self.num_binary = math.ceil(math.log2(self.num_experts))
        self.power_of_2 = self.num_experts == 2 ** self.num_binary
        # (E, bits): expert e's code, most significant bit first (np.binary_repr, as LibMTL)
        self.binary_codes = np.array([[int(b) for b in np.binary_repr(e, width=self.num_binary)]
                                      for e in range(self.num_experts)], "float32")

    def build(self, input_shape):
        features = int(input_shape[-1])
        z, w = self.gamma / 100, 0.05

        def uniform(bound):
            return keras.initializers.RandomUniform(-bound, bound)

        self.z_kernel = self.add_weight(shape=(features, self.num_nonzeros * self.num_binary),
                                        initializer=uniform(z), name="z_logits_kernel")
        self.z_bias = self.add_weight(shape=(self.num_nonzeros * self.num_binary,), initializer=uniform(z),
                                      name="z_logits_bias")
        self.w_kernel = self.add_weight(shape=(features, self.num_nonzeros), initializer=uniform(w),
                                        name="w_logits_kernel")
        self.w_bias = self.add_weight(shape=(self.num_nonzeros,), initializer=uniform(w), name="w_logits_bias")

    def selector_outputs(self, inputs):
        """``(B, num_nonzeros, num_experts)``: each selector's weights on the experts."""
        z = ops.matmul(inputs, self.z_kernel) + self.z_bias
        steps = smooth_step(ops.reshape(z, (-1, self.num_nonzeros, 1, self.num_binary)), self.gamma)
        codes = ops.cast(ops.reshape(self.binary_codes, (1, 1, self.num_experts, self.num_binary)), steps.dtype)
        return ops.prod(codes * steps + (1 - codes) * (1 - steps), axis=-1)

    def regularization(self, selector_outputs):
        p = ops.cast(selector_outputs, "float32")
        loss = ops.zeros((), "float32")
        if self.entropy_regularization:
            loss = loss - ops.sum(p * ops.log(p + 1e-6)) * float(self.entropy_regularization)
        if not self.power_of_2:
            loss = loss + ops.sum(1.0 / ops.sum(p, axis=-1))
        return loss

    def call(self, inputs, training=None):
        selectors = self.selector_outputs(inputs)
        if training:
            self.add_loss(self.regularization(selectors))
        if self.num_nonzeros == 1:  # a softmax over one logit is 1 (w_logits stays allocated, as LibMTL's)
            return selectors[:, 0]
        selector_weights = ops.softmax(ops.matmul(inputs, self.w_kernel) + self.w_bias, axis=-1)
        return ops.sum(ops.expand_dims(selector_weights, -1) * selectors, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "num_nonzeros": self.num_nonzeros,
                "gamma": self.gamma, "entropy_regularization": self.entropy_regularization}


# ------------------------------------------------------------------------------------------------------ helpers
def flattened_size(tensor, what):
    """``prod(tensor.shape[1:])``, the input size of a gate reading ``tensor`` flattened; refuses unknown sizes."""
    dims = tuple(tensor.shape[1:])
    if any(d is None for d in dims):
        raise ValueError(f"{what} reads a flattened tensor of shape {dims}: the gates need a fixed input size; build "
                         f"the model (and a custom backbone) with a fixed input_shape.")
    return math.prod(int(d) for d in dims)


def gate_size(gate_image_size, input_shape):
    """The (H, W) the gates are built for: ``gate_image_size``, else ``input_shape``'s (which must then be fixed)."""
    size = gate_image_size if gate_image_size is not None else tuple(input_shape)[:2]
    if len(size) != 2 or any(d is None for d in size):
        raise ValueError(f"The gates read the flattened image: build the model with a fixed input_shape or give "
                         f"gate_image_size=(H, W); got input_shape {tuple(input_shape)}.")
    return int(size[0]), int(size[1])


def _gate_config(model):
    """``gate_image_size`` as the config holds it: None when it is the input size (the default), else [H, W]."""
    return None if tuple(model.gate_image_size) == tuple(model.image_shape[:2]) else list(model.gate_image_size)


def gate_view(x, size, name):
    """``x`` as a gate reads it: as it is at ``size`` (H, W), else resized bilinearly to ``size``."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return keras.layers.Resizing(int(size[0]), int(size[1]), interpolation="bilinear", name=f"{name}_resize")(x)


def level_sizes(stem, stages, size):
    """The (H, W) of ``stem``'s and each of ``stages``' outputs for images of ``size`` (shapes only, no graph)."""
    spec = stem.compute_output_spec(keras.KerasTensor((1, *size, 3)))
    sizes = [tuple(spec.shape[1:3])]
    for stage in stages:
        spec = stage.compute_output_spec(spec)
        sizes.append(tuple(spec.shape[1:3]))
    return sizes


def linear_gate(x, num_experts, name):
    """LibMTL's gate: ``Linear(flatten(x), num_experts)`` + softmax, initialised as PyTorch's ``nn.Linear``."""
    bound = 1.0 / math.sqrt(flattened_size(x, name))
    flat = keras.layers.Flatten(name=f"{name}_flatten")(x)
    return keras.layers.Dense(num_experts, activation="softmax", name=name,
                              kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
                              bias_initializer=keras.initializers.RandomUniform(-bound, bound))(flat)


def _count(value, name, minimum):
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _task_counts(value, tasks, name):
    """``(config value, {task: count})`` from one count for every task or a list of one per task."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(tasks):
            raise ValueError(f"{name}: one count per task {list(tasks)} (or one integer), got {list(value)}.")
        counts = [_count(v, name, 0) for v in value]
        return counts, dict(zip(tasks, counts))
    count = _count(value, name, 0)
    return count, {task: count for task in tasks}


def _expert_copies(model, backbone, encoder, custom, names):
    """``backbone`` and copies of it named ``names[1:]`` (own weights; a pretrained backbone's weights)."""
    return model._copies(backbone, names, pretrained=encoder["backbone_weights"] is not None or custom)


def _shared_and_task_experts(model, backbone, encoder, custom, tasks, num_shared, num_task):
    """(shared experts, {task: its experts}): ``backbone`` is the first shared expert, the rest are copies."""
    names = [backbone.name] + [f"{backbone.name}_shared_expert{k}" for k in range(1, num_shared)]
    names += [f"{backbone.name}_{task}_expert{k}" for task in tasks for k in range(num_task[task])]
    copies = _expert_copies(model, backbone, encoder, custom, names)
    shared, rest, own = copies[:num_shared], copies[num_shared:], {}
    for task in tasks:
        own[task], rest = rest[:num_task[task]], rest[num_task[task]:]
    return shared, own


def _image(backbone):
    return keras.Input(shape=backbone.image_shape, name="image")


# ------------------------------------------------------------------------------------------------------- models
@keras.saving.register_keras_serializable(package="mtl_keras")
class MMoE(SharingModel):
    """Multi-gate mixture of experts (Ma et al., KDD 2018; LibMTL's ``MMoE``): ``num_experts`` backbone copies shared
    by all tasks (their deepest level); per task a gate ``softmax(Dense(num_experts))`` on the flattened image (the
    backbone's stem output: normalised) weighs them into the task's features, read by the task's head.

    Trainable parameters: ``num_experts`` backbones + per task ``(H * W * 3 + 1) * num_experts`` (gate) + the heads,
    as LibMTL's (``experts_shared`` and ``gate_specific``)."""

    # the gates' size defaults to the input's: an any-size copy (export.serving_model) keeps the built one
    input_size_arguments = ("gate_image_size",)

    def __init__(self, tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, num_experts=2,
                 gate_image_size=None, **kwargs):
        tasks = validate_tasks(tasks)
        num_experts = _count(num_experts, "num_experts", 1)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        gates_at = gate_size(gate_image_size, backbone.image_shape)
        names = [backbone.name] + [f"{backbone.name}_expert{k}" for k in range(1, num_experts)]
        experts = _expert_copies(self, backbone, encoder, custom, names)
        # === Functional graph ===
        image = _image(backbone)
        gate_input = gate_view(backbone.stem(image), gates_at, "gate_image")
        level = deepest_level(backbone)
        expert_features = [expert(image)[level] for expert in experts]
        features = {task: ExpertMixture(name=f"{task}_experts_mixture")(
            [linear_gate(gate_input, num_experts, name=f"{task}_gate"), *expert_features]) for task in tasks}
        outputs = task_heads(features, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.num_experts, self.gate_image_size = num_experts, gates_at

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "gate_image_size": _gate_config(self)}


@keras.saving.register_keras_serializable(package="mtl_keras")
class CGC(SharingModel):
    """Customized gate control (Tang et al., RecSys 2020; LibMTL's ``CGC``): ``num_shared_experts`` backbone copies
    shared by all tasks and ``num_task_experts`` (one integer, or one per task) of each task's own; the task's gate
    ``softmax(Dense(shared + own))`` on the flattened image weighs [shared..., own...] (deepest levels).

    LibMTL's CGC subclasses MMoE, replaces MMoE's ``gate_specific`` (MMoE's gates are not among its parameters) and
    keeps its ``experts_shared``: trainable parameters = ``shared + sum(own)`` backbones + per task ``(H * W * 3 + 1) *
    (shared + own)`` + the heads, as LibMTL's. Each task's own experts feed only its head (LibMTL's
    ``get_share_params`` returns the shared experts alone)."""

    # the gates' size defaults to the input's: an any-size copy (export.serving_model) keeps the built one
    input_size_arguments = ("gate_image_size",)

    def __init__(self, tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, num_shared_experts=1,
                 num_task_experts=1, gate_image_size=None, **kwargs):
        tasks = validate_tasks(tasks)
        num_shared_experts = _count(num_shared_experts, "num_shared_experts", 1)
        num_task_experts, per_task = _task_counts(num_task_experts, tasks, "num_task_experts")
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        gates_at = gate_size(gate_image_size, backbone.image_shape)
        shared, own = _shared_and_task_experts(self, backbone, encoder, custom, tasks, num_shared_experts, per_task)
        # === Functional graph ===
        image = _image(backbone)
        gate_input = gate_view(backbone.stem(image), gates_at, "gate_image")
        level = deepest_level(backbone)
        shared_features = [expert(image)[level] for expert in shared]
        features = {}
        for task in tasks:
            candidates = shared_features + [expert(image)[level] for expert in own[task]]
            weights = linear_gate(gate_input, len(candidates), name=f"{task}_gate")
            features[task] = ExpertMixture(name=f"{task}_experts_mixture")([weights, *candidates])
        outputs = task_heads(features, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = num_task_experts
        self.gate_image_size = gates_at

    def get_config(self):
        return {**super().get_config(), "num_shared_experts": self.num_shared_experts,
                "num_task_experts": self.num_task_experts, "gate_image_size": _gate_config(self)}


@keras.saving.register_keras_serializable(package="mtl_keras")
class PLE(SharingModel):
    """Progressive layered extraction (Tang et al., RecSys 2020; LibMTL's ``PLE``): CGC at every level of a ResNet.

    The experts (``num_shared_experts`` shared, ``num_task_experts`` per task: backbone copies) are split as LibMTL
    splits them (:func:`~mtl_keras.models.backbones.resnet_style_stages`: the stem with the max-pool, then layer1..
    layer4: 5 levels on the dilated ResNet; on another backbone its stages, after its parameter-free stem, which
    runs once, ungated). At level i each task runs the shared experts' and its own experts' level
    i on its representation (the image at level 0) and mixes them with its gate i, ``softmax(Dense(shared + own))``
    on the flattened representation (level 0: the image as the backbone's stem gives it, normalised); the task's last
    mixture is its features.

    As LibMTL: there is no shared gate (the paper's PLE has one, feeding the shared experts of the next level): the
    shared experts run on each task's representation, so from level 1 on they run once per task (level 0's input is
    the image for every task, so its shared experts run once here, the same values). Gate i's input size is the size
    of the representation it reads (static shapes). Trainable parameters: ``shared + sum(own)`` backbones + per task
    ``sum_i (size_i + 1) * (shared + own)`` + the heads, as LibMTL's. A task's own experts feed only its later levels
    and its head (LibMTL's ``get_share_params``: the shared experts alone)."""

    # the gates' size defaults to the input's: an any-size copy (export.serving_model) keeps the built one
    input_size_arguments = ("gate_image_size",)

    def __init__(self, tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, num_shared_experts=1,
                 num_task_experts=1, gate_image_size=None, **kwargs):
        tasks = validate_tasks(tasks)
        num_shared_experts = _count(num_shared_experts, "num_shared_experts", 1)
        num_task_experts, per_task = _task_counts(num_task_experts, tasks, "num_task_experts")
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        gates_at = gate_size(gate_image_size, backbone.image_shape)
        shared, own = _shared_and_task_experts(self, backbone, encoder, custom, tasks, num_shared_experts, per_task)
        shared = [resnet_style_stages(expert) for expert in shared]  # (stem, stages, levels) of each
        own = {task: [resnet_style_stages(expert) for expert in experts] for task, experts in own.items()}
        # LibMTL's ResNet stem (conv1..max-pool) is a level of experts; any other backbone's stem is its input
        # normalisation (no parameters, the same for every expert): it runs once, ungated.
        gated_stem = shared[0][0] is not backbone.stem
        # === Functional graph ===
        image = _image(backbone)
        gate_input = gate_view(backbone.stem(image), gates_at, "gate_image")
        # the size of the representation each level's gates read (the stem's output, then each stage's) for images
        # of gate_image_size
        sizes = level_sizes(shared[0][0], shared[0][1], gates_at)
        if gated_stem:
            shared_stems = [stem(image) for stem, _, _ in shared]  # the same input for every task: run once
            representation = {}
            for task in tasks:
                candidates = shared_stems + [stem(image) for stem, _, _ in own[task]]
                weights = linear_gate(gate_input, len(candidates), name=f"{task}_gate_stem")
                representation[task] = ExpertMixture(name=f"{task}_mixture_stem")([weights, *candidates])
        else:
            representation = {task: gate_input for task in tasks}
        for i, level in enumerate(shared[0][2]):
            for task in tasks:
                reads = representation[task]
                candidates = [stages[i](reads) for _, stages, _ in shared + own[task]]
                weights = linear_gate(gate_view(reads, sizes[i], f"{task}_gate_{level}"), len(candidates),
                                      name=f"{task}_gate_{level}")
                representation[task] = ExpertMixture(name=f"{task}_mixture_{level}")([weights, *candidates])
        outputs = task_heads(representation, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = num_task_experts
        self.gate_image_size = gates_at

    def get_config(self):
        return {**super().get_config(), "num_shared_experts": self.num_shared_experts,
                "num_task_experts": self.num_task_experts, "gate_image_size": _gate_config(self)}


@keras.saving.register_keras_serializable(package="mtl_keras")
class DSelectK(SharingModel):
    """DSelect-k (Hazimeh et al., NeurIPS 2021; LibMTL's ``DSelect_k``): MMoE's ``num_experts`` shared backbone
    copies, each task's features weighted by a :class:`DSelectKGate` (``num_nonzeros`` selectors, smooth step of
    width ``gamma``) on the flattened image (the backbone's stem output).

    LibMTL's DSelect_k subclasses MMoE and sets MMoE's ``gate_specific`` to None, so the trainable parameters are
    ``num_experts`` backbones + per task ``(H * W * 3 + 1) * num_nonzeros * (ceil(log2 num_experts) + 1)``
    (``_z_logits`` and ``_w_logits``) + the heads, as LibMTL's.

    The regulariser: LibMTL calls ``backward`` on it inside ``forward`` (for the last task's gate only, its loop
    variable), then its trainer zeroes the gradients before the loss's backward pass, so LibMTL's training never
    applies it. Here each gate adds it with ``add_loss`` when training (the paper's, the official code's and
    LibMTL's intent): ``MultiTaskTrainer`` with a loss weighting includes ``model.losses`` in the total (Keras'
    ``compute_loss`` adds them); the gradient weightings' step combines the task losses only and leaves it out.
    ``entropy_regularization=0`` drops the entropy term (the training LibMTL runs when ``num_experts`` is a power of
    two). The smooth step uses ``gamma`` (LibMTL passes ``kgamma`` to the initialisation only, its smooth step keeps
    1.0: the same at the default 1.0)."""

    # the gates' size defaults to the input's: an any-size copy (export.serving_model) keeps the built one
    input_size_arguments = ("gate_image_size",)

    def __init__(self, tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, num_experts=2,
                 num_nonzeros=2, gamma=1.0, entropy_regularization=1e-6, gate_image_size=None, **kwargs):
        tasks = validate_tasks(tasks)
        num_experts = _count(num_experts, "num_experts", 2)
        num_nonzeros = _count(num_nonzeros, "num_nonzeros", 1)
        gamma = float(gamma)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        gates_at = gate_size(gate_image_size, backbone.image_shape)
        names = [backbone.name] + [f"{backbone.name}_expert{k}" for k in range(1, num_experts)]
        experts = _expert_copies(self, backbone, encoder, custom, names)
        gates = {task: DSelectKGate(num_experts, num_nonzeros, gamma, entropy_regularization, name=f"{task}_gate")
                 for task in tasks}
        # === Functional graph ===
        image = _image(backbone)
        gate_input = gate_view(backbone.stem(image), gates_at, "gate_image")
        flattened_size(gate_input, "DSelect-k's gate")
        level = deepest_level(backbone)
        expert_features = [expert(image)[level] for expert in experts]
        features = {}
        for task in tasks:
            flat = keras.layers.Flatten(name=f"{task}_gate_flatten")(gate_input)
            features[task] = ExpertMixture(name=f"{task}_experts_mixture")([gates[task](flat), *expert_features])
        outputs = task_heads(features, tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.num_experts, self.num_nonzeros, self.gamma = num_experts, num_nonzeros, gamma
        self.entropy_regularization = entropy_regularization
        self.gate_image_size = gates_at

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "num_nonzeros": self.num_nonzeros,
                "gamma": self.gamma, "entropy_regularization": self.entropy_regularization,
                "gate_image_size": _gate_config(self)}


# ------------------------------------------------------------------------------------------------ entry points
@register_model
def mmoe(tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, **overrides):
    """MMoE: 2 dilated ResNet-50 experts (output stride 8) shared, a softmax gate and a DeepLab head per task."""
    return MMoE(tasks, num_classes, input_shape, **{"name": "mmoe", **overrides})


@register_model
def cgc(tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, **overrides):
    """CGC: 1 shared and 1 per-task dilated ResNet-50 expert, a softmax gate and a DeepLab head per task."""
    return CGC(tasks, num_classes, input_shape, **{"name": "cgc", **overrides})


@register_model
def ple(tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, **overrides):
    """PLE: 1 shared and 1 per-task dilated ResNet-50 expert mixed by per-task gates at each of 5 levels."""
    return PLE(tasks, num_classes, input_shape, **{"name": "ple", **overrides})


@register_model
def dselect_k(tasks=DEFAULT_TASKS, num_classes=19, input_shape=DEFAULT_INPUT_SHAPE, **overrides):
    """DSelect-k: 2 dilated ResNet-50 experts shared, a DSelect-k gate (k = 2) and a DeepLab head per task."""
    return DSelectK(tasks, num_classes, input_shape, **{"name": "dselect_k", **overrides})
