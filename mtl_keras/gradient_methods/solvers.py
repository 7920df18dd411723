"""Gradient methods that solve a small K x K problem per step: MGDA, Nash-MTL, IMTL-G, FairGrad, UPGrad, DualProj.

Every method here reads only the Gram matrix ``M = G G^T`` of the ``(K, P)`` task gradients (plus the losses for
MGDA's loss normalisations), solves a problem in K unknowns on the device and returns the direction
``d = sum_k w_k g_k`` with its weights ``w``. The reference implementations call host solvers (scipy, cvxpy/ECOS,
quadprog); here every solver is written in ``keras.ops`` with a fixed cost, so a step compiles (``tf.function``, XLA,
``jax.jit``) and runs without a device-to-host round trip:

* the quadratic programs (MGDA's min-norm point, the dual-cone projections of UPGrad and DualProj) are solved
  EXACTLY for ``K <= 8`` by enumerating the ``2^K`` active sets: for every set one K x K (K+1 for MGDA) linear
  system gives the stationary point with those constraints active, and the feasible candidate with the smallest
  objective is the optimum (the optimum's own active set is among the candidates, and every feasible candidate is
  no better). For ``K > 8`` a fixed number of first-order iterations (Frank-Wolfe for MGDA, accelerated projected
  gradient for the dual-cone projection) warm-starts 3K steps of a primal active-set method (Wolfe's min-norm-point
  algorithm / Lawson-Hanson), which ends at the exact optimum once it has found the optimal support;
* Nash-MTL's and FairGrad's equations ``M w = w^(-1/alpha)`` are the stationarity condition of a strictly convex
  function on ``w > 0``, minimised by damped Newton steps that stay inside the positive orthant, each with a
  vectorised line search over 20 step lengths (monotone decrease, quadratic convergence near the solution).

The K x K problems are computed in float64 when the gradients are float64 and in float32 otherwise; every linear
system carries a tiny ridge (``_RIDGE``, relative to the normalised Gram matrix) so that duplicate or linearly
dependent gradients never make a system singular (TensorFlow raises on exactly singular systems).
"""

import itertools

import keras
import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import (GradientMethod, dtype_name, gram, min_norm_weights,
                                             register_gradient_method)

# Largest K whose quadratic programs are solved by enumerating all 2^K active sets (256 small systems at K = 8).
_EXACT_MAX_TASKS = 8
# Ridge added to trace/Frobenius-normalised Gram matrices in the linear systems: keeps them non-singular and the
# solver's iterates bounded when the gradients are linearly dependent; far below the precision that matters.
_RIDGE = {"float32": 1e-5, "float64": 1e-12}
# Step lengths tried by the Newton solver's line search: t_max * 2^-j, j = 0..19 (and 0: keep the iterate).
_LINE_SEARCH_STEPS = 20


# ============================================================================================ shared numerics
def _solver_dtype(dtype):
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _cast_solver(gradients):
    """The gradients in the dtype of the K x K problems (float32 for float16/bfloat16 gradients)."""
    return ops.cast(gradients, _solver_dtype(gradients.dtype))


def _safe(x):
    """``x`` where it is non-zero, 1 elsewhere (a divisor)."""
    return ops.where(ops.equal(x, 0), ops.ones_like(x), x)


def _solve(a, b):
    """``a^-1 b`` for (batches of) matrices ``a`` (..., K, K) and vectors ``b`` (..., K) (explicit column: every
    backend reads a (..., K) right-hand side differently)."""
    return ops.squeeze(ops.solve(a, ops.expand_dims(b, -1)), -1)


def _trace(m):
    return ops.sum(ops.diagonal(m))


def _quadratic(v, m):
    """``v_b^T m v_b`` for every row of ``v`` (..., K)."""
    return ops.sum(v * ops.matmul(v, m), axis=-1)


def _subset_masks(k, dtype):
    """All non-empty subsets of ``range(k)`` as 0/1 rows, largest first, ``(2^k - 1, k)``."""
    rows = [mask for size in range(k, 0, -1) for mask in itertools.combinations(range(k), size)]
    masks = np.zeros((len(rows), k), dtype=dtype)
    for r, mask in enumerate(rows):
        masks[r, list(mask)] = 1.0
    return ops.convert_to_tensor(masks)


def _best_candidate(candidates, objective, feasible):
    """The feasible candidate (..., C, K) with the smallest objective (..., C)."""
    finite = ops.all(ops.isfinite(candidates), axis=-1) & ops.isfinite(objective)
    score = ops.where(feasible & finite, objective, ops.full_like(objective, np.inf))
    index = ops.expand_dims(ops.expand_dims(ops.argmin(score, axis=-1), -1), -1)
    return ops.squeeze(ops.take_along_axis(candidates, index, axis=-2), -2)


def _primal_active_set(x, lower, candidates_on, multipliers, iterations, tolerance):
    """Fixed-count primal active-set method (Wolfe's min-norm-point / Lawson-Hanson steps) for a convex QP with
    bounds ``x >= lower`` (rows of ``x`` (B, K) feasible, the warm start); ``candidates_on(free)`` gives the
    stationary points with the non-free coordinates at their bound, ``multipliers(x)`` the KKT multipliers of the
    bounds (optimal when >= 0 on the bound coordinates). Each step either moves to the candidate (when feasible)
    and frees the coordinate with the most negative multiplier, or moves towards it until a free coordinate hits its
    bound and fixes it. The objective never increases; the result is optimal once the correct support is found.
    """
    dtype = dtype_name(x)
    k = x.shape[-1]
    free = ops.cast(x > lower + tolerance * (1.0 + ops.abs(lower)), dtype)

    def body(_, carry):
        x, free = carry
        candidate = candidates_on(free)
        is_free = free > 0
        below = is_free & (candidate < lower)
        finite = ops.all(ops.isfinite(candidate), axis=-1, keepdims=True)
        feasible = ~ops.any(below, axis=-1, keepdims=True) & finite
        # feasible: move there; free the bound coordinate with the most negative multiplier
        multiplier = ops.where(is_free, ops.full_like(x, np.inf), multipliers(candidate))
        j = ops.argmin(multiplier, axis=-1)
        add = ops.min(multiplier, axis=-1, keepdims=True) < -tolerance
        free_feasible = ops.where(add, ops.maximum(free, ops.one_hot(j, k, dtype=dtype)), free)
        # infeasible: the longest step towards the candidate that keeps x >= lower; fix the blocking coordinates
        ratio = ops.where(below, (x - lower) / ops.maximum(x - candidate, 1e-30), ops.full_like(x, np.inf))
        t = ops.clip(ops.min(ratio, axis=-1, keepdims=True), 0.0, 1.0)
        stepped = ops.maximum(x + t * (candidate - x), lower)
        hit = below & (ratio <= t)
        stepped = ops.where(hit, lower, stepped)
        free_stepped = ops.where(hit, ops.zeros_like(free), free)
        x = ops.where(feasible, candidate, ops.where(finite, stepped, x))
        free = ops.where(feasible, free_feasible, ops.where(finite, free_stepped, free))
        return x, free

    x, _ = ops.fori_loop(0, int(iterations), body, (x, free))
    return x


# -------------------------------------------------------------------------------------------- min-norm point
def _simplex_candidates(m, masks):
    """For each support (C, K): the minimiser of ``w^T m w`` over ``sum w = 1`` with ``w = 0`` off the support.

    KKT system with multiplier mu: ``(m w)_i = mu`` on the support, ``w_i = 0`` off it, ``sum w = 1``.
    """
    k = m.shape[0]
    c = masks.shape[0]
    dtype = dtype_name(m)
    free = masks
    eye = ops.eye(k, dtype=dtype)
    top_left = ops.expand_dims(free, -1) * ops.expand_dims(m, 0) + ops.expand_dims(1.0 - free, -1) * eye
    top = ops.concatenate([top_left, -ops.expand_dims(free, -1)], axis=-1)  # (C, K, K + 1)
    bottom = ops.broadcast_to(ops.concatenate([ops.ones((k,), dtype), ops.zeros((1,), dtype)])[None, None, :],
                              (c, 1, k + 1))
    system = ops.concatenate([top, bottom], axis=-2)
    rhs = ops.broadcast_to(ops.convert_to_tensor(np.eye(k + 1, dtype=dtype)[k])[None, :], (c, k + 1))
    return _solve(system, rhs)[:, :k] * free


def _min_norm_point(m, iterations):
    """Simplex weights minimising ``w^T m w`` (MGDA's min-norm point of the convex hull of the gradients)."""
    k = m.shape[0]
    dtype = dtype_name(m)
    if k == 1:
        return ops.ones((1,), dtype)
    m = m / _safe(_trace(m))  # the weights do not depend on the scale of m
    m = m + _RIDGE[dtype] * ops.eye(k, dtype=dtype)
    tolerance = float(np.sqrt(np.finfo(dtype).eps))

    def feasible(candidates):
        return ops.all(candidates >= -tolerance, axis=-1)

    if k <= _EXACT_MAX_TASKS:
        candidates = _simplex_candidates(m, _subset_masks(k, dtype))
        w = _best_candidate(candidates, _quadratic(candidates, m), feasible(candidates))
    else:
        w_fw = min_norm_weights(m, iterations)[None, :]

        def multipliers(w):  # KKT of the simplex QP: (m w)_i - w^T m w >= 0 off the support
            mw = ops.matmul(w, m)
            return mw - ops.sum(w * mw, axis=-1, keepdims=True)

        w = _primal_active_set(w_fw, ops.zeros_like(w_fw), lambda free: _simplex_candidates(m, free), multipliers,
                               3 * k, tolerance)[0]
    w = ops.maximum(w, 0.0)
    return w / _safe(ops.sum(w))


# -------------------------------------------------------------------------------------------- box QP (dual cone)
def _box_candidates(m, u, masks):
    """For rows ``u`` (B, K) and free sets ``masks`` ((C, K) or (B, C, K)): the minimiser of ``v^T m v`` with
    ``v_i = u_i`` off the free set (``(m v)_i = 0`` on it), ``(B, C, K)``."""
    k = m.shape[0]
    b = u.shape[0]
    dtype = dtype_name(m)
    if len(masks.shape) == 2:
        masks = ops.broadcast_to(masks[None], (b,) + tuple(masks.shape))
    c = masks.shape[1]
    free = masks
    system = (ops.expand_dims(free, -1) * m[None, None] + ops.expand_dims(1.0 - free, -1) * ops.eye(k, dtype=dtype))
    rhs = (1.0 - free) * ops.expand_dims(u, 1)
    solution = _solve(ops.reshape(system, (b * c, k, k)), ops.reshape(rhs, (b * c, k)))
    return ops.reshape(solution, (b, c, k))


def _box_qp(m, u, iterations):
    """``argmin_v v^T m v`` subject to ``v >= u``, for every row of ``u`` (B, K); ``m`` symmetric positive definite.

    This is the dual of the projection of ``sum_k u_k g_k`` onto the dual cone ``{x : G x >= 0}`` of the gradients
    (Quinton & Rey 2024, Prop. 1): the projection is ``sum_k v_k g_k``. Exact for K <= 8 (active-set enumeration);
    otherwise ``iterations`` steps of accelerated projected gradient (FISTA with function-value restart, step
    ``1 / trace(m)``), then 3K primal active-set steps (:func:`_primal_active_set`).
    """
    k = m.shape[0]
    dtype = dtype_name(m)
    tolerance = float(np.sqrt(np.finfo(dtype).eps))

    def feasible(candidates):  # candidates (B, C, K)
        return ops.all(candidates >= ops.expand_dims(u, 1) - tolerance * (1.0 + ops.abs(ops.expand_dims(u, 1))),
                       axis=-1)

    if k <= _EXACT_MAX_TASKS:
        masks = ops.concatenate([_subset_masks(k, dtype), ops.zeros((1, k), dtype)], axis=0)  # + "all fixed": v = u
        candidates = _box_candidates(m, u, masks)
        v = _best_candidate(candidates, _quadratic(candidates, m), feasible(candidates))
    else:
        step = 1.0 / _safe(_trace(m))

        def fista(_, carry):
            v, y, t = carry
            v_new = ops.maximum(y - step * ops.matmul(y, m), u)
            t_new = 0.5 * (1.0 + ops.sqrt(1.0 + 4.0 * t * t))
            y_new = v_new + ops.expand_dims((t - 1.0) / t_new, -1) * (v_new - v)
            restart = _quadratic(v_new, m) > _quadratic(v, m)
            y_new = ops.where(ops.expand_dims(restart, -1), v_new, y_new)
            t_new = ops.where(restart, ops.ones_like(t_new), t_new)
            return v_new, y_new, t_new

        v, _, _ = ops.fori_loop(0, int(iterations), fista, (u, u, ops.ones((u.shape[0],), dtype)))
        v = _primal_active_set(v, u, lambda free: _box_candidates(m, u, free[:, None, :])[:, 0],
                               lambda v: ops.matmul(v, m), 3 * k, tolerance)
    return ops.maximum(v, u)


def _dual_cone_weights(gradients, u, norm_eps, reg_eps, iterations):
    """torchjd's ``project_weights``: rows ``v`` with ``pi_J(J^T u) = J^T v`` on the regularised normalised Gram."""
    m = gram(_cast_solver(gradients))
    dtype = dtype_name(m)
    k = m.shape[0]
    trace = _trace(m)
    # torchjd: G / trace(G), or 0 when trace(G) < norm_eps; then + reg_eps I (floored at _RIDGE: never singular).
    m = ops.where((trace < norm_eps) | ops.equal(trace, 0), ops.zeros_like(m), m / _safe(trace))
    m = m + max(float(reg_eps), _RIDGE[dtype]) * ops.eye(k, dtype=dtype)
    return _box_qp(m, ops.cast(u, dtype), iterations)


# -------------------------------------------------------------------------------------------- M w = w^(-p)
def _solve_power_equation(m, p, x0, iterations):
    """``x > 0`` with ``m x = x^(-p)`` (p > 0), from ``x0 > 0``: damped Newton on the strictly convex
    ``f(x) = x^T m x / 2 - sum_i phi(x_i)``, ``phi' = x^(-p)`` (``phi = log`` for p = 1).

    Each step: the Newton direction ``dx = -H^-1 grad f`` (``H = m + diag(p x^(-p-1))``, positive definite), the
    largest step ``t_max = min(1, 0.99 * distance to the boundary x = 0)``, then the best of ``t_max 2^-j``
    (j < 20) and 0 by the value of f (monotone, positive); once the Newton decrement is small, the capped full
    step (quadratic convergence, where f's values no longer resolve the decrease in floating point).
    """
    k = m.shape[0]
    dtype = dtype_name(m)
    p = float(p)
    eye = ops.eye(k, dtype=dtype)
    steps = ops.convert_to_tensor(np.concatenate([0.5 ** np.arange(_LINE_SEARCH_STEPS), [0.0]]).astype(dtype))

    def objective(x):
        barrier = ops.sum(ops.log(x), axis=-1) if p == 1.0 else ops.sum(ops.power(x, 1.0 - p), axis=-1) / (1.0 - p)
        return 0.5 * _quadratic(x, m) - barrier

    def body(_, x):
        gradient = ops.matmul(m, x) - ops.power(x, -p)
        hessian = m + eye * ops.expand_dims(p * ops.power(x, -p - 1.0), 0)
        dx = -_solve(hessian, gradient)
        to_boundary = ops.where(dx < 0, x / ops.maximum(-dx, 1e-30), ops.full_like(x, np.inf))
        t_max = ops.minimum(1.0, 0.99 * ops.min(to_boundary))
        trial = x[None, :] + ops.expand_dims(t_max * steps, -1) * dx[None, :]
        values = objective(ops.maximum(trial, 1e-30))
        values = ops.where(ops.isfinite(values) & ops.all(trial > 0, axis=-1), values, ops.full_like(values, np.inf))
        # near the solution (Newton decrement^2 = -grad . dx < 1e-3) the values of f no longer resolve the
        # decrease in floating point: take the (boundary-capped) full step, where Newton converges quadratically
        index = ops.where(-ops.sum(gradient * dx) < 1e-3, 0, ops.argmin(values))
        return ops.take(trial, index, axis=0)

    return ops.fori_loop(0, int(iterations), body, x0)


def _normalised_gram(gradients):
    """``(M / ||M||_F + ridge I, ||M||_F)`` (Nash-MTL's normalisation; the solution is rescaled exactly)."""
    m = gram(_cast_solver(gradients))
    scale = ops.sqrt(ops.sum(m * m))
    k = m.shape[0]
    return m / _safe(scale) + _RIDGE[dtype_name(m)] * ops.eye(k, dtype=m.dtype), scale


# ============================================================================================ methods
@register_gradient_method
class MGDA(GradientMethod):
    """MGDA / MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

    The direction is the minimum-norm point of the convex hull of the (normalised) task gradients,
    ``d = sum_k w_k g_k`` with ``w = argmin_{w in simplex} ||sum_k w_k g_k / n_k||^2``: a common descent direction
    for every task (or zero at a Pareto-stationary point). MGDA-UB, the paper's efficient upper bound, is the same
    computation on the gradients of the shared representation (the trainer's ``rep_grad``), hence
    ``supports_rep_grad``.

    Options (LibMTL's): ``mgda_gn`` in {"none", "l2", "loss", "loss+"} (default "none"), the gradient normalisation
    ``n_k`` = 1, ``||g_k||``, ``L_k`` or ``L_k ||g_k||`` of the official code (the "loss" variants read the losses);
    ``solver_iterations`` (250, LibMTL's MAX_ITER): Frank-Wolfe steps, used only when K > 8.

    Choices:
      * the min-norm point is computed exactly on the device for K <= 8 (enumeration of the supports, see the module
        docstring) instead of the official Frank-Wolfe / projected-gradient loop with early stop; for K > 8 it is
        ``base.min_norm_weights`` (Frank-Wolfe, Alg. 2 of the paper) followed by an exact polish on its supports;
      * the weights found on the normalised gradients are applied to the RAW gradients, ``d = sum_k w_k g_k``, as in
        the official code (``scale[t] = sol[t]``, then ``sum_t scale[t] L_t`` is back-propagated) and in LibMTL's
        ``rep_grad`` path; LibMTL's parameter path instead sums the normalised gradients ``sum_k w_k g_k / n_k``.
        With the default ``mgda_gn="none"`` all agree. Neither reference multiplies the direction by K, nor do we;
      * a zero normaliser (zero gradient, zero loss) is replaced by 1 (the references divide by zero).
    """

    name = "mgda"
    defaults = {"mgda_gn": "none", "solver_iterations": 250}
    _NORMALISATIONS = ("none", "l2", "loss", "loss+")

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if self.mgda_gn not in self._NORMALISATIONS:
            raise ValueError(f"MGDA: mgda_gn must be one of {self._NORMALISATIONS}, got {self.mgda_gn!r}.")
        self.needs_losses = self.mgda_gn in ("loss", "loss+")

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        if self.needs_losses and losses is None:
            raise ValueError(f"MGDA with mgda_gn={self.mgda_gn!r} needs the task losses.")
        g = _cast_solver(gradients)
        m = gram(g)
        norms = ops.sqrt(ops.maximum(ops.diagonal(m), 0.0))
        if self.mgda_gn == "none":
            normaliser = ops.ones_like(norms)
        elif self.mgda_gn == "l2":
            normaliser = norms
        else:
            normaliser = ops.cast(losses, m.dtype) * (norms if self.mgda_gn == "loss+" else 1.0)
        normaliser = _safe(normaliser)
        m = m / (normaliser[:, None] * normaliser[None, :])
        weights = ops.cast(_min_norm_point(m, self.solver_iterations), gradients.dtype)
        return ops.matmul(weights, gradients), weights, state


@register_gradient_method
class NashMTL(GradientMethod):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    The Nash bargaining solution: weights ``alpha > 0`` with ``(G G^T) alpha = 1 / alpha`` (every task's share
    ``alpha_i g_i^T d = 1``), direction ``d = sum_k alpha_k g_k`` (so ``||d||^2 = K``), then, as in the official code
    and LibMTL, the direction norm is clipped to ``max_norm`` (torch's ``clip_grad_norm_``: factor
    ``min(1, max_norm / (||d|| + 1e-6))``; ``max_norm <= 0`` disables it). The returned weights include the clip
    factor (``d = sum_k w_k g_k``).

    Options (LibMTL's defaults): ``update_weights_every`` (1): the weights are recomputed at the steps with
    ``step % update_weights_every == 0`` and reused (unclipped, then clipped against the new gradients) in between;
    ``max_norm`` (1.0); ``solver_iterations`` (20, in place of LibMTL's ``optim_niter``: here damped Newton steps).

    State: ``alpha`` (K,), the solution of the Frobenius-normalised problem ``(M / ||M||_F) a = 1 / a``, the warm
    start of the next solve (ones at first, as LibMTL's ``prvs_alpha``); ``weights`` (K,), the last unclipped raw
    weights ``a / sqrt(||M||_F)``, reused between updates.

    Choices: the official code and LibMTL solve the equation by up to 20 rounds of a convex-concave linearisation
    with cvxpy/ECOS on the host; here it is the minimiser of the strictly convex ``a^T M a / 2 - sum log a``
    (whose stationarity condition is exactly the equation) by fixed-count damped Newton on the device, on the
    normalised Gram matrix (then rescaled exactly: ``alpha = a / sqrt(||M||_F)``). When no positive solution exists
    (linearly dependent gradients with a positive null combination, e.g. ``g_2 = -g_1``) the ridge of the
    normalised matrix bounds the weights (``||d||^2 <= K`` still holds). Not defined on representation gradients
    in LibMTL (the clip is on the parameter gradient): ``supports_rep_grad = False``.
    """

    name = "nash_mtl"
    defaults = {"update_weights_every": 1, "max_norm": 1.0, "solver_iterations": 20}
    supports_rep_grad = False

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if int(self.update_weights_every) < 1:
            raise ValueError(f"Nash-MTL: update_weights_every must be >= 1, got {self.update_weights_every}.")

    def initial_state(self, num_params):
        return {"alpha": np.ones(self.num_tasks, np.float32), "weights": np.ones(self.num_tasks, np.float32)}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        m, scale = _normalised_gram(gradients)
        dtype = dtype_name(m)
        previous = ops.cast(state["alpha"], dtype)
        previous_weights = ops.cast(state["weights"], dtype)
        start = ops.where(ops.isfinite(previous) & (previous > 0), previous, ops.ones_like(previous))
        alpha = _solve_power_equation(m, 1.0, start, self.solver_iterations)
        solvable = scale > 0
        update = ops.equal(ops.mod(ops.convert_to_tensor(step, "int32"), int(self.update_weights_every)), 0) & solvable
        new_alpha = ops.where(update, alpha, start)
        weights = ops.where(update, alpha / ops.sqrt(_safe(scale)), previous_weights)
        weights_out = ops.cast(weights, gradients.dtype)
        direction = ops.matmul(weights_out, gradients)
        if self.max_norm > 0:  # torch.nn.utils.clip_grad_norm_
            norm = ops.sqrt(ops.sum(ops.square(direction)))
            factor = ops.minimum(ops.cast(1.0, norm.dtype), self.max_norm / (norm + 1e-6))
            direction = direction * factor
            weights_out = weights_out * factor
        new_state = {"alpha": ops.cast(new_alpha, state["alpha"].dtype),
                     "weights": ops.cast(weights, state["weights"].dtype)}
        return direction, weights_out, new_state


@register_gradient_method
class IMTL(GradientMethod):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), the gradient half of IMTL.

    The direction ``d = sum_k w_k g_k`` with ``sum_k w_k = 1`` whose projections onto every unit task gradient are
    equal (``d^T u_k`` the same for all k). The paper's closed form (unit-gradient differences
    ``alpha_{2..K} = g_1 U^T (D U^T)^-1``, ``alpha_1 = 1 - sum``) is computed in the equivalent Gram form
    ``w = M^+ n / (1^T M^+ n)`` with ``n_k = ||g_k||`` (then ``G d = n / (1^T M^+ n)``), on the trace-normalised
    Gram matrix; the pseudo-inverse (relative cutoff ``10 K eps``) also covers linearly dependent gradients.
    When ``1^T M^+ n`` vanishes (no such direction, e.g. ``g_2 = -g_1``) or every gradient is zero, the weights
    and the direction are zero (torchjd's convention; LibMTL's inverse would give inf/NaN).

    Not implemented: IMTL-L, the learnable loss scales ``e^{s_k} L_k - s_k`` of the full IMTL (LibMTL's ``IMTL``
    applies both): they are trainable parameters of the loss, not a function of the gradients; IMTL-L can be
    obtained with an uncertainty-style loss weighting in front of this method. No options, no state.
    """

    name = "imtl"
    defaults = {}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        m = gram(_cast_solver(gradients))
        dtype = dtype_name(m)
        k = m.shape[0]
        m = m / _safe(_trace(m))
        norms = ops.sqrt(ops.maximum(ops.diagonal(m), 0.0))
        v = ops.matmul(ops.pinv(m, rcond=10.0 * k * float(np.finfo(dtype).eps)), norms)
        total = ops.sum(v)
        valid = ops.abs(total) > float(np.sqrt(np.finfo(dtype).eps))
        weights = ops.where(valid, v / _safe(total), ops.zeros_like(v))
        weights = ops.cast(weights, gradients.dtype)
        return ops.matmul(weights, gradients), weights, state


@register_gradient_method
class FairGrad(GradientMethod):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    alpha-fair allocation of the update among the tasks: weights ``w > 0`` with ``(G G^T) w = w^(-1/alpha)``,
    direction ``d = sum_k w_k g_k``. ``alpha = 1`` is proportional fairness, Nash-MTL's equation; alpha -> 0
    approaches the equal-weight sum, alpha -> inf max-min fairness (MGDA-like).

    Options: ``alpha`` (1.0, LibMTL's ``FairGrad_alpha`` default; the paper tunes it per benchmark);
    ``solver_iterations`` (25): damped Newton steps (no warm start, unlike Nash-MTL).

    Choices: LibMTL and the official code solve the equation by scipy ``least_squares`` (bounds ``w >= 0``, start
    ``1/K``) on the host; here ``w`` minimises the strictly convex ``w^T M w / 2 - sum_k phi(w_k)``
    (``phi' = w^(-1/alpha)``, so the stationarity condition is the equation) by fixed-count damped Newton on the
    device, on the Frobenius-normalised Gram matrix starting from ones and rescaled exactly
    (``w = x ||M||_F^(-alpha/(alpha+1))``). Where no positive solution exists, the small ridge of the normalised
    matrix keeps the weights finite. No state (as in the paper); no direction clipping; LibMTL does not support
    representation gradients for it: ``supports_rep_grad = False``.
    """

    name = "fairgrad"
    defaults = {"alpha": 1.0, "solver_iterations": 25}
    supports_rep_grad = False

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if not float(self.alpha) > 0:
            raise ValueError(f"FairGrad: alpha must be > 0, got {self.alpha}.")

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        m, scale = _normalised_gram(gradients)
        p = 1.0 / float(self.alpha)
        x = _solve_power_equation(m, p, ops.ones((m.shape[0],), dtype_name(m)), self.solver_iterations)
        weights = ops.where(scale > 0, x * ops.power(_safe(scale), -1.0 / (1.0 + p)), ops.zeros_like(x))
        weights = ops.cast(weights, gradients.dtype)
        return ops.matmul(weights, gradients), weights, state


class _DualConeMethod(GradientMethod):
    """Shared options of UPGrad and DualProj (torchjd's defaults)."""

    defaults = {"norm_eps": 1e-4, "reg_eps": 1e-4, "solver_iterations": 500}
    supports_rep_grad = False

    def _projected(self, gradients, u):
        return _dual_cone_weights(gradients, u, self.norm_eps, self.reg_eps, self.solver_iterations)


@register_gradient_method
class UPGrad(_DualConeMethod):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024; torchjd).

    Every task gradient is projected onto the dual cone of the gradients ``{x : G x >= 0}`` and the projections
    are averaged: ``d = (1/K) sum_i pi(g_i)``. By the paper's Prop. 1, ``pi(G^T u) = G^T v`` with
    ``v = argmin_{v >= u} v^T M v``; with the uniform preference vector, ``u = e_i / K`` for each i and the weights
    are ``w = sum_i v_i``. Hence ``d`` conflicts with no task (``g_k^T d >= 0``) and equals the mean gradient when
    no two gradients conflict.

    Options (torchjd's and LibMTL's defaults): ``norm_eps`` (1e-4): the Gram matrix is divided by its trace, or
    replaced by 0 when the trace (sum of squared gradient norms) is below ``norm_eps`` -- then ``v = u`` and UPGrad
    returns the mean gradient (torchjd's behaviour; set ``norm_eps=0`` to disable for tiny gradients);
    ``reg_eps`` (1e-4): added to the diagonal of the normalised Gram matrix (then the KKT conditions only give
    ``g_k^T d >= -reg_eps trace(M) w_k`` instead of ``>= 0``); ``solver_iterations`` (500): accelerated projected
    gradient steps, used only for K > 8. The preference vector is uniform (torchjd's default).

    Choices: the box-constrained QPs (quadprog on the host in torchjd/LibMTL) are solved exactly on the device for
    K <= 8 (see the module docstring). LibMTL does not support representation gradients for UPGrad:
    ``supports_rep_grad = False``.
    """

    name = "upgrad"

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        k = gradients.shape[-2]
        v = self._projected(gradients, np.eye(k) / k)
        weights = ops.cast(ops.sum(v, axis=0), gradients.dtype)
        return ops.matmul(weights, gradients), weights, state


@register_gradient_method
class DualProj(_DualConeMethod):
    """DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; torchjd's ``DualProj``).

    The mean gradient projected onto the dual cone of the gradients, ``d = pi((1/K) sum_k g_k)`` (the projection
    of GEM, Lopez-Paz & Ranzato 2017, Eq. 11), computed as ``d = G^T v`` with ``v = argmin_{v >= 1/K} v^T M v``:
    it conflicts with no task and equals the mean when the mean conflicts with none.

    Options as UPGrad (torchjd's defaults ``norm_eps = reg_eps = 1e-4``, uniform preference vector,
    ``solver_iterations`` for K > 8 only). Same on-device exact solver; ``supports_rep_grad = False`` like UPGrad.
    """

    name = "dualproj"

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        k = gradients.shape[-2]
        v = self._projected(gradients, np.full((1, k), 1.0 / k))
        weights = ops.cast(v[0], gradients.dtype)
        return ops.matmul(weights, gradients), weights, state
