"""Gradient methods that solve a small K x K problem on the Gram matrix per step, on the device with a fixed cost
(the references call scipy, cvxpy/ECOS or quadprog on the host).

* Quadratic programs (MGDA's min-norm point, UPGrad's and DualProj's dual-cone projections) are solved exactly for
  ``K <= 8`` by enumerating the ``2^K`` active sets (one linear system each; the best feasible candidate is the
  optimum). For larger K, first-order iterations warm-start 3K steps of a primal active-set method.
* Nash-MTL's and FairGrad's ``M w = w^(-1/alpha)`` is the stationarity condition of a strictly convex function on
  ``w > 0``, minimised by damped Newton steps inside the positive orthant.

The K x K problems run in float64 for float64 gradients, else float32; every linear system carries a tiny ridge
(``_RIDGE``) so that dependent gradients never make it singular (TensorFlow raises on singular systems).
"""

import itertools

import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import (GradientMethod, dtype_name, gram, min_norm_weights,
                                             register_gradient_method)

_EXACT_MAX_TASKS = 8  # up to 2^8 = 256 small systems
# relative to the normalised Gram matrix: keeps the systems non-singular and the iterates bounded
_RIDGE = {"float32": 1e-5, "float64": 1e-12}
_LINE_SEARCH_STEPS = 20  # Newton's line search tries t_max 2^-j, j < 20, and 0


def _solver_gram(gradients):
    """``G G^T`` in the dtype of the K x K problems: float64 for float64 gradients, else float32."""
    return gram(ops.cast(gradients, "float64" if dtype_name(gradients) == "float64" else "float32"))


def _combined(weights, gradients, state):
    """``(sum_k w_k g_k, w, state)`` with ``w`` in the gradients' dtype."""
    weights = ops.cast(weights, gradients.dtype)
    return ops.matmul(weights, gradients), weights, state


def _safe(x):
    """``x`` where non-zero, else 1 (a divisor)."""
    return ops.where(ops.equal(x, 0), ops.ones_like(x), x)


def _solve(a, b):
    """``a^-1 b`` for (batches of) ``a`` (..., K, K) and ``b`` (..., K), as a column: backends read (..., K) apart."""
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
    """Fixed-count primal active-set steps (Wolfe's min-norm point / Lawson-Hanson) for a convex QP with bounds
    ``x >= lower``, from feasible rows ``x`` (B, K). ``candidates_on(free)``: the stationary points with the other
    coordinates at their bound; ``multipliers(x)``: the bounds' KKT multipliers. Optimal once the support is found.
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


def _simplex_candidates(m, masks):
    """For each support (C, K): the minimiser of ``w^T m w`` over ``sum w = 1``, ``w = 0`` off it (KKT system)."""
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
    """Simplex weights minimising ``w^T m w`` (MGDA's min-norm point)."""
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


def _box_candidates(m, u, masks):
    """(B, C, K): the minimiser of ``v^T m v`` with ``v_i = u_i`` (rows of ``u`` (B, K)) off each free set of
    ``masks`` ((C, K) or (B, C, K))."""
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
    """``argmin_{v >= u} v^T m v`` for every row of ``u`` (B, K): the projection of ``G^T u`` onto the dual cone of
    the gradients is ``G^T v`` (Quinton & Rey 2024, Prop. 1). For K > 8: FISTA with restart, then active-set steps.
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
    m = _solver_gram(gradients)
    dtype = dtype_name(m)
    k = m.shape[0]
    trace = _trace(m)
    # torchjd: G / trace(G), or 0 when trace(G) < norm_eps; then + reg_eps I (floored at _RIDGE: never singular).
    m = ops.where((trace < norm_eps) | ops.equal(trace, 0), ops.zeros_like(m), m / _safe(trace))
    m = m + max(float(reg_eps), _RIDGE[dtype]) * ops.eye(k, dtype=dtype)
    return _box_qp(m, ops.cast(u, dtype), iterations)


def _solve_power_equation(m, p, x0, iterations):
    """``x > 0`` with ``m x = x^(-p)`` (p > 0), from ``x0 > 0``: damped Newton on the strictly convex
    ``x^T m x / 2 - sum_i phi(x_i)``, ``phi' = x^(-p)``, each step capped at 0.99 of the way to ``x = 0`` and
    line-searched on the objective."""
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
        # near the solution (Newton decrement^2 < 1e-3) f's values no longer resolve the decrease: full step
        index = ops.where(-ops.sum(gradient * dx) < 1e-3, 0, ops.argmin(values))
        return ops.take(trial, index, axis=0)

    return ops.fori_loop(0, int(iterations), body, x0)


def _normalised_gram(gradients):
    """``(M / ||M||_F + ridge I, ||M||_F)``: Nash-MTL's normalisation (the solution is rescaled exactly)."""
    m = _solver_gram(gradients)
    scale = ops.sqrt(ops.sum(m * m))
    k = m.shape[0]
    return m / _safe(scale) + _RIDGE[dtype_name(m)] * ops.eye(k, dtype=m.dtype), scale


@register_gradient_method
class MGDA(GradientMethod):
    """MGDA / MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018): the
    min-norm point of the convex hull of the gradients normalised by ``mgda_gn`` (LibMTL's options); MGDA-UB is the
    same on representation gradients.

    The weights are applied to the raw gradients, as the official code and LibMTL's ``rep_grad`` path (LibMTL's
    parameter path sums the normalised ones; equal for the default "none"). Exact for K <= 8 instead of the official
    Frank-Wolfe with early stop; a zero normaliser counts as 1 (the references divide by zero).
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
        m = _solver_gram(gradients)
        norms = ops.sqrt(ops.maximum(ops.diagonal(m), 0.0))
        if self.mgda_gn == "none":
            normaliser = ops.ones_like(norms)
        elif self.mgda_gn == "l2":
            normaliser = norms
        else:
            normaliser = ops.cast(losses, m.dtype) * (norms if self.mgda_gn == "loss+" else 1.0)
        normaliser = _safe(normaliser)
        m = m / (normaliser[:, None] * normaliser[None, :])
        return _combined(_min_norm_point(m, self.solver_iterations), gradients, state)


@register_gradient_method
class NashMTL(GradientMethod):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): ``M alpha = 1 / alpha``, then
    the direction clipped to ``max_norm`` as torch's ``clip_grad_norm_`` (the official code and LibMTL).

    LibMTL's options and warm start; the equation is solved by damped Newton on the device (LibMTL: cvxpy/ECOS on
    the host). Where no positive solution exists (e.g. ``g_2 = -g_1``) the ridge bounds the weights.
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
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): equal projections on every unit
    gradient, in the Gram form ``w = M^+ n / (1^T M^+ n)``, ``n_k = ||g_k||`` (the pseudo-inverse covers dependent
    gradients). No such direction (e.g. ``g_2 = -g_1``) gives zero (torchjd; LibMTL: inf/NaN). IMTL-L, the
    learnable loss scales LibMTL's ``IMTL`` adds, is a loss weighting, not part of this method.
    """

    name = "imtl"

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        m = _solver_gram(gradients)
        dtype = dtype_name(m)
        k = m.shape[0]
        m = m / _safe(_trace(m))
        norms = ops.sqrt(ops.maximum(ops.diagonal(m), 0.0))
        v = ops.matmul(ops.pinv(m, rcond=10.0 * k * float(np.finfo(dtype).eps)), norms)
        total = ops.sum(v)
        valid = ops.abs(total) > float(np.sqrt(np.finfo(dtype).eps))
        weights = ops.where(valid, v / _safe(total), ops.zeros_like(v))
        return _combined(weights, gradients, state)


@register_gradient_method
class FairGrad(GradientMethod):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024): alpha-fair weights with
    ``M w = w^(-1/alpha)`` (``alpha = 1``: Nash-MTL's equation), LibMTL's ``alpha = 1``.

    Solved by damped Newton on the device from ones (LibMTL and the official code: scipy ``least_squares`` from
    ``1/K``); the ridge keeps the weights finite where no positive solution exists.
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
        return _combined(weights, gradients, state)


class _DualConeMethod(GradientMethod):
    """Shared options of UPGrad and DualProj (torchjd's defaults)."""

    defaults = {"norm_eps": 1e-4, "reg_eps": 1e-4, "solver_iterations": 500}
    supports_rep_grad = False

    def _projected(self, gradients, u):
        return _dual_cone_weights(gradients, u, self.norm_eps, self.reg_eps, self.solver_iterations)


@register_gradient_method
class UPGrad(_DualConeMethod):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232; torchjd): the
    mean of the task gradients' projections onto the dual cone ``{x : G x >= 0}``, uniform preferences.

    torchjd's ``norm_eps`` (below it the Gram matrix counts as 0: the mean gradient) and ``reg_eps``; the QPs are
    solved exactly on the device for K <= 8 (torchjd and LibMTL: quadprog on the host).
    """

    name = "upgrad"

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        k = gradients.shape[-2]
        v = self._projected(gradients, np.eye(k) / k)
        return _combined(ops.sum(v, axis=0), gradients, state)


@register_gradient_method
class DualProj(_DualConeMethod):
    """DualProj (Quinton & Rey 2024; torchjd): the mean gradient projected onto the dual cone (GEM's projection,
    Lopez-Paz & Ranzato 2017). Options and solver as :class:`UPGrad`."""

    name = "dualproj"

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = ops.convert_to_tensor(gradients)
        k = gradients.shape[-2]
        v = self._projected(gradients, np.full((1, k), 1.0 / k))
        return _combined(v[0], gradients, state)
