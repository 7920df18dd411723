"""GradNorm, MoCo, MoDo, SDMGrad, DB-MTL and ExcessMTL (mtl_keras/gradient_methods/stochastic.py).

Each method: a hand-computed case from its paper's update, its state over 2-3 steps against a separate numpy
reimplementation written here (simplex projections by bisection, GradNorm's weight gradient by finite differences,
so the references do not share the module's numerics), a property the paper states, float64 / zero-gradient / K=1
runs and the TF-compiled step against eager.
"""

import keras
import numpy as np
import pytest
from keras import ops
from scipy.optimize import minimize

from mtl_keras.gradient_methods import GRADIENT_METHODS, aggregate, build_gradient_method

METHODS = ["gradnorm", "moco", "modo", "sdmgrad", "db_mtl", "excess_mtl"]


def to_np(x):
    return None if x is None else np.asarray(ops.convert_to_numpy(x))


def run(name, gradients, losses=None, state=None, step=0, **options):
    direction, weights, new_state = aggregate(name, gradients, losses=losses, state=state, step=step,
                                              return_details=True, **options)
    return to_np(direction), to_np(weights), {k: to_np(v) for k, v in new_state.items()}


def run_steps(name, gradient_list, loss_list=None, **options):
    """[(direction, weights, state)] after each step, starting from the initial state."""
    state, results = None, []
    for step, gradients in enumerate(gradient_list):
        losses = None if loss_list is None else loss_list[step]
        result = run(name, gradients, losses, state, step, **options)
        state = result[2]
        results.append(result)
    return results


def random_problem(num_steps, k=3, p=6, samples=None, seed=0):
    """Gradients (K, P), or (samples, K, P) sharing a common part per task (so that xi1_i . xi2_i > 0), and losses."""
    rng = np.random.default_rng(seed)
    if samples is None:
        gradients = [rng.normal(size=(k, p)) for _ in range(num_steps)]
    else:
        gradients = [rng.normal(size=(k, p)) + 0.5 * rng.normal(size=(samples, k, p)) for _ in range(num_steps)]
    losses = [rng.uniform(0.5, 2.0, size=k) for _ in range(num_steps)]
    return gradients, losses


# -------------------------------------------------------------------------------------- numpy references
def simplex_projection_bisection(v):
    """argmin_{w in simplex} ||w - v||: w = max(v - theta, 0) with sum 1, theta by bisection."""
    low, high = np.min(v) - 1.0, np.max(v)
    for _ in range(200):
        theta = 0.5 * (low + high)
        if np.maximum(v - theta, 0).sum() > 1:
            low = theta
        else:
            high = theta
    return np.maximum(v - 0.5 * (low + high), 0)


def min_norm_bruteforce(gradients):
    """MGDA's min-norm simplex weights by SLSQP."""
    m = gradients @ gradients.T
    k = len(m)
    result = minimize(lambda w: w @ m @ w, np.full(k, 1 / k), jac=lambda w: 2 * m @ w, bounds=[(0, 1)] * k,
                      constraints={"type": "eq", "fun": lambda w: w.sum() - 1}, tol=1e-14)
    return result.x


def gradnorm_reference(gradient_list, loss_list, alpha=1.5, lr=0.025):
    """Chen et al. 2018, Algorithm 1; dL_grad/dw by central finite differences with the targets held constant."""
    k = len(loss_list[0])
    w, initial, out = np.ones(k), None, []
    for t, (g, losses) in enumerate(zip(gradient_list, loss_list)):
        if t == 0:
            initial = losses.copy()
        direction = w @ g
        ratio = losses / initial
        r = ratio / ratio.mean()
        target = np.mean([np.linalg.norm(w[i] * g[i]) for i in range(k)]) * r ** alpha

        def grad_norm_loss(v):
            return sum(abs(np.linalg.norm(v[i] * g[i]) - target[i]) for i in range(k))

        h = 1e-6
        dw = np.array([(grad_norm_loss(w + h * e) - grad_norm_loss(w - h * e)) / (2 * h) for e in np.eye(k)])
        used = w.copy()
        w = w - lr * dw / np.mean(np.linalg.norm(g, axis=1))  # the step in units of the weights
        w = w * k / w.sum()
        out.append((direction, used, {"weights": w.copy(), "initial_losses": initial.copy()}))
    return out


def moco_reference(gradient_list, loss_list=None, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
                   libmtl=False):
    """Fernando et al. 2023, Algorithm 1 (``libmtl``: LibMTL's MoCo.py, softmax and loss-scaled unit gradients)."""
    k, p = gradient_list[0].shape
    y, lam, out = np.zeros((k, p)), np.full(k, 1 / k), []
    for step, g in enumerate(gradient_list):
        t = step + 1
        if libmtl:
            g = np.stack([g[i] / (np.linalg.norm(g[i]) + 1e-8) * loss_list[step][i] for i in range(k)])
        y = y - beta / t ** beta_sigma * (y - g)
        v = lam - gamma / t ** gamma_sigma * (y @ y.T + rho * np.eye(k)) @ lam
        lam = np.exp(v) / np.exp(v).sum() if libmtl else simplex_projection_bisection(v)
        out.append((y.T @ lam, None, {"tracked_gradients": y.copy(), "lambda": lam.copy()}))
    return out


def modo_reference(gradient_list, gamma=1e-3, rho=0.1):
    """Chen et al. 2023 (MoDo), Algorithm 1: lambda from samples 1 and 2, the update from sample 3."""
    k = gradient_list[0].shape[1]
    lam, out = np.full(k, 1 / k), []
    for g in gradient_list:
        lam = simplex_projection_bisection(lam - gamma * (g[0] @ g[1].T @ lam + rho * lam))
        out.append((g[2].T @ lam, lam.copy(), {"lambda": lam.copy()}))
    return out


def sdmgrad_reference(gradient_list, lmbd=0.3, niter=20, lr=5.0, momentum=0.5):
    """Xiao et al. 2023, Algorithm 1 with LibMTL's inner loop (SGD with momentum, fresh each step, scaled Gram)."""
    k = gradient_list[0].shape[1]
    w, out = np.full(k, 1 / k), []
    for zeta, xi1, xi2 in gradient_list:
        gg = xi1 @ xi2.T
        scale = np.mean(np.sqrt(np.maximum(np.diag(gg), 0)))
        gg = gg / scale ** 2
        buffer = np.zeros(k)
        for _ in range(niter):
            buffer = momentum * buffer + gg @ w + lmbd * gg @ np.full(k, 1 / k)
            w = simplex_projection_bisection(w - lr * buffer)
        direction = (zeta.T @ w + lmbd * zeta.mean(0)) / (1 + lmbd)
        out.append((direction, (w + lmbd / k) / (1 + lmbd), {"w": w.copy()}))
    return out


def db_mtl_reference(gradient_list, loss_list, beta=0.9, beta_sigma=0.0):
    """Lin et al. 2023: EMA of the gradients of log L_i, each scaled to the largest norm."""
    k, p = gradient_list[0].shape
    m, out = np.zeros((k, p)), []
    for step, (g, losses) in enumerate(zip(gradient_list, loss_list)):
        b = beta / (step + 1) ** beta_sigma
        m = b * m + (1 - b) * g / (losses[:, None] + 1e-8)
        norms = np.linalg.norm(m, axis=1)
        out.append(((norms.max() / norms) @ m, None, {"gradient_average": m.copy()}))
    return out


def excess_mtl_reference(gradient_list, step_size=1e-2, warmup=1):
    """He et al. 2024 (the authors' ExcessMTL.py): AdaGrad-diagonal excess risks, exponentiated-gradient weights;
    ``warmup`` > 1: the baseline is the mean risk of the first ``warmup`` steps (the paper's Appendix C.1)."""
    k, p = gradient_list[0].shape
    squared_sum, weights, risks, out = np.zeros((k, p)), np.ones(k), [], []
    for step, g in enumerate(gradient_list):
        squared_sum = squared_sum + g ** 2
        risk = np.array([g[i] @ (g[i] / np.sqrt(squared_sum[i] + 1e-7)) for i in range(k)])
        if step < warmup:
            risks.append(risk)
        else:
            weights = weights * np.exp(step_size * risk / np.mean(risks, axis=0))
            weights = weights / weights.sum() * k
        out.append((weights @ g, weights.copy(), {"squared_gradient_sum": squared_sum.copy(),
                                                  "initial_excess_risk": np.mean(risks, axis=0),
                                                  "weights": weights.copy()}))
    return out


def assert_steps_match(results, expected, atol=1e-6):
    for step, ((d, w, s), (d_ref, w_ref, s_ref)) in enumerate(zip(results, expected)):
        np.testing.assert_allclose(d, d_ref, atol=atol, rtol=1e-5, err_msg=f"direction at step {step}")
        if w_ref is None:
            assert w is None
        else:
            np.testing.assert_allclose(w, w_ref, atol=atol, rtol=1e-5, err_msg=f"weights at step {step}")
        assert set(s) == set(s_ref)
        for key in s_ref:
            np.testing.assert_allclose(s[key], s_ref[key], atol=atol, rtol=1e-5, err_msg=f"{key} at step {step}")


# -------------------------------------------------------------------------------------- GradNorm
def test_gradnorm_hand_computed():
    g = np.array([[3.0, 0.0], [0.0, 1.0]])
    # step 0: L(0) = L = (1, 1), r = (1, 1); G = w * ||g|| = (3, 1), target = mean(G) = 2: dL_grad/dw = (+3, -1),
    # divided by the mean norm 2: (+1.5, -0.5)
    d, w, s = run("gradnorm", g, np.array([1.0, 1.0]))
    np.testing.assert_allclose(d, [3.0, 1.0])
    np.testing.assert_allclose(w, [1.0, 1.0])
    w1 = np.array([1 - 0.025 * 1.5, 1 + 0.025 * 0.5]) * 2 / 1.975
    np.testing.assert_allclose(s["weights"], w1, rtol=1e-6)
    np.testing.assert_allclose(s["initial_losses"], [1.0, 1.0])
    # step 1: L = (0.5, 1): r = (2/3, 4/3); G = (3 w1_0, w1_1) = (2.846, 1.051), targets = 1.949 * r^1.5 = (1.06, 3.0)
    # -> task 0 above its target (+3), task 1 below (-1)
    d, w, s = run("gradnorm", g, np.array([0.5, 1.0]), state=s, step=1)
    np.testing.assert_allclose(w, w1, rtol=1e-6)
    np.testing.assert_allclose(d, w1 * [3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(s["weights"], (w1 + [-0.0375, 0.0125]) * 2 / 1.975, rtol=1e-6)
    np.testing.assert_allclose(s["initial_losses"], [1.0, 1.0])


def test_gradnorm_state_matches_reference():
    gradients, losses = random_problem(3, k=3)
    assert_steps_match(run_steps("gradnorm", gradients, losses), gradnorm_reference(gradients, losses), atol=1e-5)
    assert_steps_match(run_steps("gradnorm", gradients, losses, alpha=0.5, weight_learning_rate=0.1),
                       gradnorm_reference(gradients, losses, alpha=0.5, lr=0.1), atol=1e-5)


def test_gradnorm_moves_weights_toward_the_targets():
    """Weights of tasks above the GradNorm target shrink relative to those below; sum K; balanced is a fixed point."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        g = rng.normal(size=(4, 7)) * rng.uniform(0.2, 3.0, size=(4, 1))
        initial = rng.uniform(1, 2, size=4)
        losses = initial * rng.uniform(0.3, 1.0, size=4)
        _, _, s0 = run("gradnorm", g, initial)
        w = s0["weights"]
        _, _, s1 = run("gradnorm", g, losses, state=s0, step=1)
        new = s1["weights"]
        assert np.all(new >= 0) and np.isclose(new.sum(), 4.0, rtol=1e-5)
        ratio = losses / initial
        r = ratio / ratio.mean()
        above = w * np.linalg.norm(g, axis=1) > np.mean(w * np.linalg.norm(g, axis=1)) * r ** 1.5
        change = new / w
        assert above.any() and (~above).any()
        assert change[above].max() < change[~above].min()
    # equal gradient norms and equal training rates: every G_i is on its target, the weights do not move
    _, _, s = run("gradnorm", np.eye(3) * 2.0, np.ones(3))
    np.testing.assert_allclose(s["weights"], np.ones(3))


# -------------------------------------------------------------------------------------- MoCo
def test_moco_hand_computed():
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    # beta_1 = 0.5: y = g / 2; y y^T = diag(0.25, 1); lambda - 0.1 y y^T lambda = (0.4875, 0.45), projected: +0.03125
    d, w, s = run("moco", g)
    assert w is None
    np.testing.assert_allclose(s["tracked_gradients"], [[0.5, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(s["lambda"], [0.51875, 0.48125], rtol=1e-6)
    np.testing.assert_allclose(d, [0.259375, 0.48125], rtol=1e-6)


def test_moco_state_matches_reference():
    gradients, losses = random_problem(3, k=3)
    assert_steps_match(run_steps("moco", gradients), moco_reference(gradients))
    assert_steps_match(run_steps("moco", gradients, rho=0.2, gamma=0.3, beta_sigma=0.0),
                       moco_reference(gradients, rho=0.2, gamma=0.3, beta_sigma=0.0))
    # LibMTL's variant: softmax instead of the projection, tracking g_i / ||g_i|| * L_i
    assert_steps_match(run_steps("moco", gradients, losses, lambda_update="softmax", gradient_normalization="loss"),
                       moco_reference(gradients, losses, libmtl=True))


def test_moco_converges_to_mgda_with_exact_gradients():
    """With noiseless gradients y -> G, and lambda's projected gradient steps reach MGDA's min-norm weights."""
    rng = np.random.default_rng(4)
    g = rng.normal(size=(3, 5))
    g = g / np.sqrt(np.linalg.eigvalsh(g @ g.T).max())
    options = dict(beta=1.0, beta_sigma=0.0, gamma=1.5, gamma_sigma=0.0)
    state = None
    for step in range(60):
        direction, _, state = run("moco", g, state=state, step=step, **options)
    expected = min_norm_bruteforce(g)
    np.testing.assert_allclose(state["lambda"], expected, atol=1e-4)
    np.testing.assert_allclose(direction, expected @ g, atol=1e-4)


def test_moco_options_are_checked():
    with pytest.raises(ValueError, match="lambda_update"):
        build_gradient_method("moco", 2, lambda_update="exp")
    assert not build_gradient_method("moco", 2).needs_losses
    assert build_gradient_method("moco", 2, gradient_normalization="loss").needs_losses
    with pytest.raises(ValueError, match="losses"):
        aggregate("moco", np.ones((2, 3)), gradient_normalization="loss")


# -------------------------------------------------------------------------------------- MoDo
def test_modo_hand_computed():
    g1 = np.eye(2)
    g2 = np.array([[2.0, 0.0], [0.0, 1.0]])
    g3 = np.array([[1.0, 1.0], [1.0, -1.0]])
    # G1 G2^T lambda + rho lambda = (1.05, 0.55); lambda - 0.1 * that = (0.395, 0.445), projected: +0.08
    d, w, s = run("modo", np.stack([g1, g2, g3]), gamma=0.1, rho=0.1)
    np.testing.assert_allclose(s["lambda"], [0.475, 0.525], rtol=1e-6)
    np.testing.assert_allclose(w, [0.475, 0.525], rtol=1e-6)
    np.testing.assert_allclose(d, [1.0, -0.05], rtol=1e-5, atol=1e-7)


def test_modo_state_matches_reference():
    gradients, _ = random_problem(3, k=3, samples=3)
    assert_steps_match(run_steps("modo", gradients), modo_reference(gradients))
    assert_steps_match(run_steps("modo", gradients, gamma=0.2, rho=0.05), modo_reference(gradients, 0.2, 0.05))


def test_modo_converges_to_mgda_when_the_samples_agree():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(3, 5))
    g = g / np.sqrt(np.linalg.eigvalsh(g @ g.T).max())
    state = None
    for step in range(60):
        direction, _, state = run("modo", np.stack([g, g, g]), state=state, step=step, gamma=1.5, rho=0.0)
    expected = min_norm_bruteforce(g)
    np.testing.assert_allclose(state["lambda"], expected, atol=1e-4)
    # a (K, P) input is the same three samples
    d2, _, s2 = run("modo", g, state=state, step=60, gamma=1.5, rho=0.0)
    d3, _, s3 = run("modo", np.stack([g, g, g]), state=state, step=60, gamma=1.5, rho=0.0)
    np.testing.assert_allclose(d2, d3)
    with pytest.raises(ValueError, match="3, K, P"):
        run("modo", np.ones((2, 2, 3)))


# -------------------------------------------------------------------------------------- SDMGrad
def test_sdmgrad_hand_computed():
    """g1 = (2, 0), g2 = (0, 1): min_w 1/2 w^T M w + 0.3 w^T M 1/2 on the simplex, M = diag(4, 1), has
    4 w1 + 0.6 = w2 + 0.15 -> w = (0.11, 0.89); d = (G^T w + 0.3 mean(g)) / 1.3 = ((0.22, 0.89) + (0.3, 0.15)) / 1.3."""
    g = np.array([[2.0, 0.0], [0.0, 1.0]])
    d, w, s = run("sdmgrad", np.stack([g, g, g]), niter=40, inner_learning_rate=0.5, inner_momentum=0.0)
    np.testing.assert_allclose(s["w"], [0.11, 0.89], atol=1e-6)
    np.testing.assert_allclose(d, [0.4, 0.8], atol=1e-6)
    np.testing.assert_allclose(w, (np.array([0.11, 0.89]) + 0.15) / 1.3, atol=1e-6)


def test_sdmgrad_state_matches_reference():
    gradients, _ = random_problem(3, k=3, samples=3)
    assert_steps_match(run_steps("sdmgrad", gradients), sdmgrad_reference(gradients), atol=1e-5)
    assert_steps_match(run_steps("sdmgrad", gradients, lmbd=1.0, niter=7, inner_learning_rate=0.3),
                       sdmgrad_reference(gradients, lmbd=1.0, niter=7, lr=0.3), atol=1e-5)


@pytest.mark.parametrize("lmbd", [0.0, 0.3, 2.0])
def test_sdmgrad_solves_the_direction_oriented_subproblem(lmbd):
    """With a convergent inner loop, w is the minimiser of the paper's dual (SLSQP here); lmbd = 0 is MGDA."""
    rng = np.random.default_rng(6)
    g = rng.normal(size=(3, 5))
    m = g @ g.T
    objective = lambda w: 0.5 * w @ m @ w + lmbd * w @ m @ np.full(3, 1 / 3)  # noqa: E731
    expected = minimize(objective, np.full(3, 1 / 3), bounds=[(0, 1)] * 3, tol=1e-14,
                        constraints={"type": "eq", "fun": lambda w: w.sum() - 1}).x
    d, _, s = run("sdmgrad", np.stack([g, g, g]), lmbd=lmbd, niter=120, inner_learning_rate=0.4,
                  inner_momentum=0.0)
    np.testing.assert_allclose(s["w"], expected, atol=1e-4)
    np.testing.assert_allclose(d, (expected @ g + lmbd * g.mean(0)) / (1 + lmbd), atol=1e-4)
    if lmbd == 0.0:
        np.testing.assert_allclose(s["w"], min_norm_bruteforce(g), atol=1e-4)


def test_sdmgrad_large_lambda_is_the_average_gradient():
    gradients, _ = random_problem(1, k=4, samples=3)
    d, _, _ = run("sdmgrad", gradients[0], lmbd=1e7)
    np.testing.assert_allclose(d, gradients[0][0].mean(0), atol=1e-5)


# -------------------------------------------------------------------------------------- DB-MTL
def test_db_mtl_hand_computed():
    g = np.array([[2.0, 0.0], [0.0, 1.0]])
    losses = np.array([2.0, 0.5])
    # grad log L = g / L = diag(1, 2); m = 0.1 * that; norms (0.1, 0.2) -> factors (2, 1)
    d, w, s = run("db_mtl", g, losses)
    assert w is None
    np.testing.assert_allclose(s["gradient_average"], [[0.1, 0.0], [0.0, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(d, [0.2, 0.2], rtol=1e-6)
    # m = 0.9 m + 0.1 diag(1, 2) = diag(0.19, 0.38)
    d, _, s = run("db_mtl", g, losses, state=s, step=1)
    np.testing.assert_allclose(s["gradient_average"], [[0.19, 0.0], [0.0, 0.38]], rtol=1e-6)
    np.testing.assert_allclose(d, [0.38, 0.38], rtol=1e-6)


def test_db_mtl_state_matches_reference():
    gradients, losses = random_problem(3, k=3)
    assert_steps_match(run_steps("db_mtl", gradients, losses), db_mtl_reference(gradients, losses))
    assert_steps_match(run_steps("db_mtl", gradients, losses, beta=0.5, beta_sigma=0.5),
                       db_mtl_reference(gradients, losses, beta=0.5, beta_sigma=0.5))


def test_db_mtl_is_invariant_to_loss_scales_and_balances_magnitudes():
    """Dual balancing: rescaling a task's loss (L -> c L, g -> c g) changes nothing, and every task's term of the
    direction has the largest average's norm."""
    gradients, losses = random_problem(3, k=3)
    scales = np.array([1.0, 100.0, 0.01])
    plain = run_steps("db_mtl", gradients, losses)
    scaled = run_steps("db_mtl", [g * scales[:, None] for g in gradients], [loss * scales for loss in losses])
    for (d, _, _), (d_scaled, _, _) in zip(plain, scaled):
        np.testing.assert_allclose(d, d_scaled, rtol=1e-5, atol=1e-7)
    average = plain[-1][2]["gradient_average"]
    norms = np.linalg.norm(average, axis=1)
    terms = (norms.max() / norms)[:, None] * average
    np.testing.assert_allclose(np.linalg.norm(terms, axis=1), norms.max(), rtol=1e-6)
    np.testing.assert_allclose(terms.sum(0), plain[-1][0], rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- ExcessMTL
def test_excess_mtl_hand_computed():
    g0 = np.array([[1.0, 0.0], [0.0, 2.0]])
    # step 0: S = g^2; e = (1 / sqrt(1), 4 / sqrt(4)) = (1, 2) recorded; weights stay 1
    d, w, s = run("excess_mtl", g0)
    np.testing.assert_allclose(s["initial_excess_risk"], [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(w, [1.0, 1.0])
    np.testing.assert_allclose(d, [1.0, 2.0])
    # step 1, g = 2 I: S = diag(5, 8); e = (4 / sqrt(5), 4 / sqrt(8)); ratios e / e(0) = (4/sqrt(5), sqrt(2)/2)
    g1 = 2 * np.eye(2)
    d, w, s = run("excess_mtl", g1, state=s, step=1)
    expected = np.exp(0.01 * np.array([4 / np.sqrt(5), np.sqrt(2) / 2]))
    expected = 2 * expected / expected.sum()
    np.testing.assert_allclose(s["squared_gradient_sum"], [[5.0, 0.0], [0.0, 8.0]])
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_allclose(s["weights"], expected, rtol=1e-6)
    np.testing.assert_allclose(d, 2 * expected, rtol=1e-6)


def test_excess_mtl_state_matches_reference():
    gradients, _ = random_problem(3, k=3)
    assert_steps_match(run_steps("excess_mtl", gradients), excess_mtl_reference(gradients))
    assert_steps_match(run_steps("excess_mtl", gradients, robust_step_size=0.5),
                       excess_mtl_reference(gradients, 0.5))
    gradients, _ = random_problem(4, k=3, seed=1)
    assert_steps_match(run_steps("excess_mtl", gradients, robust_step_size=0.5, warmup_steps=2),
                       excess_mtl_reference(gradients, 0.5, warmup=2))
    with pytest.raises(ValueError, match="warmup_steps"):
        build_gradient_method("excess_mtl", 2, warmup_steps=0)


def test_excess_mtl_upweights_the_larger_relative_excess_risk():
    gradients, _ = random_problem(2, k=4, seed=7)
    (_, _, s0), (_, w1, s1) = run_steps("excess_mtl", gradients, robust_step_size=0.3)
    squared_sum = s1["squared_gradient_sum"]
    risk = np.sum(gradients[1] ** 2 / np.sqrt(squared_sum + 1e-7), axis=1)
    order = np.argsort(risk / s0["initial_excess_risk"])
    assert np.all(np.diff(w1[order]) > 0)
    np.testing.assert_allclose(w1.sum(), 4.0, rtol=1e-6)


# -------------------------------------------------------------------------------------- all methods
def inputs_for(name, k=3, p=5, seed=0, dtype="float32"):
    method = GRADIENT_METHODS[name]
    rng = np.random.default_rng(seed)
    shape = (k, p) if method.gradient_samples == 1 else (method.gradient_samples, k, p)
    return rng.normal(size=shape).astype(dtype), rng.uniform(0.5, 2.0, size=k).astype(dtype)


@pytest.mark.parametrize("name", METHODS)
def test_flags_and_state_layout(name):
    method = build_gradient_method(name, 3)
    state = method.initial_state(5)
    gradients, losses = inputs_for(name, dtype="float64")
    d, w, s = aggregate(name, gradients, losses=losses, return_details=True)
    d, w, s = aggregate(name, gradients, losses=losses, state=s, step=1, return_details=True)
    # float64 in, float64 out (JAX without x64 holds float64 inputs as float32)
    expected_dtype = keras.backend.standardize_dtype(ops.convert_to_tensor(gradients).dtype)
    assert keras.backend.standardize_dtype(d.dtype) == expected_dtype and tuple(d.shape) == (5,)
    assert w is None or tuple(w.shape) == (3,)
    assert set(s) == set(state)
    for key, value in state.items():
        assert tuple(s[key].shape) == value.shape and keras.backend.standardize_dtype(s[key].dtype) == str(value.dtype)
    expected_samples = {"modo": 3, "sdmgrad": 3}.get(name, 1)
    assert method.gradient_samples == expected_samples
    assert method.needs_losses == (name in ("gradnorm", "db_mtl"))
    assert method.supports_rep_grad == (name == "gradnorm")
    if method.needs_losses:
        with pytest.raises(ValueError, match="losses"):
            aggregate(name, gradients)


@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_and_one_task(name):
    gradients, losses = inputs_for(name)
    zeros = np.zeros_like(gradients)
    state = None
    for step in range(2):
        d, w, state = run(name, zeros, losses, state=state, step=step)
        assert np.all(d == 0)
        assert all(np.all(np.isfinite(v)) for v in state.values())
        assert w is None or np.all(np.isfinite(w))
    gradients, losses = inputs_for(name, k=1)
    state = None
    for step in range(2):
        d, w, state = run(name, gradients, losses, state=state, step=step)
        assert np.all(np.isfinite(d))


@pytest.mark.tf_only
@pytest.mark.parametrize("name", METHODS)
def test_compiled_matches_eager(name):
    import tensorflow as tf

    gradients, losses = inputs_for(name, seed=1)
    method = build_gradient_method(name, 3)
    _, _, state = run(name, gradients, losses)  # a non-trivial state (after the first step)
    state = {k: tf.constant(v) for k, v in state.items()}
    gradients2, losses2 = inputs_for(name, seed=2)

    def step_fn(g, l, s, step):
        return method.aggregate(g, l, s, step, 0)

    eager = step_fn(tf.constant(gradients2), tf.constant(losses2), state, tf.constant(1))
    compiled = tf.function(step_fn, jit_compile=False)(tf.constant(gradients2), tf.constant(losses2), state,
                                                        tf.constant(1))
    np.testing.assert_allclose(to_np(compiled[0]), to_np(eager[0]), rtol=1e-5, atol=1e-6)
    if eager[1] is not None:
        np.testing.assert_allclose(to_np(compiled[1]), to_np(eager[1]), rtol=1e-5, atol=1e-6)
    for key in state:
        np.testing.assert_allclose(to_np(compiled[2][key]), to_np(eager[2][key]), rtol=1e-5, atol=1e-6)
    # the first step (step 0) takes the other branch of GradNorm's / ExcessMTL's initialisation
    fresh = {k: tf.constant(v) for k, v in method.initial_state(5).items()}
    eager = step_fn(tf.constant(gradients2), tf.constant(losses2), fresh, tf.constant(0))
    compiled = tf.function(step_fn, jit_compile=False)(tf.constant(gradients2), tf.constant(losses2), fresh,
                                                        tf.constant(0))
    np.testing.assert_allclose(to_np(compiled[0]), to_np(eager[0]), rtol=1e-5, atol=1e-6)
