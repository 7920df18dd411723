"""Stateful and stochastic gradient weightings: GradNorm, MoCo, MoDo, SDMGrad, DB-MTL and ExcessMTL.

Each method reads the per-task gradients and keeps state between steps (GradNorm's weights and initial losses,
MoCo's tracked gradients, MoDo's and SDMGrad's simplex weights, DB-MTL's gradient averages, ExcessMTL's squared
gradient sums). The state is a dict of tensors that ``aggregate`` returns updated, with the keys, shapes and dtypes
of ``initial_state`` (float32; the arithmetic runs in the dtype of the gradients and the result is cast back).

Step counts: ``step`` is the number of updates made before this one (0 at the first step); the decaying step sizes
of MoCo and DB-MTL use ``t = step + 1``, LibMTL's call counter. GradNorm records ``L(0)`` at ``step == 0`` and
ExcessMTL its baseline excess risks during its warm-up steps; both also record when their state has not recorded
anything yet (all zeros), so a fresh state initialises when the caller starts counting elsewhere.

MoDo and SDMGrad need independent gradient estimates (``gradient_samples = 3``): the trainer splits the batch into
three parts and passes ``(3, K, P)``. Given a ``(K, P)`` matrix instead, they use it for all three samples, i.e. the
deterministic (full-batch) form of the algorithm.
"""

import numpy as np
from keras import ops

from mtl_keras.gradient_methods.base import (GradientMethod, dtype_name, project_to_simplex, register_gradient_method,
                                             safe_divide)


# ------------------------------------------------------------------------------------------------- helpers
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


# ------------------------------------------------------------------------------------------------- GradNorm
@register_gradient_method
class GradNorm(GradientMethod):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018).

    Task weights ``w`` (state, initially 1, summing to K) are trained so that the weighted gradient norms
    ``G_i = ||w_i g_i||`` approach the common target ``mean(G) * r_i^alpha``, where ``r_i = L~_i / mean(L~)`` is the
    relative inverse training rate and ``L~_i = L_i(t) / L_i(0)`` the loss ratio to the initial loss (``L(0)``:
    state, recorded at the first step). With the target held constant (as the paper prescribes) the gradient of the
    GradNorm loss ``L_grad = sum_i |G_i - mean(G) r_i^alpha|`` with respect to ``w_i`` is
    ``sign(G_i - target_i) * ||g_i||``. Each step (paper, Algorithm 1):

    * direction ``d = sum_i w_i(t) g_i`` with the weights before the update (returned as the weights);
    * ``w(t+1) = w(t) - weight_learning_rate * dL_grad/dw``, then renormalised to ``sum_i w_i = K``.

    Defaults: ``alpha = 1.5`` (LibMTL's default; the paper tunes alpha per data set),
    ``weight_learning_rate = 0.025`` (ours: the paper has no separate rate for ``w``). Choices and differences:

    * The paper trains ``w`` with the network's optimiser; we take a plain SGD step with ``weight_learning_rate`` on
      ``dL_grad/dw`` divided by the mean gradient norm ``mean_j ||g_j||``. Undivided, the step is in units of
      gradient norms: on the slim model (norms ~10) a rate of 0.025 drove a task's weight to 0 within 6 steps; divided,
      a weight moves by about the rate per step whatever the model's gradient scale (as the network's Adam would
      move it in the paper). Weights that the step would make negative are clipped to 0 before the renormalisation (the paper does
      not say; a weight at 0 has ``G_i = 0`` below its target and grows again at the next step).
    * The norms are taken over the gradients we are given (all shared parameters, as LibMTL does, or the shared
      representation with ``rep_grad``; the paper uses the last shared layer).
    * LibMTL parametrises ``w = K softmax(logits)``, trains the logits with the model's optimiser and uses equal
      weights during the first epoch (``L(0)`` = the first epoch's mean loss); we follow the paper: ``L(0)`` is the
      loss at the first step, and the weights adapt from the first step.
    * Guards: a task whose ``L(0)`` is 0 gets ``L~_i = 1``; negative loss ratios count as 0.
    """

    name = "gradnorm"
    defaults = {"alpha": 1.5, "weight_learning_rate": 0.025}
    needs_losses = True
    supports_rep_grad = True  # the state is per task, so the representation's gradients work as well (LibMTL too)

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
        # in units of the weights: divided by the mean gradient norm (see the docstring)
        weight_gradient = ops.sign(weighted_norms - target) * safe_divide(norms, ops.mean(norms))

        new_weights = ops.maximum(weights - float(self.weight_learning_rate) * weight_gradient, 0.0)
        total = ops.sum(new_weights)
        new_weights = ops.where(total > 0, new_weights * (k / ops.where(total > 0, total, 1.0)),
                                ops.ones_like(new_weights))
        new_state = _cast_back({"weights": new_weights, "initial_losses": initial_losses}, state)
        return direction, weights, new_state


# ------------------------------------------------------------------------------------------------- MoCo
@register_gradient_method
class MoCo(GradientMethod):
    """MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, "Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach", ICLR 2023).

    Corrects the bias of stochastic MGDA by tracking the task gradients. With ``t = step + 1``,
    ``beta_t = beta / t^beta_sigma`` and ``gamma_t = gamma / t^gamma_sigma`` (paper, Algorithm 1):

    * tracked gradients (state ``y``, (K, P), initially 0): ``y <- y - beta_t (y - g)``;
    * simplex weights (state ``lambda``, initially uniform):
      ``lambda <- Proj_simplex(lambda - gamma_t (y y^T + rho I) lambda)`` (with the new ``y``);
    * direction ``d = y^T lambda`` (a combination of the tracked, not the current, gradients, so no weights are
      returned; ``lambda`` is in the state).

    Defaults from LibMTL (its implementation follows the authors' code): ``beta = 0.5``, ``beta_sigma = 0.5``,
    ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0`` (the paper's analysis prescribes decaying step sizes; its
    experiments tune them). Differences:

    * LibMTL (from the authors' code) replaces the simplex projection by ``softmax(lambda - gamma_t (...) lambda)``
      and tracks ``g_i / ||g_i|| * L_i`` instead of ``g_i``. Both are options: ``lambda_update="softmax"`` and
      ``gradient_normalization="loss"`` (then the method needs the losses) give LibMTL's MoCo; the defaults
      (``"projection"``, ``"none"``) are the paper's algorithm.
    * The paper's projection of each ``y_i`` onto a bounded set (a device of the analysis, with an unspecified
      radius) is left out, as in LibMTL.
    * Not defined on representation gradients (LibMTL refuses ``rep_grad``): ``y`` is per parameter.
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


# ------------------------------------------------------------------------------------------------- MoDo
@register_gradient_method
class MoDo(GradientMethod):
    """MoDo, multi-objective gradient with double sampling (Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in
    Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023).

    Three independent gradient estimates ``G1, G2, G3`` (``gradient_samples = 3``, each (K, P)) per step; the
    simplex weights ``lambda`` (state, initially uniform) take one projected stochastic gradient step on MGDA's
    regularised objective ``1/2 ||G^T lambda||^2 + rho/2 ||lambda||^2``, whose gradient is estimated without bias by
    double sampling (paper, Algorithm 1; LibMTL's ``MoDo.py``):

    * ``lambda <- Proj_simplex(lambda - gamma (G1 G2^T lambda + rho lambda))``;
    * direction ``d = G3^T lambda`` with the new ``lambda`` (returned as the weights, of the third sample's
      gradients).

    Defaults (LibMTL's; the paper tunes ``gamma`` and ``rho`` per experiment): ``gamma = 1e-3``, ``rho = 0.1``.
    The trainer should average the task-specific parameters' gradients over the three samples (LibMTL divides the
    decoders' summed gradients by 3). Not for representation gradients (LibMTL refuses ``rep_grad``: the three
    samples have different representations).
    """

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


# ------------------------------------------------------------------------------------------------- SDMGrad
@register_gradient_method
class SDMGrad(GradientMethod):
    """SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao, Ban and Ji, "Direction-oriented
    Multi-objective Learning: Simple and Provable Stochastic Algorithms", NeurIPS 2023).

    The direction-oriented problem keeps the common descent direction near the average gradient
    ``g0 = mean_i g_i``; its dual is ``min_{w in simplex} 1/2 ||G^T w||^2 + lmbd <G^T w, g0>``, and the direction is
    ``d = (G^T w + lmbd g0) / (1 + lmbd)``. Three independent gradient estimates ``zeta, xi, xi'``
    (``gradient_samples = 3``; sample 0 is ``zeta``, as in LibMTL) per step (paper, Algorithm 1):

    * ``M = G_xi G_xi'^T``, scaled by ``1 / mean_i(sqrt(M_ii))^2`` (official code and LibMTL: makes the inner step
      size independent of the gradients' scale; the minimiser does not change);
    * ``niter`` projected SGD steps from the previous ``w`` (state, initially uniform):
      ``w <- Proj_simplex(w - inner_learning_rate * b)`` with the momentum buffer ``b <- inner_momentum b +
      (M w + lmbd M 1/K)`` (reset to 0 every step, like the fresh ``torch.optim.SGD`` of the official code);
    * direction ``d = (G_zeta^T w + lmbd mean_i g_zeta,i) / (1 + lmbd)``, i.e. weights ``(w + lmbd/K)/(1+lmbd)``
      (returned).

    Defaults (LibMTL's, from the authors' code; the paper's Algorithm 1 has a plain projected SGD inner loop with
    unspecified step sizes, ``inner_momentum = 0``): ``lmbd = 0.3``, ``niter = 20``, ``inner_learning_rate = 5``,
    ``inner_momentum = 0.5``. Note: after the scaling the subproblem's curvature is of order 1, so for weakly
    correlated task gradients the step 5 is beyond the inner SGD's stability bound and ``w`` does not settle at the
    subproblem's minimiser but jumps between faces of the simplex (so does LibMTL's; strongly correlated gradients
    converge); a smaller ``inner_learning_rate`` (e.g. 0.4, ``inner_momentum = 0``) with more ``niter`` solves the
    subproblem (tested against SLSQP). LibMTL divides by ``scale^2 + 1e-8``; we divide by ``scale^2`` exactly, and
    when every ``M_ii <= 0`` (scale 0: zero or anti-correlated samples) ``w`` stays where it is (LibMTL would
    multiply ``M`` by 1e8). The authors' NYUv2 script also multiplies the direction by K; LibMTL and we do not.
    Not for representation gradients (LibMTL refuses ``rep_grad``).
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


# ------------------------------------------------------------------------------------------------- DB-MTL
@register_gradient_method
class DBMTL(GradientMethod):
    """DB-MTL, dual balancing (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu and Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv 2308.12029, 2023).

    * Loss-scale balancing: each task contributes the gradient of ``log(L_i + 1e-8)``, ``g_i / (L_i + 1e-8)``
      (invariant to a rescaling of the task's loss; needs positive losses);
    * an exponential moving average ``m_i`` of it (state, (K, P), initially 0, no bias correction):
      ``m <- beta_t m + (1 - beta_t) g / (L + 1e-8)`` with ``beta_t = beta / t^beta_sigma``, ``t = step + 1``;
    * gradient-magnitude balancing: every ``m_i`` is scaled to the largest norm,
      ``d = sum_i (max_j ||m_j|| / ||m_i||) m_i`` (no weights returned: a combination of the averages, not of the
      current gradients).

    Defaults (LibMTL's, the authors' own implementation): ``beta = 0.9``, ``beta_sigma = 0`` (a constant
    ``beta``). LibMTL divides by ``||m_i|| + 1e-8``; we divide exactly and give a task with ``m_i = 0`` the factor 0
    (the same except for norms near 1e-8). Not for representation gradients (LibMTL refuses ``rep_grad``; the
    average is per parameter).
    """

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


# ------------------------------------------------------------------------------------------------- ExcessMTL
@register_gradient_method
class ExcessMTL(GradientMethod):
    """ExcessMTL (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi and Zhao, "Robust Multi-Task Learning with Excess Risks",
    ICML 2024).

    Weights the tasks by their estimated excess risk ``L_i(theta) - L_i*`` ~ ``g_i^T H_i^-1 g_i`` with a diagonal
    AdaGrad-style Hessian approximation ``H_i = diag(sqrt(sum_s g_i(s)^2 + 1e-7))`` (the running sum of squared
    gradients is state, (K, P)). Each step (as in the authors' code, which LibMTL copies):

    * ``S_i <- S_i + g_i^2``; ``e_i = sum_p g_ip^2 / sqrt(S_ip + 1e-7)``;
    * during the first ``warmup_steps`` steps the weights stay at 1 and the baseline ``e_i(0)`` (state) is the mean
      of the ``e_i`` of those steps;
    * afterwards ``w_i <- w_i exp(robust_step_size * e_i / e_i(0))`` (exponentiated gradient ascent on the robust
      objective, the baseline making the tasks' risks comparable), renormalised to ``sum_i w_i = K``;
    * direction ``d = sum_i w_i g_i`` with the updated weights (returned).

    Defaults: ``robust_step_size = 1e-2`` (LibMTL's and the authors' code), ``warmup_steps = 1`` (the authors' code
    and LibMTL: the first step's risks are the baseline; the paper's Appendix C.1 collects them over 3 epochs, i.e.
    ``warmup_steps = 3 * steps_per_epoch``). The paper keeps the weights on the simplex (sum 1); the authors' code
    and we use sum K, which only scales the direction by K (the multiplicative update is the same). Guards: a task
    with ``e_i(0) = 0`` gets the ratio 0 (no push); a state whose baseline is still all zero after the warm-up (e.g.
    zero gradients so far, or a fresh state at a later step) records the current risks instead of updating; the
    exponentials are taken relative to the largest, which leaves the normalised weights unchanged and cannot
    overflow. Not for representation gradients here (LibMTL sums the per-sample representation gradients over the
    batch to get a fixed-size vector; our rep_grad interface gives no such per-coordinate identity across steps).
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
