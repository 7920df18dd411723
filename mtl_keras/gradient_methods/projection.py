"""Gradient-surgery weightings: the per-task gradients are projected, dropped or re-combined before summing.

Every method but GradDrop is a function of the Gram matrix ``M = G G^T``: ``d = sum_k w_k g_k`` with ``w`` from
``M`` (the P-sized work is two products), and ``w`` is returned. GradDrop works per coordinate and returns no
weights. Computed in the gradients' dtype; every division is guarded, so zero gradients give a finite direction.
"""

import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import (GradientMethod, dtype_name, gram, register_gradient_method, safe_divide,
                                             stateless_permutation, stateless_uniform)

# Aligned-MTL's official eigenvalue cut-off lambda > lambda_max K eps uses float32's eps (``torch.finfo()``) for any
# dtype; ConFIG's pseudo-inverse uses it too.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)
_TINY = 1e-30  # a floor that acts on degenerate inputs only


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


def pcgrad_weights(gram_matrix, orders):
    """PCGrad's weights ``w`` (K,): each ``g_i^PC`` is kept as coefficients ``c_i`` of the task gradients, projected
    in the order ``orders[i]``, with inner products ``g_i^PC . g_j = (M c_i)_j``; ``w = sum_i c_i``."""
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
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1), summed as the paper.

    Differences from LibMTL: ``j = i`` is skipped (the paper's ``g_j ~ B \\ g_i``); a zero ``g_j`` is never projected
    on (LibMTL adds 1e-8); representation gradients are allowed. Task orders: random per step and per task.
    """

    name = "pcgrad"

    def aggregate(self, gradients, losses, state, step, seed):
        gradients = _check_gradients(self, gradients)
        orders = _task_orders(self.num_tasks, seed, step)
        weights = pcgrad_weights(gram(gradients), orders)
        return ops.matmul(weights, gradients), weights, state


def gradvac_weights(gram_matrix, targets, orders, beta):
    """``(w (K,), new targets (K, K))``: as :func:`pcgrad_weights` with GradVac's adjustment (Eq. 5) towards the
    target cosine, and the targets' EMA of the cosine before the adjustment."""
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
    """Gradient Vaccine (Wang et al., ICLR 2021): PCGrad raised to EMA target cosines ``phi_hat`` (zero at first).

    ``beta = 0.01`` is the paper's (LibMTL: 0.5). One group for the whole gradient (LibMTL's ``whole_model``: a
    (K, P) matrix has no layers). Order and guards as :class:`PCGrad`; a zero ``sqrt(1 - phi_hat^2)`` gives no
    adjustment (LibMTL divides by 1e-8).
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
        return ops.matmul(weights, gradients), weights, {"phi_hat": ops.cast(new_phi_hat, phi_hat.dtype)}


@register_gradient_method
class GradDrop(GradientMethod):
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020, Alg. 1 with ``f`` the identity, as LibMTL).

    Differences from LibMTL: parameter gradients are allowed, and the sign purity is computed on the given
    coordinates (a flat (K, P) matrix has no inputs' signs nor batch to sum over); an all-zero coordinate gets
    ``P = 0.5`` (LibMTL adds 1e-7).
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


def _weighted_simplex_projection(z, scale):
    """``argmin_{w in simplex} sum_k (w_k - z_k)^2 / scale_k``: Duchi et al. (2008)'s sort-based projection,
    weighted."""
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
    """The simplex weights minimising CAGrad's dual ``g_w . g_0 + c ||g_0|| ||g_w||`` from ``M``.

    ``iterations`` steps of FISTA with function-value restart (O'Donoghue & Candes 2015) on the quadratic majoriser
    of the square root at the current point, in the diagonal metric ``M <= N diag(sum_j |C_ij|) N`` (``N`` the
    norms, ``C`` the cosines), so the step adapts to gradients of very different norms.
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
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, Alg. 1).

    ``c = 0.4`` is the paper's NYU-v2 / Cityscapes value (LibMTL: 0.5); ``rescale`` 1 divides by ``1 + c^2`` (the
    official code), 0 not at all, 2 by ``1 + c``. The dual is solved on the device (:func:`cagrad_inner_weights`)
    instead of scipy's SLSQP, without 1e-8 terms; ``||g_w|| = 0`` gives ``d = g_0``. Representation gradients are
    allowed (LibMTL refuses them).
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
        return ops.matmul(weights, gradients), weights, state


def _valid_eigen(m):
    """``(eigenvalues, eigenvectors, valid)`` of the symmetric ``m``, ``valid``: above the official cut-off."""
    eigenvalues, eigenvectors = ops.eigh(m)
    k = m.shape[0]
    tolerance = ops.max(eigenvalues) * k * _FLOAT32_EPS
    valid = ops.logical_and(eigenvalues > tolerance, eigenvalues > 0)
    return eigenvalues, eigenvectors, valid


def aligned_mtl_transform(gram_matrix, scale_mode="min"):
    """Aligned-MTL's ``B = sqrt(sigma) V Lambda^-1/2 V^T`` from ``M = V Lambda V^T`` (eigenvalues above the cut-off);
    ``sigma``: their smallest (``"min"``), lower median (``"median"``) or mean (``"rmse"``)."""
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
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023): the
    sum of the aligned gradients ``B G``, as the official code and LibMTL (torchjd: the mean).

    The eigenvalue cut-off and its float32 eps are the official code's; ``scale_mode`` ``"min"`` is the paper's.
    Zero gradients give ``B = 0`` (torchjd: the identity; the direction is zero either way).
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
        return ops.matmul(weights, gradients), weights, state


@register_gradient_method
class ConFIG(GradientMethod):
    """ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025):
    ``d = (sum_i g_i . e) e`` with ``e`` the unit of ``pinv(U) 1`` (``U`` the unit gradients), from the cosines.

    The pseudo-inverse drops eigenvalues of the cosine matrix at or below ``lambda_max K eps_float32`` (torch's
    ``pinv``: singular values), so nearly duplicate gradients count as duplicates; the official ``lstsq`` agrees
    for full rank. Zero gradients are left out (the official ``nan_to_num``).
    """

    name = "config"

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
        return ops.matmul(weights, gradients), weights, state
