"""MGDA, Nash-MTL, IMTL-G, FairGrad, UPGrad and DualProj (mtl_keras/gradient_methods/solvers.py).

Every expected value comes from the paper's definition, computed here independently: closed forms for two
gradients, a numpy enumeration of the supports that checks the KKT conditions of the quadratic programs, and scipy
(SLSQP / L-BFGS-B / least_squares, the host solvers of the reference implementations).
"""

import itertools

import keras
import numpy as np
import pytest
from keras import ops
from scipy.optimize import least_squares, minimize

from mtl_keras.gradient_methods import aggregate, build_gradient_method

METHODS = ["mgda", "nash_mtl", "imtl", "fairgrad", "upgrad", "dualproj"]

# The references are checked to float64 precision: JAX computes in float32 unless JAX_ENABLE_X64=1 (then the file
# passes), Keras' torch backend returns float32 from float64 matmuls.
_ONES64 = ops.ones((1, 1), "float64")
pytestmark = pytest.mark.skipif(keras.backend.standardize_dtype(ops.matmul(_ONES64, _ONES64).dtype) != "float64",
                                reason="needs float64 arithmetic (JAX: set JAX_ENABLE_X64=1)")


def details(name, gradients, **kwargs):
    direction, weights, state = aggregate(name, gradients, return_details=True, **kwargs)
    as_np = keras.ops.convert_to_numpy
    return as_np(direction), as_np(weights), {k: as_np(v) for k, v in state.items()}


def random_gradients(rng, k, p, spread=1.0):
    return rng.normal(size=(k, p)) * np.exp(rng.uniform(-spread, spread, size=(k, 1)))


# ------------------------------------------------------------------------------------------ independent references
def min_norm_reference(m, tol=1e-10):
    """The simplex point minimising w^T m w for positive definite m: the support whose affine minimiser is
    non-negative and satisfies the KKT conditions (m w)_i >= w^T m w off the support."""
    k = len(m)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            x = np.linalg.solve(m[np.ix_(s, s)], np.ones(size))
            w = np.zeros(k)
            w[s] = x / x.sum()
            if (w >= -tol).all() and (m @ w >= w @ m @ w - tol * np.abs(m).max()).all():
                return w
    raise AssertionError("no KKT point")


def box_qp_reference(m, u, tol=1e-10):
    """argmin v^T m v s.t. v >= u (m positive definite): the free set with (m v)_F = 0, v_F >= u_F and
    multipliers (m v)_i >= 0 on the bound coordinates."""
    k = len(u)
    for size in range(k + 1):
        for free in itertools.combinations(range(k), size):
            f = np.zeros(k, bool)
            f[list(free)] = True
            v = np.linalg.solve(np.where(f[:, None], m, np.eye(k)), np.where(f, 0.0, u))
            if (v >= u - tol).all() and (m @ v >= -tol)[~f].all():
                return v
    raise AssertionError("no KKT point")


def box_qp_scipy(m, u):
    result = minimize(lambda v: v @ m @ v, u + 0.1, jac=lambda v: 2 * m @ v, method="L-BFGS-B",
                      bounds=[(b, None) for b in u], options=dict(ftol=1e-15, gtol=1e-12, maxiter=10000))
    return result.x


def torchjd_gram(g, norm_eps=1e-4, reg_eps=1e-4):
    m = g @ g.T
    trace = np.trace(m)
    m = np.zeros_like(m) if trace < norm_eps else m / trace
    return m + reg_eps * np.eye(len(m))


# ============================================================================================ MGDA
def test_mgda_two_gradients_closed_form():
    # Sener & Koltun Alg. 1: gamma = clip((g2 - g1).g2 / ||g1 - g2||^2, 0, 1), d = gamma g1 + (1 - gamma) g2
    g = np.array([[2.0, 0.0], [0.0, 1.0]])
    d, w, _ = details("mgda", g)
    np.testing.assert_allclose(w, [0.2, 0.8], atol=1e-10)
    np.testing.assert_allclose(d, [0.4, 0.8], atol=1e-10)
    g = np.array([[2.0, 0.0], [1.0, 0.1]])  # gamma < 0: the min-norm point is the vertex g2
    d, w, _ = details("mgda", g)
    np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(d, g[1], atol=1e-10)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g1, g2 = rng.normal(size=(2, 7))
        gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        d, w, _ = details("mgda", np.stack([g1, g2]))
        np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-9)
        np.testing.assert_allclose(d, gamma * g1 + (1 - gamma) * g2, atol=1e-9)


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-8), ("float32", 2e-4)])
def test_mgda_is_the_min_norm_point(dtype, atol):
    rng = np.random.default_rng(1)
    for k in range(2, 7):
        g = random_gradients(rng, k, k + 3)
        expected_w = min_norm_reference(g @ g.T)
        d, w, _ = details("mgda", g.astype(dtype))
        np.testing.assert_allclose(d, expected_w @ g, atol=atol * np.abs(g).max())
        # the paper's property: every task decreases at least by ||d||^2 along d (d^T g_k >= ||d||^2)
        assert np.all(g @ d >= d @ d - 10 * atol * (g ** 2).sum())
        assert w.min() >= 0 and abs(w.sum() - 1) < atol


def test_mgda_matches_scipy_with_zero_in_the_hull():
    # K > P: the gradients' hull contains 0 (Pareto-stationary): the min-norm point is 0
    rng = np.random.default_rng(2)
    g = rng.normal(size=(5, 2))
    m = g @ g.T
    scipy = minimize(lambda w: w @ m @ w, np.full(5, 0.2), method="SLSQP", bounds=[(0, 1)] * 5,
                     constraints=[dict(type="eq", fun=lambda w: w.sum() - 1)], options=dict(ftol=1e-16))
    d, w, _ = details("mgda", g)
    assert d @ d <= scipy.fun + 1e-12
    np.testing.assert_allclose(d, scipy.x @ g, atol=1e-6)


def test_mgda_many_tasks_uses_frank_wolfe_and_active_set():
    rng = np.random.default_rng(3)
    g = random_gradients(rng, 10, 14)
    d, w, _ = details("mgda", g, solver_iterations=50)  # few Frank-Wolfe steps: the active-set steps finish
    np.testing.assert_allclose(d, min_norm_reference(g @ g.T) @ g, atol=1e-8)


def test_mgda_gradient_normalisations():
    g = np.array([[4.0, 0.0], [0.0, 1.0]])
    losses = np.array([2.0, 0.5])
    # l2: min-norm point of the unit gradients (w = 1/2, 1/2), applied to the raw gradients (official code)
    d, w, _ = details("mgda", g, mgda_gn="l2")
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-10)
    np.testing.assert_allclose(d, [2.0, 0.5], atol=1e-10)
    # loss: g / L = (2, 0), (0, 2): w = 1/2, 1/2
    d, w, _ = details("mgda", g, losses=losses, mgda_gn="loss")
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-10)
    # loss+: g / (L ||g||) = (1/2, 0), (0, 2): gamma = 4 / (1/4 + 4) on the first
    d, w, _ = details("mgda", g, losses=losses, mgda_gn="loss+")
    np.testing.assert_allclose(w, [16 / 17, 1 / 17], atol=1e-10)
    with pytest.raises(ValueError, match="needs the task losses"):
        aggregate("mgda", g, mgda_gn="loss")
    with pytest.raises(ValueError, match="mgda_gn"):
        aggregate("mgda", g, mgda_gn="l1")
    assert build_gradient_method("mgda", 2, mgda_gn="loss+").needs_losses
    assert not build_gradient_method("mgda", 2).needs_losses


# ============================================================================================ Nash-MTL
def nash_scipy(m):
    """Solve M a = 1/a with scipy (bounded least squares, a >= 0)."""
    return least_squares(lambda a: m @ a - 1.0 / a, np.ones(len(m)), bounds=(0, np.inf), xtol=1e-15, ftol=1e-15,
                         gtol=1e-15).x


def test_nash_mtl_solves_the_bargaining_equation():
    rng = np.random.default_rng(4)
    for k in range(1, 6):
        g = random_gradients(rng, k, k + 4, spread=2.0)
        m = g @ g.T
        d, w, _ = details("nash_mtl", g, max_norm=0.0)
        assert np.all(w > 0)
        np.testing.assert_allclose(m @ w, 1.0 / w, rtol=1e-8)
        np.testing.assert_allclose(w, nash_scipy(m), rtol=1e-6)
        np.testing.assert_allclose(d @ d, k, rtol=1e-8)  # ||d||^2 = a^T M a = K
        _, w32, _ = details("nash_mtl", g.astype("float32"), max_norm=0.0)
        np.testing.assert_allclose(w32, w, rtol=1e-3)


def test_nash_mtl_orthogonal_gradients_and_clipping():
    g = np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    d, w, _ = details("nash_mtl", g, max_norm=0.0)
    np.testing.assert_allclose(w, [0.5, 2.0], rtol=1e-10)  # alpha_i = 1 / ||g_i||
    np.testing.assert_allclose(d, [1.0, 1.0, 0.0], rtol=1e-10)
    # default max_norm = 1: ||d|| = sqrt(2) is clipped (torch clip_grad_norm_: max_norm / (norm + 1e-6))
    d, w, _ = details("nash_mtl", g)
    factor = 1.0 / (np.sqrt(2.0) + 1e-6)
    np.testing.assert_allclose(w, np.array([0.5, 2.0]) * factor, rtol=1e-10)
    np.testing.assert_allclose(d, np.array([1.0, 1.0, 0.0]) * factor, rtol=1e-10)
    d, _, _ = details("nash_mtl", g, max_norm=5.0)  # below the limit: unchanged
    np.testing.assert_allclose(d, [1.0, 1.0, 0.0], rtol=1e-10)


def test_nash_mtl_state_warm_start_and_update_every():
    rng = np.random.default_rng(5)
    grads = [random_gradients(rng, 3, 6) for _ in range(3)]
    method = build_gradient_method("nash_mtl", 3, update_weights_every=2, max_norm=0.0)
    state = {k: ops.convert_to_tensor(v) for k, v in method.initial_state(6).items()}
    np.testing.assert_array_equal(ops.convert_to_numpy(state["alpha"]), np.ones(3))
    history = []
    for step, g in enumerate(grads):
        d, w, state = method.aggregate(ops.convert_to_tensor(g), None, state, ops.convert_to_tensor(step, "int32"), 0)
        history.append((ops.convert_to_numpy(d), ops.convert_to_numpy(w),
                        {k: ops.convert_to_numpy(v) for k, v in state.items()}))
        for key, value in state.items():
            assert value.shape == (3,) and keras.backend.standardize_dtype(value.dtype) == "float32"
    m0, m2 = grads[0] @ grads[0].T, grads[2] @ grads[2].T
    # step 0: solved; the state keeps the normalised solution and the raw weights
    np.testing.assert_allclose(m0 @ history[0][1], 1 / history[0][1], rtol=1e-4)
    np.testing.assert_allclose(history[0][2]["alpha"], history[0][1] * np.sqrt(np.linalg.norm(m0)), rtol=1e-5)
    # step 1 (1 % 2 != 0): the previous weights on the new gradients, state unchanged
    np.testing.assert_allclose(history[1][1], history[0][1], rtol=1e-6)
    np.testing.assert_allclose(history[1][0], history[0][1] @ grads[1], rtol=1e-5)
    np.testing.assert_allclose(history[1][2]["alpha"], history[0][2]["alpha"])
    # step 2: solved again (warm-started from the state)
    np.testing.assert_allclose(m2 @ history[2][1], 1 / history[2][1], rtol=1e-4)
    # every step (default): each step solves its own equation, whatever the warm start
    d_cold, w_cold, _ = details("nash_mtl", grads[2], max_norm=0.0)
    d_warm, w_warm, _ = details("nash_mtl", grads[2], max_norm=0.0, state=history[0][2], step=1)
    np.testing.assert_allclose(w_warm, w_cold, rtol=1e-8)


def test_nash_mtl_without_positive_solution_stays_finite():
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])  # g2 = -g1: no bargaining solution
    for dtype in ("float64", "float32"):
        d, w, state = details("nash_mtl", g.astype(dtype))
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(d)) and np.linalg.norm(d) <= 1.0 + 1e-6
        assert all(np.all(np.isfinite(v)) for v in state.values())


# ============================================================================================ IMTL-G
def imtl_paper_closed_form(g):
    """Liu et al. 2021, IMTL-G: alpha_{2..K} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum (D, U: differences of the
    raw and of the unit gradients to the first one)."""
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    big_d, big_u = g[:1] - g[1:], u[:1] - u[1:]
    alpha = g[0] @ big_u.T @ np.linalg.inv(big_d @ big_u.T)
    return np.concatenate([[1 - alpha.sum()], alpha])


def test_imtl_hand_case():
    g = np.array([[1.0, 0.0], [0.0, 2.0]])  # d = (a, 2 (1 - a)), equal projections on (1,0), (0,1): a = 2/3
    d, w, _ = details("imtl", g)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3], atol=1e-10)
    np.testing.assert_allclose(d, [2 / 3, 2 / 3], atol=1e-10)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-8), ("float32", 1e-3)])
def test_imtl_equal_projections(dtype, rtol):
    rng = np.random.default_rng(6)
    for k in range(2, 7):
        g = random_gradients(rng, k, k + 3)
        d, w, _ = details("imtl", g.astype(dtype))
        projections = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ d
        np.testing.assert_allclose(projections, projections.mean(), rtol=rtol)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=rtol)
        np.testing.assert_allclose(w, imtl_paper_closed_form(g), rtol=10 * rtol, atol=rtol)


def test_imtl_degenerate_gradients_give_zero():
    for g in (np.zeros((3, 4)), np.array([[1.0, 2.0], [-1.0, -2.0]])):
        d, w, _ = details("imtl", g)
        np.testing.assert_allclose(d, 0.0, atol=1e-12)
        assert np.all(np.isfinite(w))
    d, w, _ = details("imtl", np.array([[3.0, 0.0]]))  # one task: the gradient itself
    np.testing.assert_allclose(d, [3.0, 0.0])


# ============================================================================================ FairGrad
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_equation(alpha):
    rng = np.random.default_rng(7)
    for k in (1, 2, 4):
        g = random_gradients(rng, k, k + 4, spread=1.5)
        m = g @ g.T
        d, w, _ = details("fairgrad", g, alpha=alpha)
        assert np.all(w > 0)
        np.testing.assert_allclose(m @ w, w ** (-1 / alpha), rtol=1e-8)
        np.testing.assert_allclose(d, w @ g, rtol=1e-10)
        # LibMTL / the official code: scipy least_squares from 1/K with bounds w >= 0
        reference = least_squares(lambda x: m @ x - x ** (-1 / alpha), np.full(k, 1 / k), bounds=(0, np.inf),
                                  xtol=1e-15, ftol=1e-15, gtol=1e-15).x
        np.testing.assert_allclose(w, reference, rtol=1e-5)


def test_fairgrad_orthogonal_closed_form_and_alpha_one_is_nash():
    g = np.array([[2.0, 0.0], [0.0, 0.5]])
    for alpha in (0.5, 1.0, 3.0):  # ||g_i||^2 w_i = w_i^(-1/alpha): w_i = ||g_i||^(-2 alpha / (alpha + 1))
        _, w, _ = details("fairgrad", g, alpha=alpha)
        np.testing.assert_allclose(w, np.array([2.0, 0.5]) ** (-2 * alpha / (alpha + 1)), rtol=1e-10)
    g = random_gradients(np.random.default_rng(8), 4, 9)
    _, w_fair, _ = details("fairgrad", g, alpha=1.0)
    _, w_nash, _ = details("nash_mtl", g, max_norm=0.0)
    np.testing.assert_allclose(w_fair, w_nash, rtol=1e-8)
    with pytest.raises(ValueError, match="alpha"):
        build_gradient_method("fairgrad", 2, alpha=0.0)


# ============================================================================================ UPGrad / DualProj
def test_upgrad_and_dualproj_hand_cases():
    g = np.array([[1.0, 0.0], [-3.0, 1.0]])
    # projections on the dual cone {x: g1.x >= 0, g2.x >= 0}: g1 -> g1 - (g1.g2/|g2|^2) g2 = (0.1, 0.3),
    # g2 -> g2 - (g2.g1/|g1|^2) g1 = (0, 1); UPGrad = their mean
    d, _, _ = details("upgrad", g, reg_eps=0.0)
    np.testing.assert_allclose(d, [0.05, 0.65], atol=1e-10)
    # DualProj: the mean (-1, 0.5) projected onto g1.x >= 0 -> (0, 0.5), which satisfies g2.x >= 0
    d, _, _ = details("dualproj", g, reg_eps=0.0)
    np.testing.assert_allclose(d, [0.0, 0.5], atol=1e-10)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_match_the_qp(name):
    rng = np.random.default_rng(9)
    for k in range(1, 7):
        g = random_gradients(rng, k, k + 3)
        m = torchjd_gram(g)
        rows = np.eye(k) / k if name == "upgrad" else np.full((1, k), 1 / k)
        expected = sum(box_qp_reference(m, u) for u in rows)
        scipy = sum(box_qp_scipy(m, u) for u in rows)
        d, w, _ = details(name, g)
        np.testing.assert_allclose(w, expected, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(w, scipy, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d, w @ g, rtol=1e-10)
        _, w32, _ = details(name, g.astype("float32"))
        np.testing.assert_allclose(w32, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_do_not_conflict(name):
    rng = np.random.default_rng(10)
    for k in range(2, 7):
        g = random_gradients(rng, k, 4)
        scale = np.linalg.norm(g, axis=1) * np.sqrt((g ** 2).sum())
        d, _, _ = details(name, g, reg_eps=0.0)
        assert np.all(g @ d >= -1e-9 * scale)
        d, w, _ = details(name, g)  # torchjd's regularisation: KKT gives g_i.d >= -reg_eps trace(M) w_i
        assert np.all(g @ d >= -1e-4 * np.trace(g @ g.T) * w - 1e-9 * scale)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_without_conflict_are_the_mean(name):
    rng = np.random.default_rng(11)
    g = np.abs(rng.normal(size=(4, 6)))  # all inner products positive
    d, w, _ = details(name, g)
    np.testing.assert_allclose(w, np.full(4, 0.25), atol=1e-12)
    np.testing.assert_allclose(d, g.mean(0), atol=1e-12)


def test_upgrad_norm_eps_follows_torchjd():
    g = 1e-3 * np.array([[1.0, 0.0], [-3.0, 1.0]])  # trace 1.1e-5 < norm_eps: torchjd returns the mean
    d, _, _ = details("upgrad", g)
    np.testing.assert_allclose(d, g.mean(0), atol=1e-15)
    d, _, _ = details("upgrad", g, norm_eps=0.0, reg_eps=0.0)  # scale invariant otherwise
    np.testing.assert_allclose(d, 1e-3 * np.array([0.05, 0.65]), atol=1e-12)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_many_tasks_iterative_path(name):
    rng = np.random.default_rng(12)
    g = random_gradients(rng, 10, 6)
    m = torchjd_gram(g)
    rows = np.eye(10) / 10 if name == "upgrad" else np.full((1, 10), 0.1)
    expected = sum(box_qp_reference(m, u) for u in rows)
    _, w, _ = details(name, g, solver_iterations=50)  # few FISTA steps: the active-set steps finish
    np.testing.assert_allclose(w, expected, rtol=1e-7, atol=1e-9)


# ============================================================================================ all methods
@pytest.mark.parametrize("name", METHODS)
def test_zero_and_single_gradients_are_finite(name):
    losses = np.ones(3)
    d, w, state = details(name, np.zeros((3, 5)), losses=losses)
    np.testing.assert_allclose(d, 0.0, atol=1e-12)
    assert np.all(np.isfinite(w)) and all(np.all(np.isfinite(v)) for v in state.values())
    d, w, _ = details(name, np.array([[0.0, 3.0, 4.0]]), losses=np.ones(1))
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d / np.linalg.norm(d), [0.0, 0.6, 0.8], atol=1e-10)  # the direction of g
    d, w, _ = details(name, np.array([[1.0, 0.0], [1.0, 0.0]]))  # duplicates: no singular system
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))


@pytest.mark.parametrize("name", METHODS)
def test_compiled_matches_eager(name):
    import tensorflow as tf

    if keras.config.backend() != "tensorflow":
        pytest.skip("tf.function check")
    rng = np.random.default_rng(13)
    for k in (3, 10) if name in ("mgda", "upgrad") else (3,):
        g = random_gradients(rng, k, 7).astype("float32")
        method = build_gradient_method(name, k, **({"solver_iterations": 50} if k > 8 else {}))
        state = {key: tf.convert_to_tensor(v) for key, v in method.initial_state(7).items()}

        def run(gradients, step):
            return method.aggregate(gradients, None, state, step, 0)

        eager = run(tf.constant(g), tf.constant(1))
        compiled = tf.function(run, jit_compile=False)(tf.constant(g), tf.constant(1))
        for a, b in zip(tf.nest.flatten(eager), tf.nest.flatten(compiled)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
