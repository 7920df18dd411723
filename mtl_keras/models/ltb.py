"""Learning to Branch (Guo et al., ICML 2020), as LibMTL's ``LTB``: one backbone copy per task, and before each stage a
learned choice of which task's previous-level features each task's copy continues from.

The copies are split by :func:`~mtl_keras.models.backbones.resnet_style_stages`: level 0 is each task's stem, level
``i`` (1..S) the output of stage ``i`` (on the dilated ResNet: layer1..layer4, P2..P5). Before stage ``i``, task ``t``
takes ``sum_j w[t, j] rep_{i-1}[j]`` with ``w`` a function of ``alpha[i, t, :]``:

- training, warm-up (LibMTL: epochs before ``epochs / 100``): ``w`` = all ones (every path summed);
- training after warm-up: a hard Gumbel-softmax sample of ``alpha[i, t, :]`` at temperature
  ``tau = epochs / 20 / sqrt(epoch + 1)`` (one-hot forward, the soft sample's gradient backward: straight-through);
- inference: all ones during warm-up, else the one-hot of ``argmax(alpha[i, t, :])``: the branching learned,
  deterministic. LibMTL samples at test time too; we don't, so that evaluation, export and prediction of a trained
  model give one answer (the architecture Guo et al. keep after training is the most probable one).

The schedule lives in non-trainable variables of :class:`LTBBranching` (saved with the model), set at each epoch's
start by :class:`LTBSchedule` (``model.training_callbacks(epochs)``). Without it, e.g. in a plain ``fit``, the
state stays at its start, warm-up: all paths summed, in training and inference alike.
"""

import math

import keras
from keras import ops

from mtl_keras.models.cross_stitch import stage_outputs, stem_outputs, task_copies
from mtl_keras.models.sharing import SharingModel, task_heads
from mtl_keras.registry import register_model
from mtl_keras.tasks import validate_tasks

_EPS = 1e-10


@keras.saving.register_keras_serializable(package="mtl_keras")
class LTBBranching(keras.layers.Layer):
    """LibMTL's LTB mixture: ``alpha`` ``(num_rows, T, T)`` (trainable, ones at the start), the schedule state
    ``warmup`` (1: all-ones mixture) and ``temperature`` (non-trainable), a seeded Gumbel sampler. Called on the T
    tasks' features with ``level=i``, it returns ``[sum_j w[t, j] x_j for t]``, ``w = selection(i, training)``."""

    def __init__(self, num_tasks, num_rows, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = int(num_tasks)
        self.num_rows = int(num_rows)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="gumbel_seed")

    def build(self, input_shape):
        self.alpha = self.add_weight(shape=(self.num_rows, self.num_tasks, self.num_tasks), initializer="ones",
                                     name="alpha")
        self.warmup = self.add_weight(shape=(), initializer="ones", trainable=False, name="warmup")
        self.temperature = self.add_weight(shape=(), initializer="ones", trainable=False, name="temperature")

    def set_schedule(self, warmup, temperature):
        """The state of an epoch: ``warmup`` (bool) and the Gumbel-softmax ``temperature``."""
        if not self.built:
            raise ValueError(f"{self.name} is not built yet.")
        self.warmup.assign(1.0 if warmup else 0.0)
        self.temperature.assign(float(temperature))

    def selection(self, level, training=False):
        """``(T, T)``: row t weighs the tasks' features that task t continues from before stage ``level``."""
        shape, dtype = (self.num_tasks, self.num_tasks), self.alpha.dtype
        ones = ops.ones(shape, dtype)
        logits = self.alpha[level]
        if training:
            uniform = keras.random.uniform(shape, minval=_EPS, maxval=1.0, dtype=dtype, seed=self.seed_generator)
            gumbel = -ops.log(-ops.log(uniform))
            soft = ops.softmax((logits + gumbel) / self.temperature, axis=-1)
            hard = ops.one_hot(ops.argmax(soft, axis=-1), self.num_tasks, dtype=dtype)
            chosen = hard - ops.stop_gradient(soft) + soft  # straight-through, as torch's gumbel_softmax(hard=True)
        else:
            chosen = ops.one_hot(ops.argmax(logits, axis=-1), self.num_tasks, dtype=dtype)
        return ops.where(self.warmup > 0.5, ones, chosen)

    def call(self, inputs, level=1, training=None):
        if len(inputs) != self.num_tasks:
            raise ValueError(f"{self.name}: expected the features of {self.num_tasks} tasks, got {len(inputs)}.")
        weights = ops.cast(self.selection(level, training=bool(training)), inputs[0].dtype)
        return [sum(weights[t, j] * x for j, x in enumerate(inputs)) for t in range(self.num_tasks)]

    def compute_output_shape(self, input_shape):
        return list(input_shape)

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "num_rows": self.num_rows, "seed": self.seed}


def ltb_schedule(epoch, epochs):
    """LibMTL's ``(warm-up, temperature)`` at ``epoch`` (from 0) of ``epochs``."""
    return epoch < epochs / 100, epochs / 20 / math.sqrt(epoch + 1)


def branching_layers(model):
    """The :class:`LTBBranching` layers inside ``model`` (a task model, or a trainer holding one), nested models
    searched."""
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, LTBBranching):
            found.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
    return found


class LTBSchedule(keras.callbacks.Callback):
    """Sets LTB's warm-up and Gumbel temperature at each epoch's start (:func:`ltb_schedule` of ``epochs``), in
    ``layers`` or else in every :class:`LTBBranching` layer of the model being trained."""

    def __init__(self, epochs, layers=None):
        super().__init__()
        self.epochs = int(epochs)
        self.layers = None if layers is None else list(layers)

    def on_epoch_begin(self, epoch, logs=None):
        layers = self.layers if self.layers is not None else branching_layers(self.model)
        if not layers:
            raise ValueError("LTBSchedule: the model being trained has no LTBBranching layer.")
        warmup, temperature = ltb_schedule(epoch, self.epochs)
        for layer in layers:
            layer.set_schedule(warmup, temperature)


@keras.saving.register_keras_serializable(package="mtl_keras")
class LearningToBranch(SharingModel):
    """Learning to Branch (LibMTL's ``LTB``): one encoder copy per task; before each stage every task continues from
    the previous level's features of the task(s) its branching weights select (see the module docstring); each
    task's head on its own copy's deepest level. ``gumbel_seed``: the Gumbel sampler's seed (None: from Keras'
    global seed). Other arguments: :class:`SharingModel`'s.

    The branching weights are one ``(S + 2, T, T)`` variable for S stages, as LibMTL's ``alpha`` (6, T, T) on a
    ResNet: rows 1..S are used (row i before stage i), rows 0 and S + 1 are allocated (the trainable parameter count
    matches LibMTL's) and never used."""

    def __init__(self, tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3),
                 gumbel_seed=None, **kwargs):
        tasks = validate_tasks(tasks)
        encoder, head, kwargs = self._split_arguments(kwargs)
        # === Layers ===
        backbone, custom = self._encoder(encoder, input_shape)
        splits = task_copies(backbone, tasks, pretrained=encoder["backbone_weights"] is not None or custom)
        num_stages = len(splits[0][1])
        branching = LTBBranching(len(tasks), num_rows=num_stages + 2, seed=gumbel_seed, name="ltb_branching")
        # === Functional graph ===
        image = keras.Input(backbone.image_shape, name="image")
        features = stem_outputs(splits, image)  # level 0
        for i in range(num_stages):
            features = stage_outputs(splits, i, branching(features, level=i + 1))
        outputs = task_heads(dict(zip(tasks, features)), tasks, num_classes, image, **head)
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_sharing(backbone, custom, tasks, num_classes, encoder, head)
        self.gumbel_seed = gumbel_seed

    def training_callbacks(self, epochs):
        """The callbacks a run of ``epochs`` epochs needs: LibMTL's warm-up and temperature schedule."""
        return [LTBSchedule(epochs, layers=[self.get_layer("ltb_branching")])]

    def get_config(self):
        return {**super().get_config(), "gumbel_seed": self.gumbel_seed}


@register_model
def ltb(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(128, 256, 3), **overrides):
    """Learning to Branch: a dilated ResNet-50 (output stride 8) per task, a learned branching before each of
    layer1..layer4, a DeepLab head per task."""
    return LearningToBranch(tasks, num_classes, input_shape, **{"name": "ltb", **overrides})
