"""Loss-based weightings: the weights depend on the task losses (and the step) only, never on the gradients.

``loss_weights(losses, state, step, seed) -> (weights (K,), new_state)``; the trainer then takes one backward pass of
``sum_k stop_gradient(w_k) L_k``. Uncertainty, DWA and MT-UNet need more (trainable or per-epoch state) and live in
:mod:`mtl_keras.weighting`. Weights are computed in the losses' dtype (at least float32), the state in float32;
negative losses are clamped to zero before any logarithm (LibMTL would return NaN).
"""

import keras
import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import GradientMethod, register_gradient_method, stateless_normal

# The official codes' epsilons: STCH's inside its logarithms, FAMO's added to the losses.
_STCH_EPSILON = 1e-20
_FAMO_EPSILON = 1e-8
_GLS_TINY = 1e-30
# torch.optim.Adam's defaults, FAMO's optimiser of the task logits.
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
    uses_gradients = False


def _softmax(x):
    """Softmax over the last axis (``ops.softmax`` warns for K = 1, a valid case here)."""
    e = ops.exp(x - ops.max(x, axis=-1, keepdims=True))
    return e / ops.sum(e, axis=-1, keepdims=True)


def _cast_state(new_state, template):
    """``new_state`` with the dtypes of ``template`` (the state as passed in)."""
    return {key: ops.cast(value, ops.convert_to_tensor(template[key]).dtype) for key, value in new_state.items()}


@register_gradient_method
class EqualWeighting(_LossBasedMethod):
    """Equal weighting, ``w_k = 1``: LibMTL's ``EW`` (weights of 1, as its code, not the ``1/T`` of its docstring).
    The same sum as :class:`mtl_keras.weighting.EqualWeighting`, taken through the gradient path."""

    name = "equal"

    def loss_weights(self, losses, state, step, seed):
        dtype = _weights_dtype(losses)
        return ops.ones((self.num_tasks,), dtype=dtype), dict(state)


@register_gradient_method
class GeometricLossStrategy(_LossBasedMethod):
    """Geometric loss strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019): the gradient of
    ``(prod_k L_k)^(1/K)``, ``w_k = GLS / (K L_k)``, computed through logs (no under- or overflow).

    LibMTL back-propagates the same total but logs ``L_k / (K prod_j L_j)``; we return the true factors. Losses are
    clamped to at least 1e-30 (a zero loss leaves the gradient undefined).
    """

    name = "gls"
    needs_losses = True

    def loss_weights(self, losses, state, step, seed):
        losses = _check_losses(self, losses)
        logs = ops.log(ops.maximum(losses, _GLS_TINY))
        weights = ops.exp(ops.mean(logs) - logs) / float(self.num_tasks)
        return weights, dict(state)


@register_gradient_method
class RandomLossWeighting(_LossBasedMethod):
    """Random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022):
    ``w = softmax(N(0, I_K))`` each step, summing to 1 as in the paper and LibMTL; drawn stateless in ``(seed, step)``.
    """

    name = "rlw"

    def loss_weights(self, losses, state, step, seed):
        dtype = _weights_dtype(losses)
        draw = stateless_normal((self.num_tasks,), seed, step, stream=0, dtype="float32")
        return ops.cast(_softmax(draw), dtype), dict(state)


@register_gradient_method
class SmoothTchebycheff(_LossBasedMethod):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024) of ``log L_k``, as the authors' multi-task code
    (github.com/Xi-L/STCH, which LibMTL copies): ``w_k = K softmax(u / mu)_k / L_k``, ``u_k = log(L_k / n_k)``.

    Warm-up: weights ``1 / L_k`` (the sum of log losses, as the official code), and the nadir ``n`` is the mean loss
    of its last ``nadir_steps``. Counted in steps, not LibMTL's epochs (4 plain + 1 averaging): 100 / 20 keeps that
    1:5 ratio. ``warmup_steps = 0``: no warm-up, ``n = 1``. The official ``+1e-20`` in the logarithm is kept.
    """

    name = "stch"
    defaults = {"mu": 1.0, "warmup_steps": 100, "nadir_steps": 20}
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
            # count 1 at step `start` replaces the initial ones by the losses
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


@register_gradient_method
class FastAdaptiveMultitaskOptimization(_LossBasedMethod):
    """FAMO (Liu et al., "Fast Adaptive Multitask Optimization", NeurIPS 2023, Alg. 1; github.com/Cranial-XIX/FAMO):
    ``w_k = softmax(xi)_k / (L_k + 1e-8)`` normalised to sum 1; after the update the logits ``xi`` take one step on
    the observed decrease of each log loss.

    The logits' step is Adam (``torch.optim.Adam(lr=w_lr, weight_decay=w_gamma)``, as the authors' code and LibMTL);
    ``optimizer="sgd"`` is Alg. 1 literally. ``w_gamma = 1e-3`` is LibMTL's (``famo.py``: 0.01). As published, Adam
    steps ~``w_lr`` even on a rounding-noise gradient, so backends may then differ by that much. The authors'
    optional gradient clipping is an optimiser setting, not reproduced (nor in LibMTL).
    """

    name = "famo"
    defaults = {"w_lr": 0.025, "w_gamma": 1e-3, "optimizer": "adam"}
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
