"""Stateful and stochastic gradient weightings: GradNorm, MoCo, MoDo, SDMGrad, DB-MTL and ExcessMTL.

The state is float32 (the arithmetic runs in the gradients' dtype and is cast back). ``step`` counts the updates
before this one; decaying step sizes use LibMTL's counter ``t = step + 1``. GradNorm and ExcessMTL also record their
baseline when their state is still all zeros, so a fresh state initialises whatever the step. MoDo and SDMGrad take
three independent estimates ``(3, K, P)``; a ``(K, P)`` input serves as all three (the full-batch algorithm).
"""

import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import (GradientMethod, dtype_name, project_to_simplex, register_gradient_method,
                                             safe_divide)


def _cast_back(new_state, old_state):
    """``new_state`` with every value in the dtype of the same key of ``old_state``."""
    return {key: ops.cast(value, dtype_name(old_state[key])) for key, value in new_state.items()}


def _step_count(step, dtype):
    """LibMTL's call counter ``t = step + 1`` (1 at the first step) as a float of ``dtype``."""
    return ops.cast(step, dtype) + 1.0


def _row_norms(matrix):
    return ops.sqrt(ops.sum(matrix * matrix, axis=-1))


def _check_losses(method, losses):
    if losses is None:
        raise ValueError(f"Weighting {method.name!r} needs the task losses.")


def _three_samples(method, gradients):
    """``(3, K, P)`` gradients as three ``(K, P)`` tensors (a ``(K, P)`` input is used for all three)."""
    gradients = ops.convert_to_tensor(gradients)
    if len(gradients.shape) == 2:
        return gradients, gradients, gradients
    if len(gradients.shape) != 3 or gradients.shape[0] != 3:
        raise ValueError(f"Weighting {method.name!r} takes gradients of shape (3, K, P) (three independent "
                         f"estimates) or (K, P); got {tuple(gradients.shape)}.")
    return gradients[0], gradients[1], gradients[2]


def _check_choice(method, option, choices):
    value = method.options[option]
    if value not in choices:
        raise ValueError(f"Weighting {method.name!r}: {option} must be one of {choices}, got {value!r}.")


@register_gradient_method
class GradNorm(GradientMethod):
    """GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing", ICML 2018, Alg. 1):
    weights summing to K, stepped so that ``||w_i g_i||`` approach ``mean(G) r_i^alpha``; ``L(0)`` is the first step's.

    ``w`` takes a plain SGD step (the paper: the network's optimiser) on ``dL_grad/dw`` divided by the mean gradient
    norm, so a weight moves by about ``weight_learning_rate`` whatever the gradients' scale (undivided, 0.025 drove a
    weight to 0 in 6 steps on the slim model); negative weights are clipped to 0. LibMTL instead trains
    ``K softmax(logits)`` and uses equal weights for the first epoch. ``alpha = 1.5`` is LibMTL's.
    """

    name = "gradnorm"
    defaults = {"alpha": 1.5, "weight_learning_rate": 0.025}
    needs_losses = True

    def initial_state(self, num_params):
        k = self.num_tasks
        return {"weights": np.ones((k,), "float32"), "initial_losses": np.zeros((k,), "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        _check_losses(self, losses)
        gradients = ops.convert_to_tensor(gradients)
        dtype = dtype_name(gradients)
        k = self.num_tasks
        losses = ops.cast(losses, dtype)
        weights = ops.cast(state["weights"], dtype)
        initial_losses = ops.cast(state["initial_losses"], dtype)

        first = ops.logical_or(ops.equal(step, 0), ops.all(ops.equal(initial_losses, 0.0)))
        initial_losses = ops.where(first, losses, initial_losses)

        direction = ops.matmul(weights, gradients)

        norms = _row_norms(gradients)
        weighted_norms = weights * norms
        loss_ratio = ops.where(initial_losses > 0, safe_divide(losses, initial_losses), ops.ones_like(losses))
        loss_ratio = ops.maximum(loss_ratio, 0.0)
        mean_ratio = ops.mean(loss_ratio)
        inverse_rate = ops.where(mean_ratio > 0, safe_divide(loss_ratio, mean_ratio), ops.ones_like(loss_ratio))
        target = ops.mean(weighted_norms) * ops.power(inverse_rate, float(self.alpha))
        weight_gradient = ops.sign(weighted_norms - target) * safe_divide(norms, ops.mean(norms))

        new_weights = ops.maximum(weights - float(self.weight_learning_rate) * weight_gradient, 0.0)
        total = ops.sum(new_weights)
        new_weights = ops.where(total > 0, new_weights * (k / ops.where(total > 0, total, 1.0)),
                                ops.ones_like(new_weights))
        new_state = _cast_back({"weights": new_weights, "initial_losses": initial_losses}, state)
        return direction, weights, new_state


@register_gradient_method
class MoCo(GradientMethod):
    """MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning", ICLR 2023, Alg. 1): MGDA on
    tracked gradients ``y``; the direction combines ``y``, so no weights are returned. LibMTL's step sizes.

    The defaults are the paper's simplex projection on raw gradients; ``lambda_update="softmax"`` with
    ``gradient_normalization="loss"`` is LibMTL's (authors' code) variant. The paper's bounded-set projection of
    ``y`` is left out, as in LibMTL.
    """

    name = "moco"
    defaults = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0,
                "lambda_update": "projection", "gradient_normalization": "none"}
    supports_rep_grad = False

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        _check_choice(self, "lambda_update", ("projection", "softmax"))
        _check_choice(self, "gradient_normalization", ("none", "loss"))
        self.needs_losses = self.gradient_normalization == "loss"

    def initial_state(self, num_params):
        k = self.num_tasks
        return {"tracked_gradients": np.zeros((k, int(num_params)), "float32"),
                "lambda": np.full((k,), 1.0 / k, "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        dtype = dtype_name(gradients)
        k = self.num_tasks
        if self.gradient_normalization == "loss":
            _check_losses(self, losses)
            norms = _row_norms(gradients)
            gradients = gradients * safe_divide(ops.cast(losses, dtype), norms)[:, None]
        y = ops.cast(state["tracked_gradients"], dtype)
        lam = ops.cast(state["lambda"], dtype)
        t = _step_count(step, dtype)
        beta_t = float(self.beta) / ops.power(t, float(self.beta_sigma))
        gamma_t = float(self.gamma) / ops.power(t, float(self.gamma_sigma))

        y = y - beta_t * (y - gradients)
        matrix = ops.matmul(y, ops.transpose(y)) + float(self.rho) * ops.eye(k, dtype=dtype)
        candidate = lam - gamma_t * ops.matmul(matrix, lam)
        lam = project_to_simplex(candidate) if self.lambda_update == "projection" else ops.softmax(candidate)
        direction = ops.matmul(lam, y)
        return direction, None, _cast_back({"tracked_gradients": y, "lambda": lam}, state)


@register_gradient_method
class MoDo(GradientMethod):
    """MoDo (Chen et al., "Three-Way Trade-Off in Multi-Objective Learning", NeurIPS 2023, Alg. 1; LibMTL's
    defaults): one projected step of ``lambda`` on ``G1 G2^T lambda + rho lambda``, direction ``G3^T lambda``."""

    name = "modo"
    defaults = {"gamma": 1e-3, "rho": 0.1}
    supports_rep_grad = False
    gradient_samples = 3

    def initial_state(self, num_params):
        k = self.num_tasks
        return {"lambda": np.full((k,), 1.0 / k, "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        g1, g2, g3 = _three_samples(self, gradients)
        dtype = dtype_name(g1)
        lam = ops.cast(state["lambda"], dtype)
        gradient = ops.matmul(g1, ops.matmul(lam, g2)) + float(self.rho) * lam
        lam = project_to_simplex(lam - float(self.gamma) * gradient)
        direction = ops.matmul(lam, g3)
        return direction, lam, _cast_back({"lambda": lam}, state)


@register_gradient_method
class SDMGrad(GradientMethod):
    """SDMGrad (Xiao et al., "Direction-oriented Multi-objective Learning", NeurIPS 2023, Alg. 1): ``niter`` momentum
    SGD steps on the scaled dual, ``d = (G_zeta^T w + lmbd g0) / (1 + lmbd)``; LibMTL's (authors' code) defaults.

    With those, weakly correlated gradients make the inner step 5 unstable and ``w`` jumps between faces (as in
    LibMTL); a step of 0.4 without momentum solves the subproblem. We scale by ``1 / scale^2`` exactly (LibMTL adds
    1e-8) and keep ``w`` when the scale is 0; no factor K (the authors' NYUv2 script has one, LibMTL not).
    """

    name = "sdmgrad"
    defaults = {"lmbd": 0.3, "niter": 20, "inner_learning_rate": 5.0, "inner_momentum": 0.5}
    supports_rep_grad = False
    gradient_samples = 3

    def initial_state(self, num_params):
        k = self.num_tasks
        return {"w": np.full((k,), 1.0 / k, "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        zeta, xi1, xi2 = _three_samples(self, gradients)
        dtype = dtype_name(zeta)
        k = self.num_tasks
        lmbd = float(self.lmbd)
        w = ops.cast(state["w"], dtype)

        gg = ops.matmul(xi1, ops.transpose(xi2))
        scale = ops.mean(ops.sqrt(ops.maximum(ops.diagonal(gg), 0.0)))
        gg = safe_divide(gg, scale * scale)
        gg_mean = ops.mean(gg, axis=1)

        def body(_, carry):
            w, buffer = carry
            buffer = float(self.inner_momentum) * buffer + (ops.matmul(gg, w) + lmbd * gg_mean)
            return project_to_simplex(w - float(self.inner_learning_rate) * buffer), buffer

        w, _ = ops.fori_loop(0, int(self.niter), body, (w, ops.zeros_like(w)))
        weights = (w + lmbd / k) / (1.0 + lmbd)
        direction = ops.matmul(weights, zeta)
        return direction, weights, _cast_back({"w": w}, state)


@register_gradient_method
class DBMTL(GradientMethod):
    """DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029): an EMA of the gradients of
    ``log(L_i + 1e-8)``, each scaled to the largest norm; LibMTL's (the authors') defaults. No weights returned.
    LibMTL divides by ``||m_i|| + 1e-8``; we divide exactly, and ``m_i = 0`` gets the factor 0."""

    name = "db_mtl"
    defaults = {"beta": 0.9, "beta_sigma": 0.0}
    needs_losses = True
    supports_rep_grad = False

    def initial_state(self, num_params):
        return {"gradient_average": np.zeros((self.num_tasks, int(num_params)), "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        _check_losses(self, losses)
        gradients = ops.convert_to_tensor(gradients)
        dtype = dtype_name(gradients)
        log_gradients = gradients / (ops.cast(losses, dtype) + 1e-8)[:, None]
        average = ops.cast(state["gradient_average"], dtype)
        beta_t = float(self.beta) / ops.power(_step_count(step, dtype), float(self.beta_sigma))
        average = log_gradients + beta_t * (average - log_gradients)
        norms = _row_norms(average)
        alpha = safe_divide(ops.max(norms), norms)
        direction = ops.matmul(alpha, average)
        return direction, None, _cast_back({"gradient_average": average}, state)


@register_gradient_method
class ExcessMTL(GradientMethod):
    """ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024), as the authors' code and
    LibMTL: AdaGrad-style excess-risk estimates, relative to the mean of the first ``warmup_steps``, drive an
    exponentiated-gradient update of weights summing to K (the paper: 1, i.e. the direction over K).

    The paper's warm-up is 3 epochs (``warmup_steps = 3 * steps_per_epoch``). Not on representation gradients
    (LibMTL sums per-sample ones over the batch; ours have no fixed coordinates across steps).
    """

    name = "excess_mtl"
    defaults = {"robust_step_size": 1e-2, "warmup_steps": 1}
    supports_rep_grad = False

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if int(self.warmup_steps) < 1:
            raise ValueError(f"Weighting {self.name!r}: warmup_steps must be at least 1 (the step that records the "
                             f"baseline excess risks), got {self.warmup_steps}.")

    def initial_state(self, num_params):
        k = self.num_tasks
        return {"squared_gradient_sum": np.zeros((k, int(num_params)), "float32"),
                "initial_excess_risk": np.zeros((k,), "float32"),
                "weights": np.ones((k,), "float32")}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        dtype = dtype_name(gradients)
        k = self.num_tasks
        squared = gradients * gradients
        squared_sum = ops.cast(state["squared_gradient_sum"], dtype) + squared
        excess_risk = ops.sum(squared / ops.sqrt(squared_sum + 1e-7), axis=1)
        initial = ops.cast(state["initial_excess_risk"], dtype)
        weights = ops.cast(state["weights"], dtype)

        collecting = ops.less(step, int(self.warmup_steps))
        unset = ops.logical_and(ops.logical_not(collecting), ops.all(ops.equal(initial, 0.0)))
        running_mean = initial + (excess_risk - initial) / _step_count(step, dtype)
        initial = ops.where(collecting, running_mean, ops.where(unset, excess_risk, initial))
        exponent = float(self.robust_step_size) * safe_divide(excess_risk, initial)
        updated = weights * ops.exp(exponent - ops.max(exponent))
        total = ops.sum(updated)
        updated = ops.where(total > 0, updated * (k / ops.where(total > 0, total, 1.0)), ops.ones_like(updated))
        weights = ops.where(ops.logical_or(collecting, unset), weights, updated)
        direction = ops.matmul(weights, gradients)
        new_state = {"squared_gradient_sum": squared_sum, "initial_excess_risk": initial, "weights": weights}
        return direction, weights, _cast_back(new_state, state)
