"""Loss-based weightings: the weights depend on the task losses (and the step) only, never on the gradients.

Every method here sets ``uses_gradients = False`` and implements ``loss_weights(losses, state, step, seed) ->
(weights (K,), new_state)``; ``GradientMethod.aggregate`` then returns ``d = sum_k w_k g_k``, and the trainer takes
one backward pass of ``sum_k stop_gradient(w_k) L_k`` instead of K (the same direction, since ``d`` is linear in the
task gradients).

Methods: ``equal`` (equal weighting, LibMTL's EW), ``gls`` (geometric loss strategy), ``rlw`` (random loss
weighting), ``stch`` (smooth Tchebycheff scalarisation) and ``famo`` (fast adaptive multitask optimisation).

Not here: the loss weightings of :mod:`mtl_keras.weighting` that need more than ``(losses, state, step)``: uncertainty
weighting (``"uncertainty"``, LibMTL's UW: it has trainable log-variances that the model's optimiser updates) and
the epoch-statistics weightings DWA (``"dwa"``) and MT-UNet (``"mtunet"``), which update once per epoch through
``WeightingEpochCallback``; they stay loss weightings there. ``"equal"`` is the same sum in both tables: ``--weighting
equal`` trains with the loss weighting, ``GradientWeighting(method="equal")`` through the gradient path (the baseline
of ``benchmarks/weighting_cost.py``).

Numerics: the weights are computed in the losses' dtype (at least float32); the state is kept in float32 and cast
back. Losses are assumed non-negative, as in every paper here; a negative loss is clamped to zero before any
logarithm (LibMTL would return NaN), so the weights stay finite.
"""

import keras
import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import GradientMethod, register_gradient_method, stateless_normal

# STCH's official code adds 1e-20 inside its logarithms; FAMO's adds 1e-8 to the losses (both kept as published).
_STCH_EPSILON = 1e-20
_FAMO_EPSILON = 1e-8
# GLS: losses are clamped to at least this before the logarithm (no effect on any positive float32 loss > 1e-30).
_GLS_TINY = 1e-30
# torch.optim.Adam's defaults, used by FAMO's official code (and LibMTL) for the task logits.
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPSILON = 0.9, 0.999, 1e-8


def _weights_dtype(losses):
    """The dtype of weights computed without the losses' values: the losses' float dtype, float32 without losses."""
    return "float32" if losses is None else _float_losses(losses).dtype


def _float_losses(losses):
    """``losses`` as a float tensor of at least float32 precision."""
    losses = ops.convert_to_tensor(losses)
    if keras.backend.standardize_dtype(losses.dtype) not in ("float32", "float64"):
        losses = ops.cast(losses, "float32")
    return losses


def _check_losses(method, losses):
    if losses is None:
        raise ValueError(f"Weighting {method.name!r} needs the task losses.")
    losses = _float_losses(losses)
    if losses.shape[-1] != method.num_tasks:
        raise ValueError(f"Weighting {method.name!r} was built for {method.num_tasks} tasks, got losses of shape "
                         f"{tuple(losses.shape)}.")
    return losses


class _LossBasedMethod(GradientMethod):
    """``aggregate`` of a loss-only method: ``sum_k w_k g_k`` with the weights in the gradients' dtype."""

    uses_gradients = False

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        weights, state = self.loss_weights(losses, state, step, seed)
        weights = ops.cast(weights, gradients.dtype)
        return ops.matmul(weights, gradients), weights, state


def _softmax(x):
    """Softmax over the last axis (``ops.softmax`` warns for K = 1, a valid case here)."""
    e = ops.exp(x - ops.max(x, axis=-1, keepdims=True))
    return e / ops.sum(e, axis=-1, keepdims=True)


def _cast_state(new_state, template):
    """``new_state`` with the dtypes of ``template`` (the state as passed in)."""
    return {key: ops.cast(value, ops.convert_to_tensor(template[key]).dtype) for key, value in new_state.items()}


# ------------------------------------------------------------------------------------------------------- EW
@register_gradient_method
class EqualWeighting(_LossBasedMethod):
    """Equal weighting (EW): ``w_k = 1`` for every task, i.e. the plain sum of the task losses.

    The baseline of every multi-task paper; LibMTL's ``EW`` (whose docstring says ``1/T`` but whose code uses weights
    of 1, as here). The same sum as :class:`mtl_keras.weighting.EqualWeighting` (``--weighting equal``).
    No options, no state, no randomness.
    """

    name = "equal"
    defaults = {}
    uses_gradients = False
    needs_losses = False

    def loss_weights(self, losses, state, step, seed):
        dtype = _weights_dtype(losses)
        return ops.ones((self.num_tasks,), dtype=dtype), dict(state)


# ------------------------------------------------------------------------------------------------------- GLS
@register_gradient_method
class GeometricLossStrategy(_LossBasedMethod):
    """Geometric loss strategy (GLS): minimise the geometric mean of the task losses.

    Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning", CVPR Workshops 2019. The total loss is ``GLS = (prod_k L_k)^(1/K)``; its
    gradient is ``sum_k w_k g_k`` with ``w_k = dGLS/dL_k = GLS / (K L_k)``, which we return, computed through logs
    (``w_k = exp(mean_j log L_j - log L_k) / K``) so that neither the product nor its root can under- or overflow.
    The weights satisfy ``sum_k w_k L_k = GLS`` (GLS is homogeneous of degree 1).

    Differences from LibMTL's ``GLS``: LibMTL back-propagates the same total (same direction) but logs the weights
    ``L_k / (K prod_j L_j)``, which are not the factors of its gradient; we return the true factors. Losses are
    clamped to at least 1e-30 before the logarithm (a zero loss would make the total 0 and its gradient undefined).
    No options, no state.
    """

    name = "gls"
    defaults = {}
    uses_gradients = False
    needs_losses = True

    def loss_weights(self, losses, state, step, seed):
        losses = _check_losses(self, losses)
        logs = ops.log(ops.maximum(losses, _GLS_TINY))
        weights = ops.exp(ops.mean(logs) - logs) / float(self.num_tasks)
        return weights, dict(state)


# ------------------------------------------------------------------------------------------------------- RLW
@register_gradient_method
class RandomLossWeighting(_LossBasedMethod):
    """Random loss weighting (RLW): fresh random weights every step.

    Lin, Ye, Xu, Shi, Zhang and Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning", TMLR 2022. Each step draws ``lambda_tilde ~ N(0, I_K)`` (the paper's default distribution, the one
    its main tables use) and uses ``w = softmax(lambda_tilde)``. As in the paper and LibMTL's ``RLW``, the weights sum
    to 1 (they are not multiplied by K, so the expected weight of a task is 1/K, not EW's 1).

    The draw is :func:`stateless_normal` in ``(seed, step)`` (stream 0): the same on every replica and after a resume,
    and different at every step. No options, no state, losses not needed.
    """

    name = "rlw"
    defaults = {}
    uses_gradients = False
    needs_losses = False

    def loss_weights(self, losses, state, step, seed):
        dtype = _weights_dtype(losses)
        draw = stateless_normal((self.num_tasks,), seed, step, stream=0, dtype="float32")
        return ops.cast(_softmax(draw), dtype), dict(state)


# ------------------------------------------------------------------------------------------------------- STCH
@register_gradient_method
class SmoothTchebycheff(_LossBasedMethod):
    """Smooth Tchebycheff scalarisation (STCH) of the log-normalised task losses.

    Lin, Zhang, Yang, Zhang and Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    ICML 2024, as the authors' multi-task code (github.com/Xi-L/STCH, STCH_MTL, the version LibMTL's ``STCH``
    copies) defines it:

    * warm-up (steps ``0 .. warmup_steps - 1``): minimise ``sum_k log L_k``, i.e. ``w_k = 1 / L_k``; during its last
      ``nadir_steps`` steps the running mean of the raw losses is accumulated as the nadir point ``n`` (state
      ``"nadir"``, float32 (K,)).
    * afterwards: minimise ``K mu log sum_k exp(log(L_k / n_k) / mu)`` (the paper's smooth Tchebycheff function with
      preference 1 for every task and the objectives ``f_k = log L_k``, reference point ``log n_k``, scaled by K as
      in the official code). Its gradient w.r.t. ``L_k``, the weight returned, is in closed form
      ``w_k = K softmax(u / mu)_k / L_k`` with ``u_k = log(L_k / n_k)``. So ``sum_k w_k L_k = K`` and, as
      ``mu -> 0``, all weight goes to the task with the largest normalised loss (Tchebycheff).
      (The official ``+1e-20`` inside the logarithm is kept: ``u_k = log(L_k / n_k + 1e-20)``, and then
      ``w_k = K s_k / (L_k + 1e-20 n_k)``, exactly the gradient of the official total.)

    Defaults: ``mu = 1.0`` (LibMTL's and the official code's ``STCH_mu``). The warm-up is counted in steps here
    (LibMTL and the official code count epochs: ``STCH_warmup_epoch = 4`` plain epochs, then one epoch that also
    averages the losses, then STCH); ``warmup_steps = 100`` with ``nadir_steps = 20`` keeps that 1:5 ratio of
    averaged to total warm-up time; set them to the steps of 5 epochs and of 1 epoch to reproduce LibMTL exactly.
    With ``warmup_steps = 0`` there is no warm-up and ``n = 1`` (STCH on the raw log losses).

    The warm-up follows the authors' code and LibMTL (the sum of the log losses, weights ``1 / L_k``), not equal
    weights. Negative losses are clamped to zero; the nadir to at least 1e-20.
    """

    name = "stch"
    defaults = {"mu": 1.0, "warmup_steps": 100, "nadir_steps": 20}
    uses_gradients = False
    needs_losses = True

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if not float(self.mu) > 0:
            raise ValueError(f"STCH's mu must be positive, got {self.mu}.")
        self.warmup_steps = int(self.warmup_steps)
        self.nadir_steps = int(self.nadir_steps)
        if self.warmup_steps < 0 or self.nadir_steps < 0:
            raise ValueError("STCH's warmup_steps and nadir_steps must be >= 0.")
        if self.warmup_steps > 0 and not 1 <= self.nadir_steps <= self.warmup_steps:
            raise ValueError(f"STCH's nadir_steps must be in [1, warmup_steps = {self.warmup_steps}], got "
                             f"{self.nadir_steps}.")

    def initial_state(self, num_params):
        return {"nadir": np.ones((self.num_tasks,), dtype="float32")}

    def loss_weights(self, losses, state, step, seed):
        losses = ops.maximum(_check_losses(self, losses), 0.0)
        dtype = losses.dtype
        k = float(self.num_tasks)
        nadir = ops.cast(ops.convert_to_tensor(state["nadir"]), dtype)
        step = ops.cast(ops.convert_to_tensor(step), "int32")

        if self.warmup_steps > 0:
            start = self.warmup_steps - self.nadir_steps
            averaging = ops.logical_and(step >= start, step < self.warmup_steps)
            count = ops.cast(ops.maximum(step - start + 1, 1), dtype)
            # the running mean restarts at step `start` (count 1 replaces the initial ones by the losses)
            nadir = ops.where(averaging, nadir + (losses - nadir) / count, nadir)

        safe_nadir = ops.maximum(nadir, _STCH_EPSILON)
        normalised = ops.log(losses / safe_nadir + _STCH_EPSILON)
        smooth_max = _softmax(normalised / float(self.mu))
        stch_weights = k * smooth_max / (losses + _STCH_EPSILON * safe_nadir)
        if self.warmup_steps > 0:
            warmup_weights = 1.0 / (losses + _STCH_EPSILON)
            weights = ops.where(step < self.warmup_steps, warmup_weights, stch_weights)
        else:
            weights = stch_weights
        return weights, _cast_state({"nadir": nadir}, state)


# ------------------------------------------------------------------------------------------------------- FAMO
@register_gradient_method
class FastAdaptiveMultitaskOptimization(_LossBasedMethod):
    """FAMO: fast adaptive multitask optimisation, a loss weighting learned from the observed loss decreases.

    Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023 (Algorithm 1), with the
    authors' code (github.com/Cranial-XIX/FAMO, ``famo.py``) and LibMTL's ``FAMO`` for the details:

    * task logits ``xi`` (state ``"logits"``, zeros at first), ``z = softmax(xi)``;
    * the update direction is ``c sum_k (z_k / L_k) g_k`` with ``c = 1 / sum_k (z_k / L_k)`` (the gradient of
      ``sum_k z_k log L_k``, normalised), so the returned weights are ``w_k = (z_k / D_k) / sum_j (z_j / D_j)``
      with ``D_k = L_k + 1e-8`` (the code's ``1e-8``, and its lower bounds ``min_losses`` left at 0). They sum to 1;
    * after the update, ``after_step(L_before, L_after)``: ``delta = log D_before - log D_after`` (the decrease of
      each log loss, on the same batch), the logits' gradient is ``J_softmax(xi)^T delta = z * (delta - z . delta)``
      plus the regulariser ``w_gamma xi``, and ``xi`` takes one step of Adam on it (``torch.optim.Adam(lr=w_lr,
      weight_decay=w_gamma)`` in the authors' code and LibMTL; betas (0.9, 0.999), eps 1e-8; state ``"adam_m"``,
      ``"adam_v"`` (float32 (K,)) and ``"adam_t"`` (int32 scalar, the Adam step count)). ``optimizer="sgd"`` is
      Algorithm 1 literally: ``xi <- xi - w_lr (delta_xi + w_gamma xi)``.

    Defaults: ``w_lr = 0.025`` (paper, code and LibMTL), ``w_gamma = 1e-3`` (LibMTL's ``FAMO_w_gamma``; the
    authors' ``famo.py`` defaults to 0.01 and the paper tunes gamma per benchmark), ``optimizer = "adam"``.
    Note (Adam, as published): Adam's step is about ``w_lr`` per coordinate whatever the gradient's size, so when
    every task's loss falls by the same factor (logit gradient ~0 up to rounding) the first steps follow the rounding
    noise; backends may then differ in those logits by up to ``w_lr`` per step.
    Not reproduced: the authors' optional clipping of the shared parameters' gradient norm (``max_norm = 1``), an
    optimiser setting outside the weighting (LibMTL does not clip either).
    """

    name = "famo"
    defaults = {"w_lr": 0.025, "w_gamma": 1e-3, "optimizer": "adam"}
    uses_gradients = False
    needs_losses = True
    needs_losses_after_step = True

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"FAMO's optimizer must be 'adam' or 'sgd', got {self.optimizer!r}.")

    def initial_state(self, num_params):
        k = self.num_tasks
        return {"logits": np.zeros((k,), "float32"), "adam_m": np.zeros((k,), "float32"),
                "adam_v": np.zeros((k,), "float32"), "adam_t": np.zeros((), "int32")}

    @staticmethod
    def _shifted(losses):
        return ops.maximum(losses, 0.0) + _FAMO_EPSILON

    def loss_weights(self, losses, state, step, seed):
        losses = _check_losses(self, losses)
        z = _softmax(ops.cast(ops.convert_to_tensor(state["logits"]), losses.dtype))
        scaled = z / self._shifted(losses)
        return scaled / ops.sum(scaled), dict(state)

    def after_step(self, losses_before, losses_after, state, step):
        before = _float_losses(losses_before)
        after = ops.cast(_float_losses(losses_after), before.dtype)
        dtype = before.dtype
        xi = ops.cast(ops.convert_to_tensor(state["logits"]), dtype)
        m = ops.cast(ops.convert_to_tensor(state["adam_m"]), dtype)
        v = ops.cast(ops.convert_to_tensor(state["adam_v"]), dtype)
        t = ops.convert_to_tensor(state["adam_t"])

        delta = ops.log(self._shifted(before)) - ops.log(self._shifted(after))
        z = _softmax(xi)
        grad = z * (delta - ops.sum(z * delta)) + float(self.w_gamma) * xi
        if self.optimizer == "adam":
            t = t + 1
            t_float = ops.cast(t, dtype)
            m = _ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * grad
            v = _ADAM_BETA2 * v + (1.0 - _ADAM_BETA2) * grad * grad
            correction1 = 1.0 - ops.power(ops.cast(_ADAM_BETA1, dtype), t_float)
            correction2 = 1.0 - ops.power(ops.cast(_ADAM_BETA2, dtype), t_float)
            xi = xi - float(self.w_lr) / correction1 * m / (ops.sqrt(v) / ops.sqrt(correction2) + _ADAM_EPSILON)
        else:
            xi = xi - float(self.w_lr) * grad
        return _cast_state({"logits": xi, "adam_m": m, "adam_v": v, "adam_t": t}, state)
