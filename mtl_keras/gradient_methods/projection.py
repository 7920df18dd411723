"""Gradient-surgery weightings: the per-task gradients are projected, dropped or re-combined before summing.

Methods: ``pcgrad`` (projecting conflicting gradients), ``gradvac`` (gradient vaccine), ``graddrop`` (gradient
sign dropout), ``cagrad`` (conflict-averse gradient descent), ``aligned_mtl`` (independent component alignment) and
``config`` (conflict-free inverse gradients).

Every method except GradDrop is a function of the Gram matrix ``M = G G^T`` (K x K) only: the result is
``d = sum_k w_k g_k`` with weights computed from ``M``, so the work per step is one ``(K, P) x (P, K)`` product and
one ``(K,) x (K, P)`` product, whatever the solver does in between, and the weights are returned for logging.
GradDrop is per coordinate and returns no weights.

Randomness (PCGrad's and GradVac's task orders, GradDrop's thresholds) comes only from
:func:`~mtl_keras.gradient_methods.base.stateless_permutation` / ``stateless_uniform``: determined by
``(seed, step)``, identical on every replica and after a resume.

Numerics: everything is computed in the gradients' dtype; GradVac's state is kept in float32 and cast back. Every
division is guarded, so zero gradients give a finite (normally zero) direction.
"""

import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import (GradientMethod, dtype_name, gram, register_gradient_method, safe_divide,
                                             stateless_permutation, stateless_uniform)

# The eigenvalue cut-off of Aligned-MTL's official code (and LibMTL's): lambda > lambda_max * K * eps, with the eps of
# float32 (``torch.finfo()``) whatever the gradients' dtype; also used for ConFIG's pseudo-inverse (see there).
_FLOAT32_EPS = float(np.finfo(np.float32).eps)
# Floors that only act on degenerate inputs (a zero or an exactly collinear gradient).
_TINY = 1e-30


def _check_gradients(method, gradients):
    gradients = ops.convert_to_tensor(gradients)
    if len(gradients.shape) != 2 or gradients.shape[0] != method.num_tasks:
        raise ValueError(f"Weighting {method.name!r} was built for {method.num_tasks} tasks and takes (K, P) "
                         f"gradients, got shape {tuple(gradients.shape)}.")
    if dtype_name(gradients) not in ("float16", "bfloat16", "float32", "float64"):
        gradients = ops.cast(gradients, "float32")
    return gradients


def _task_orders(num_tasks, seed, step):
    """(K, K) int32: row i is a random permutation of the tasks, drawn with stream i (PCGrad / GradVac)."""
    return ops.stack([stateless_permutation(num_tasks, seed, step, stream=i) for i in range(num_tasks)])


def _combine(weights, gradients):
    return ops.matmul(weights, gradients)


# --------------------------------------------------------------------------------------------------- PCGrad
def pcgrad_weights(gram_matrix, orders):
    """PCGrad's direction as ``sum_k w_k g_k``: the weights ``w`` (K,) from the Gram matrix and the task orders.

    ``g_i^PC = sum_k c_ik g_k`` starts at ``e_i``; for each ``j != i`` in the order ``orders[i]``, if
    ``g_i^PC . g_j < 0`` then ``c_i -= (g_i^PC . g_j) / ||g_j||^2 e_j`` (the projection of ``g_i^PC`` onto the
    normal plane of the original ``g_j``). Inner products come from ``M``: ``g_i^PC . g_j = (M c_i)_j``. Returns
    ``sum_i c_i``.
    """
    m = ops.convert_to_tensor(gram_matrix)
    k = m.shape[0]
    dtype = m.dtype
    eye = ops.eye(k, dtype=dtype)
    diagonal = ops.diagonal(m)

    def per_task(i, total):
        order = ops.take(orders, i, axis=0)

        def project(position, c):
            j = ops.take(order, position)
            inner = ops.take(ops.matmul(m, c), j)
            norm_sq = ops.take(diagonal, j)
            conflict = ops.logical_and(ops.logical_and(inner < 0, j != i), norm_sq > 0)
            coefficient = ops.where(conflict, safe_divide(inner, norm_sq), ops.zeros_like(inner))
            return c - coefficient * ops.take(eye, j, axis=0)

        return total + ops.fori_loop(0, k, project, ops.take(eye, i, axis=0))

    return ops.fori_loop(0, k, per_task, ops.zeros((k,), dtype=dtype))


@register_gradient_method
class PCGrad(GradientMethod):
    """PCGrad: Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

    Algorithm 1: for every task i, ``g_i^PC = g_i``; for every other task j in a random order, if
    ``g_i^PC . g_j < 0``, ``g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 g_j`` (projection onto the normal plane of
    the original ``g_j``); the update is ``sum_i g_i^PC`` (the sum, as in the paper and LibMTL).

    Choices:
        * The projections are carried out on the coefficients of the task gradients, from the Gram matrix only
          (as torchjd does): the same result as projecting P-vectors; the loops work on K-vectors (O(K^4)) and
          the P-sized work is the Gram product and ``w^T G``. The weights ``w`` with ``d = sum_k w_k g_k`` are
          returned (LibMTL's ``batch_weight``).
        * The order of the other tasks is random per step and per task i (``stateless_permutation`` with stream i),
          deterministic in ``(seed, step)``.
        * ``j = i`` is skipped (the paper's ``g_j ~ B \\ g_i``); LibMTL's loop also visits ``j = i``, which only acts
          when ``g_i^PC . g_i < 0`` after earlier projections.
        * A zero ``g_j`` is never projected on (LibMTL adds 1e-8 to ``||g_j||^2`` instead).
        * ``supports_rep_grad``: the definition is on any gradient vectors, so it applies to representation
          gradients as well (LibMTL refuses ``rep_grad`` for PCGrad).
    """

    name = "pcgrad"
    defaults = {}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        orders = _task_orders(self.num_tasks, seed, step)
        weights = pcgrad_weights(gram(gradients), orders)
        return _combine(weights, gradients), weights, state


# --------------------------------------------------------------------------------------------------- GradVac
def gradvac_weights(gram_matrix, targets, orders, beta):
    """GradVac's direction ``sum_k w_k g_k`` and the new targets: ``(w (K,), targets (K, K))``.

    As :func:`pcgrad_weights`, with the adjustment of Wang et al. (2021), Eq. 5/Alg. 1: with
    ``phi = cos(g_i^PC, g_j)`` and the target ``t = targets[i, j]``, if ``phi < t``,
    ``g_i^PC += ||g_i^PC|| (t sqrt(1 - phi^2) - phi sqrt(1 - t^2)) / (||g_j|| sqrt(1 - t^2)) g_j``; then
    ``targets[i, j] <- (1 - beta) targets[i, j] + beta phi`` (with the cosine before the adjustment).
    """
    m = ops.convert_to_tensor(gram_matrix)
    k = m.shape[0]
    dtype = m.dtype
    eye = ops.eye(k, dtype=dtype)
    diagonal = ops.diagonal(m)
    norms = ops.sqrt(ops.maximum(diagonal, 0.0))
    beta = float(beta)

    def per_task(i, carry):
        total, phi_hat = carry
        order = ops.take(orders, i, axis=0)
        e_i = ops.take(eye, i, axis=0)

        def vaccinate(position, inner_carry):
            c, phi_hat = inner_carry
            j = ops.take(order, position)
            e_j = ops.take(eye, j, axis=0)
            active = j != i
            mc = ops.matmul(m, c)
            pc_norm = ops.sqrt(ops.maximum(ops.sum(c * mc), 0.0))
            g_norm = ops.take(norms, j)
            cosine = ops.clip(safe_divide(ops.take(mc, j), pc_norm * g_norm), -1.0, 1.0)
            target = ops.sum(e_i * ops.matmul(phi_hat, e_j))
            sin_target = ops.sqrt(ops.maximum(1.0 - target * target, 0.0))
            sin_cosine = ops.sqrt(ops.maximum(1.0 - cosine * cosine, 0.0))
            coefficient = safe_divide(pc_norm * (target * sin_cosine - cosine * sin_target), g_norm * sin_target)
            adjust = ops.logical_and(ops.logical_and(active, cosine < target), g_norm > 0)
            c = c + ops.where(adjust, coefficient, ops.zeros_like(coefficient)) * e_j
            update = ops.where(active, beta * (cosine - target), ops.zeros_like(target))
            phi_hat = phi_hat + update * ops.outer(e_i, e_j)
            return c, phi_hat

        c, phi_hat = ops.fori_loop(0, k, vaccinate, (e_i, phi_hat))
        return total + c, phi_hat

    return ops.fori_loop(0, k, per_task, (ops.zeros((k,), dtype=dtype), ops.cast(targets, dtype)))


@register_gradient_method
class GradVac(GradientMethod):
    """Gradient Vaccine: Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021.

    PCGrad generalised to a target similarity: for every task i and every other task j (random order, as PCGrad),
    with ``phi_ij = cos(g_i^PC, g_j)`` and the EMA target ``phi_hat_ij``, if ``phi_ij < phi_hat_ij`` then
    ``g_i^PC`` gets the multiple of ``g_j`` that raises the cosine to exactly ``phi_hat_ij`` (Eq. 5); then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij``. The update is ``sum_i g_i^PC``; the weights of
    ``d = sum_k w_k g_k`` are returned. State ``phi_hat`` (K, K), zero at the start (the paper's initialisation,
    so the first step adjusts exactly the conflicting pairs, like PCGrad with a rescaled projection).

    Choices:
        * ``beta = 0.01``, the paper's value (Sec. 3/4: "beta = 1e-2"); LibMTL's default is 0.5 (``GradVac_beta``),
          pass ``beta=0.5`` to match it. The paper's value is kept per the project's rule (paper defaults first);
          with it the targets follow the cosine over about 100 steps, as in the paper's long NMT runs.
        * One group for the whole gradient (LibMTL's ``GradVac_group_type=0``, "whole_model"); the paper's per-layer
          or per-matrix groups would need the parameter layout, which a (K, P) matrix does not carry.
        * Order, ``j != i``, Gram-matrix arithmetic and zero-gradient guards as :class:`PCGrad`; the target's
          ``sqrt(1 - phi_hat^2)`` is never zero in practice (``|phi_hat| = 1`` needs identical directions, which are
          then never adjusted) and a zero one gives no adjustment instead of LibMTL's division by 1e-8.
        * ``supports_rep_grad = False``, as LibMTL: the targets are similarities of the parameter gradients.
    """

    name = "gradvac"
    defaults = {"beta": 0.01}
    supports_rep_grad = False

    def initial_state(self, num_params):
        return {"phi_hat": np.zeros((self.num_tasks, self.num_tasks), np.float32)}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        phi_hat = ops.convert_to_tensor(state["phi_hat"])
        orders = _task_orders(self.num_tasks, seed, step)
        weights, new_phi_hat = gradvac_weights(gram(gradients), phi_hat, orders, self.beta)
        return _combine(weights, gradients), weights, {"phi_hat": ops.cast(new_phi_hat, phi_hat.dtype)}


# --------------------------------------------------------------------------------------------------- GradDrop
@register_gradient_method
class GradDrop(GradientMethod):
    """GradDrop: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020.

    Per coordinate: the positive sign purity ``P = 0.5 (1 + sum_i g_i / sum_i |g_i|)``, a uniform ``U``; task i keeps
    its coordinate if it is positive and ``P > U``, or negative and ``P < U`` (mask ``M_i``); the update is
    ``sum_i (leak + (1 - leak) M_i) g_i`` (Alg. 1 with ``f`` the identity and one leak for every task, as LibMTL).

    Choices:
        * Works on whatever (K, P) gradients it gets, per coordinate: parameter gradients (LibMTL refuses these)
          as well as representation gradients. The paper (and LibMTL with ``rep_grad``) first multiplies
          activation gradients by the sign of the inputs and sums them over the batch before computing ``P``; a
          flat ``(K, P)`` matrix carries neither, so ``P`` is computed on the given coordinates as they are.
        * ``U`` is ``stateless_uniform`` (float32, cast): deterministic in ``(seed, step)``.
        * A coordinate that is zero for every task gets ``P = 0.5`` (LibMTL adds 1e-7 to the denominator); its
          output is zero either way.
        * The sum of the masked gradients, as LibMTL and the paper (the CAGrad authors' re-implementation takes
          the mean). No weights are returned (the direction is not a combination of whole task gradients).
    """

    name = "graddrop"
    defaults = {"leak": 0.0}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        dtype = dtype_name(gradients)
        total = ops.sum(gradients, axis=0)
        purity = 0.5 * (1.0 + safe_divide(total, ops.sum(ops.abs(gradients), axis=0)))
        uniform = ops.cast(stateless_uniform((ops.shape(gradients)[-1],), seed, step, stream=0), dtype)
        keep = ops.logical_or(ops.logical_and(purity > uniform, gradients > 0),
                              ops.logical_and(purity < uniform, gradients < 0))
        leak = float(self.leak)
        mask = leak + (1.0 - leak) * ops.cast(keep, dtype)
        return ops.sum(mask * gradients, axis=0), None, state


# --------------------------------------------------------------------------------------------------- CAGrad
def _weighted_simplex_projection(z, scale):
    """``argmin_{w in simplex} sum_k (w_k - z_k)^2 / scale_k`` (the projection in the metric ``diag(1/scale)``).

    ``w_k = scale_k max(z_k / scale_k - theta, 0)`` with ``theta`` such that ``sum w = 1``: the sort-based
    algorithm of Duchi et al. (2008) with weights.
    """
    k = z.shape[0]
    y = z / scale
    order = ops.flip(ops.argsort(y), axis=0)
    y_sorted = ops.take(y, order)
    scale_sorted = ops.take(scale, order)
    thetas = (ops.cumsum(scale_sorted * y_sorted) - 1.0) / ops.cumsum(scale_sorted)
    index = ops.arange(k, dtype="int32")
    last = ops.max(ops.where(y_sorted - thetas > 0, index, ops.zeros_like(index)))
    theta = ops.take(thetas, last)
    return scale * ops.maximum(y - theta, 0.0)


def cagrad_inner_weights(gram_matrix, c, iterations=250):
    """The simplex weights ``w`` minimising ``F(w) = g_w . g_0 + c ||g_0|| ||g_w||`` (CAGrad's dual problem).

    ``g_w = sum_k w_k g_k``, ``g_0`` the mean gradient; with ``M = G G^T``: ``g_w . g_0 = w^T M 1 / K``,
    ``||g_w||^2 = w^T M w``, ``||g_0||^2 = mean(M)``. ``F`` is convex; it is minimised by ``iterations`` steps of
    accelerated projected gradient (FISTA with function-value restart, O'Donoghue & Candes 2015) where each step
    minimises the quadratic majoriser of ``F`` at the current point (``sqrt`` is concave, so
    ``||g_w|| <= r + (||g_w||^2 - r^2) / (2 r)`` with ``r = ||g_y||``), with the diagonal bound
    ``M <= N diag(sum_j |C_ij|) N`` (``N = diag(||g_k||)``, ``C`` the cosines) as metric, so the step adapts to
    the curvature ``c ||g_0|| M / r`` and to gradients of very different norms. No early exit (a fixed trip count
    for compilation).
    """
    m = ops.convert_to_tensor(gram_matrix)
    k = m.shape[0]
    dtype = m.dtype
    uniform = ops.full((k,), 1.0 / k, dtype=dtype)
    linear = ops.matmul(m, uniform)
    radius = float(c) * ops.sqrt(ops.maximum(ops.mean(m), 0.0))
    radius_safe = ops.where(radius > 0, radius, ops.ones_like(radius))
    norms = ops.sqrt(ops.maximum(ops.diagonal(m), 0.0))
    cosines = safe_divide(m, ops.outer(norms, norms))
    curvature = norms * norms * ops.sum(ops.abs(cosines), axis=1)
    curvature = ops.maximum(curvature, 1e-12 * ops.max(curvature) + _TINY)

    def objective(w):
        return ops.sum(w * linear) + radius * ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(m, w)), 0.0))

    def body(_, carry):
        w, y, t, f_w = carry
        my = ops.matmul(m, y)
        r = ops.sqrt(ops.maximum(ops.sum(y * my), 0.0))
        r = ops.maximum(r, 1e-12 * ops.sqrt(ops.max(curvature)) + _TINY)
        gradient = linear + radius * my / r
        step = r / (radius_safe * curvature)
        w_new = _weighted_simplex_projection(y - step * gradient, step)
        f_new = objective(w_new)
        t_new = 0.5 * (1.0 + ops.sqrt(1.0 + 4.0 * t * t))
        restart = f_new > f_w
        y_new = ops.where(restart, w_new, w_new + (t - 1.0) / t_new * (w_new - w))
        t_new = ops.where(restart, ops.ones_like(t_new), t_new)
        return w_new, y_new, t_new, f_new

    one = ops.ones((), dtype=dtype)
    w, _, _, _ = ops.fori_loop(0, int(iterations), body, (uniform, uniform, one, objective(uniform)))
    return w


@register_gradient_method
class CAGrad(GradientMethod):
    """CAGrad: Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.

    The update maximises the worst task's improvement within a ball around the mean gradient ``g_0``:
    ``max_d min_i g_i . d`` s.t. ``||d - g_0|| <= c ||g_0||``. Through its dual: ``w`` minimises
    ``g_w . g_0 + sqrt(phi) ||g_w||`` on the simplex, ``phi = c^2 ||g_0||^2``, and
    ``d = g_0 + sqrt(phi) / ||g_w|| g_w`` (Alg. 1), here divided by ``1 + c^2`` (``rescale=1``).

    Choices:
        * ``c = 0.4``: the value of the paper's NYU-v2 and Cityscapes experiments (the official ``run.sh``:
          ``--alpha 0.4``); LibMTL's default ``calpha`` is 0.5 (the official scripts' argparse default).
        * ``rescale=1``: ``d / (1 + c^2)``, as the official code (and LibMTL's default); ``0``: no rescaling (the
          paper's Alg. 1 as written), ``2``: ``d / (1 + c)``.
        * The inner problem is solved on the device by ``solver_iterations`` steps of a preconditioned accelerated
          projected-gradient method on the K-simplex from the Gram matrix only (:func:`cagrad_inner_weights`),
          instead of the official scipy SLSQP (whose own tolerance is about 1e-6 on the objective); no ``1e-8``
          terms inside the square roots.
        * ``||g_w|| = 0`` (the mean gradient or the min-norm point is zero) gives ``d = g_0`` (rescaled), where
          LibMTL divides by ``1e-8``; zero gradients give a zero direction.
        * Returns the weights ``(1/K + sqrt(phi) w / ||g_w||) / (1 + c^2)`` of ``d = sum_k weights_k g_k``.
        * ``supports_rep_grad``: a function of the gradient vectors only (LibMTL refuses ``rep_grad`` for CAGrad).
    """

    name = "cagrad"
    defaults = {"c": 0.4, "rescale": 1, "solver_iterations": 250}

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if self.rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad's rescale must be 0, 1 or 2, got {self.rescale!r}.")
        if self.c < 0:
            raise ValueError(f"CAGrad's c must be non-negative, got {self.c!r}.")

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        m = gram(gradients)
        k = self.num_tasks
        w = cagrad_inner_weights(m, self.c, self.solver_iterations)
        radius = float(self.c) * ops.sqrt(ops.maximum(ops.mean(m), 0.0))
        gw_norm = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(m, w)), 0.0))
        lam = safe_divide(radius, gw_norm)
        weights = 1.0 / k + lam * w
        if self.rescale == 1:
            weights = weights / (1.0 + self.c ** 2)
        elif self.rescale == 2:
            weights = weights / (1.0 + self.c)
        return _combine(weights, gradients), weights, state


# --------------------------------------------------------------------------------------------------- Aligned-MTL
def _valid_eigen(m):
    """``(eigenvalues, eigenvectors, valid)`` of the symmetric ``m``, ``valid``: above the official cut-off."""
    eigenvalues, eigenvectors = ops.eigh(m)
    k = m.shape[0]
    tolerance = ops.max(eigenvalues) * k * _FLOAT32_EPS
    valid = ops.logical_and(eigenvalues > tolerance, eigenvalues > 0)
    return eigenvalues, eigenvectors, valid


def aligned_mtl_transform(gram_matrix, scale_mode="min"):
    """Aligned-MTL's balance transformation ``B = sqrt(sigma) V Lambda^-1/2 V^T`` (K x K, symmetric).

    ``M = V Lambda V^T``; only eigenvalues above ``lambda_max K eps_float32`` count (the rank); ``sigma`` is the
    smallest of them (``"min"``), their lower median (``"median"``) or their mean (``"rmse"``). The aligned
    gradients ``B G`` have the Gram matrix ``sigma`` times the projector on the valid eigenvectors.
    """
    m = ops.convert_to_tensor(gram_matrix)
    k = m.shape[0]
    eigenvalues, eigenvectors, valid = _valid_eigen(m)
    zeros = ops.zeros_like(eigenvalues)
    rank = ops.sum(ops.cast(valid, "int32"))
    if scale_mode == "min":
        scale = ops.min(ops.where(valid, eigenvalues, ops.full_like(eigenvalues, np.inf)))
    elif scale_mode == "median":  # torch.median: the lower median
        ascending = ops.sort(ops.where(valid, eigenvalues, zeros))
        index = ops.maximum(k - rank + (rank - 1) // 2, 0)
        scale = ops.take(ascending, ops.minimum(index, k - 1))
    elif scale_mode == "rmse":  # the mean eigenvalue, the official code's name
        scale = safe_divide(ops.sum(ops.where(valid, eigenvalues, zeros)), ops.cast(rank, m.dtype))
    else:
        raise ValueError(f"Aligned-MTL's scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
    scale = ops.where(rank > 0, scale, ops.zeros_like(scale))
    inverse_sqrt = ops.where(valid, 1.0 / ops.sqrt(ops.where(valid, eigenvalues, ops.ones_like(eigenvalues))), zeros)
    return ops.sqrt(scale) * ops.matmul(eigenvectors * inverse_sqrt, ops.transpose(eigenvectors))


@register_gradient_method
class AlignedMTL(GradientMethod):
    """Aligned-MTL: Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023.

    The gradient system ``G`` (K x P) is replaced by the closest one with condition number 1 (orthogonal rows of
    equal norm, Procrustes): with ``G G^T = V Lambda V^T``, ``B = sqrt(lambda_min) V Lambda^-1/2 V^T`` and the
    aligned gradients ``B G = sqrt(lambda_min) V U^T`` (``U`` the right singular vectors), whose rows are
    orthogonal with norm ``sqrt(lambda_min)``. The update is ``sum_i (B G)_i = (B 1)^T G``; the weights ``B 1``
    are returned.

    Choices:
        * Task weights ``w = 1`` (the sum of the aligned gradients), as the official code
          (``grads[0].sum(-1)``) and LibMTL (``B.sum(0)``); torchjd uses ``1/K`` (the same direction, K times
          shorter). The paper's Alg. 1 takes the pre-defined task weights, equal in its experiments.
        * Eigenvalues at or below ``lambda_max K eps_float32`` are dropped (the rank), as the official code; the
          eps is float32's also for float64 gradients (the official ``torch.finfo()``), so nearly dependent
          gradients do not make ``lambda_min`` vanish.
        * ``scale_mode``: ``"min"`` (the paper), ``"median"`` or ``"rmse"`` (mean eigenvalue), the official code's
          options. Zero gradients give ``B = 0`` (torchjd: the identity; the direction is zero either way).
    """

    name = "aligned_mtl"
    defaults = {"scale_mode": "min"}

    def __init__(self, num_tasks, **options):
        super().__init__(num_tasks, **options)
        if self.scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"Aligned-MTL's scale_mode must be 'min', 'median' or 'rmse', got {self.scale_mode!r}.")

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        transform = aligned_mtl_transform(gram(gradients), self.scale_mode)
        weights = ops.sum(transform, axis=1)
        return _combine(weights, gradients), weights, state


# --------------------------------------------------------------------------------------------------- ConFIG
@register_gradient_method
class ConFIG(GradientMethod):
    """ConFIG: Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025.

    With the unit gradients ``U`` (rows ``g_i / ||g_i||``): the direction ``g_c = pinv(U) 1_K``, the minimum-norm
    vector with ``u_i . g_c = 1`` for every task (the same cosine with every gradient, Eq. 2), normalised, times
    the length ``sum_i g_i . unit(g_c)`` (the official ``ProjectionLength``): ``d = (sum_i g_i . e) e``,
    ``e = unit(g_c)``.

    Choices:
        * From the Gram matrix: ``g_c = U^T a`` with ``a = C^+ 1`` (``C = U U^T`` the cosines, ``C^+`` by ``ops.eigh``),
          ``||g_c||^2 = a^T C a``, ``g_i . g_c = ||g_i|| (C a)_i``; the weights ``length a_k / (||g_k|| ||g_c||)`` of
          ``d = sum_k w_k g_k`` are returned.
        * The pseudo-inverse drops eigenvalues of ``C`` at or below ``lambda_max K eps_float32`` (relative singular
          values below about ``sqrt(K eps)``; torch's ``pinv``, used by torchjd, cuts singular values at
          ``K eps sigma_max``), so nearly duplicate gradients are treated as duplicates instead of amplifying
          rounding noise. The official default ``lstsq`` and ``pinv`` agree with this for full-rank ``U``.
        * Equal weights (the official ``EqualWeight``); no hyper-parameters. Zero gradients are left out (their
          unit vector is zero, as the official ``nan_to_num``); all zero gives a zero direction.
    """

    name = "config"
    defaults = {}

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        m = gram(gradients)
        norms = ops.sqrt(ops.maximum(ops.diagonal(m), 0.0))
        cosines = safe_divide(m, ops.outer(norms, norms))
        eigenvalues, eigenvectors, valid = _valid_eigen(cosines)
        inverse = ops.where(valid, 1.0 / ops.where(valid, eigenvalues, ops.ones_like(eigenvalues)),
                            ops.zeros_like(eigenvalues))
        ones = ops.ones_like(norms)
        a = ops.matmul(eigenvectors, inverse * ops.matmul(ops.transpose(eigenvectors), ones))
        ca = ops.matmul(cosines, a)
        direction_norm = ops.sqrt(ops.maximum(ops.sum(a * ca), 0.0))
        length = safe_divide(ops.sum(norms * ca), direction_norm)
        weights = safe_divide(length * a, norms * direction_norm)
        return _combine(weights, gradients), weights, state
