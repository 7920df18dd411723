"""PCGrad, GradVac, GradDrop, CAGrad, Aligned-MTL and ConFIG (mtl_keras.gradient_methods.projection).

Each method is checked against its paper's definition: a hand-computed case, a plain numpy re-implementation of the
paper's formula (vectors, not the Gram-matrix arithmetic of the module), the property the paper states, and the
compiled result against the eager one.
"""

import keras
import numpy as np
import pytest
from keras import ops
from scipy.optimize import minimize

from mtl_keras.gradient_methods import aggregate, build_gradient_method
from mtl_keras.gradient_methods.base import stateless_permutation, stateless_uniform
from mtl_keras.gradient_methods.projection import aligned_mtl_transform, cagrad_inner_weights

METHODS = ["pcgrad", "gradvac", "graddrop", "cagrad", "aligned_mtl", "config"]
RANDOM_METHODS = ["pcgrad", "gradvac", "graddrop"]


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def compiled(fn):
    """``fn`` compiled on the current backend (tf.function / jax.jit), as the trainer runs it."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=False)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def details(name, gradients, **kwargs):
    """``(direction, weights, state)`` as numpy. CAGrad runs compiled: its 250 solver iterations take seconds
    eagerly (test_compiled_matches_eager covers its eager run)."""
    if name == "cagrad":
        run = compiled(lambda g: aggregate(name, g, return_details=True, **kwargs))
        direction, weights, state = run(ops.convert_to_tensor(gradients))
    else:
        direction, weights, state = aggregate(name, gradients, return_details=True, **kwargs)
    return np_(direction), None if weights is None else np_(weights), {k: np_(v) for k, v in state.items()}


def orders(num_tasks, seed, step):
    """The task orders PCGrad and GradVac use: task i's is ``stateless_permutation`` with stream i."""
    return [list(np_(stateless_permutation(num_tasks, seed, step, stream=i))) for i in range(num_tasks)]


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -------------------------------------------------------------------------- reference implementations (numpy)
def np_pcgrad(g, task_orders):
    """Yu et al. 2020, Alg. 1, on the vectors."""
    total = np.zeros(g.shape[1])
    for i in range(len(g)):
        pc = g[i].copy()
        for j in task_orders[i]:
            if j != i and pc @ g[j] < 0:
                pc = pc - (pc @ g[j]) / (g[j] @ g[j]) * g[j]
        total += pc
    return total


def np_gradvac(g, phi_hat, task_orders, beta):
    """Wang et al. 2021, Alg. 1 (Eq. 5 and the EMA of the targets), on the vectors."""
    phi_hat = phi_hat.astype(np.float64).copy()
    total = np.zeros(g.shape[1])
    for i in range(len(g)):
        pc = g[i].copy()
        for j in task_orders[i]:
            if j == i:
                continue
            phi, target = cosine(pc, g[j]), phi_hat[i, j]
            if phi < target:
                pc = pc + (np.linalg.norm(pc) * (target * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - target ** 2))
                           / (np.linalg.norm(g[j]) * np.sqrt(1 - target ** 2))) * g[j]
            phi_hat[i, j] = (1 - beta) * target + beta * phi
        total += pc
    return total, phi_hat


def cagrad_objective(w, m, c):
    return float(w @ m @ np.full(len(w), 1 / len(w)) + c * np.sqrt(np.mean(m)) * np.sqrt(max(w @ m @ w, 0.0)))


def scipy_cagrad_weights(m, c):
    """The official solver (SLSQP on the simplex), from several starts, tight tolerance."""
    k = len(m)
    best = None
    for start in [np.full(k, 1 / k)] + [0.9 * np.eye(k)[i] + 0.1 / k for i in range(k)]:
        result = minimize(cagrad_objective, start, args=(m, c), method="SLSQP", bounds=[(0, 1)] * k,
                          constraints={"type": "eq", "fun": lambda x: 1 - np.sum(x)},
                          options={"ftol": 1e-15, "maxiter": 1000})
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def np_cagrad_direction(g, w, c):
    g0 = g.mean(axis=0)
    gw = w @ g
    return g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw


def np_config(g):
    """ConFIG (Liu et al. 2025, Eq. 2 with the projection length), with numpy's pseudo-inverse."""
    units = g / np.linalg.norm(g, axis=1, keepdims=True)
    best = np.linalg.pinv(units) @ np.ones(len(g))
    unit = best / np.linalg.norm(best)
    return np.sum(g @ unit) * unit


# -------------------------------------------------------------------------------------------------- PCGrad
def test_pcgrad_hand_case():
    # g1 . g2 = -1 < 0: g1^PC = g1 + g2/2 = (0.5, 0.5), g2^PC = g2 + g1 = (0, 1), d = (0.5, 1.5)
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    direction, weights, _ = details("pcgrad", g)
    np.testing.assert_allclose(direction, [0.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(weights, [2.0, 1.5], atol=1e-12)  # d = 2 g1 + 1.5 g2
    # no conflict: the plain sum
    np.testing.assert_allclose(details("pcgrad", np.array([[1.0, 0.0], [1.0, 1.0]]))[0], [2.0, 1.0], atol=1e-12)


def test_pcgrad_two_tasks_no_conflict_left():
    """Paper, Sec. 2.3 / Thm. 1's setting: after the surgery neither projected gradient conflicts with the other
    task's gradient, so the update does not increase either loss to first order (d . g_i >= 0)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = rng.normal(size=(2, 6))
        direction, weights, _ = details("pcgrad", g)
        pc1, pc2 = g[0] + (weights[1] - 1) * g[1], g[1] + (weights[0] - 1) * g[0]
        np.testing.assert_allclose(pc1 + pc2, direction, atol=1e-12)
        assert pc1 @ g[1] >= -1e-12 and pc2 @ g[0] >= -1e-12
        assert direction @ g[0] >= -1e-12 and direction @ g[1] >= -1e-12


@pytest.mark.parametrize("num_tasks", [3, 5])
def test_pcgrad_matches_vector_reference(num_tasks):
    rng = np.random.default_rng(num_tasks)
    g = rng.normal(size=(num_tasks, 7))
    for step in (0, 4):
        direction, weights, _ = details("pcgrad", g, seed=3, step=step)
        np.testing.assert_allclose(direction, np_pcgrad(g, orders(num_tasks, 3, step)), atol=1e-10)
        np.testing.assert_allclose(weights @ g, direction, atol=1e-10)


# -------------------------------------------------------------------------------------------------- GradVac
def test_gradvac_first_step_is_pcgrad_and_targets_follow_the_cosine():
    """With the targets at their initial 0, the adjustment (Eq. 5) is PCGrad's projection; the targets then move
    by beta towards the observed cosine."""
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    direction, weights, state = details("gradvac", g, beta=0.5)
    np.testing.assert_allclose(direction, [0.5, 1.5], atol=1e-12)
    expected = 0.5 * (-1 / np.sqrt(2))
    np.testing.assert_allclose(state["phi_hat"], [[0.0, expected], [expected, 0.0]], atol=1e-7)
    assert state["phi_hat"].dtype == np.float32


def test_gradvac_reaches_the_target_cosine():
    """Eq. 5: when cos(g_i, g_j) is below the target, the adjusted g_i has exactly the target cosine with g_j."""
    rng = np.random.default_rng(1)
    targets = np.array([[0.0, 0.5], [0.3, 0.0]], np.float32)
    for _ in range(10):
        g = rng.normal(size=(2, 5))
        _, weights, state = details("gradvac", g, state={"phi_hat": targets}, beta=0.1)
        adjusted = [g[0] + (weights[1] - 1) * g[1], g[1] + (weights[0] - 1) * g[0]]
        phi = cosine(g[0], g[1])
        for i, j in ((0, 1), (1, 0)):
            if phi < targets[i, j]:
                np.testing.assert_allclose(cosine(adjusted[i], g[j]), targets[i, j], atol=1e-6)
            else:
                np.testing.assert_allclose(adjusted[i], g[i], atol=1e-12)
        np.testing.assert_allclose(state["phi_hat"], 0.9 * targets + 0.1 * (1 - np.eye(2)) * phi, atol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_gradvac_state_over_three_steps_matches_reference(num_tasks):
    rng = np.random.default_rng(10 + num_tasks)
    method = build_gradient_method("gradvac", num_tasks, beta=0.3)
    state = method.initial_state(6)
    assert set(state) == {"phi_hat"} and state["phi_hat"].shape == (num_tasks, num_tasks)
    reference = state["phi_hat"].astype(np.float64)
    for step in range(3):
        g = rng.normal(size=(num_tasks, 6)) + 0.5  # partly aligned, so targets turn positive
        direction, weights, state = details("gradvac", g, state=state, step=step, seed=7, beta=0.3)
        expected, reference = np_gradvac(g, reference, orders(num_tasks, 7, step), 0.3)
        np.testing.assert_allclose(direction, expected, atol=1e-6)
        np.testing.assert_allclose(weights @ g, direction, atol=1e-10)
        np.testing.assert_allclose(state["phi_hat"], reference, atol=1e-6)
        assert state["phi_hat"].dtype == np.float32
    assert np.all(np.diag(state["phi_hat"]) == 0)


def test_gradvac_default_beta_is_the_papers():
    assert build_gradient_method("gradvac", 2).beta == 0.01
    assert not build_gradient_method("gradvac", 2).supports_rep_grad


# -------------------------------------------------------------------------------------------------- GradDrop
def test_graddrop_hand_case_against_the_formula():
    g = np.array([[1.0, -2.0, 3.0, 0.0, -1.0], [-3.0, -1.0, 1.0, 0.0, 0.5]])
    direction = details("graddrop", g, seed=5, step=2)[0]
    purity = 0.5 * (1 + np.array([-2 / 4, -1.0, 1.0, 0.0, -0.5 / 1.5]))
    purity[3] = 0.5
    u = np_(stateless_uniform((5,), 5, 2, stream=0)).astype(np.float64)
    mask = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
    np.testing.assert_allclose(direction, np.sum(mask * g, axis=0), atol=1e-12)
    # same-sign coordinates (purity 0 or 1) are always kept whole
    np.testing.assert_allclose(direction[1:4], [-3.0, 4.0, 0.0], atol=1e-12)


def test_graddrop_keeps_one_sign_with_probability_purity():
    """Per coordinate the result is the sum of the positive or of the negative parts, the positive one with
    probability P = 0.5 (1 + sum g / sum |g|) (here 0.75)."""
    g = np.tile(np.array([[3.0], [-1.0]]), (1, 4000))
    direction = details("graddrop", g, seed=0, step=11)[0]
    assert set(np.unique(direction)) <= {3.0, -1.0}
    assert abs(np.mean(direction == 3.0) - 0.75) < 0.03
    rng = np.random.default_rng(2)
    g = rng.normal(size=(3, 50))
    direction = details("graddrop", g, seed=1, step=0)[0]
    positive, negative = np.sum(np.maximum(g, 0), axis=0), np.sum(np.minimum(g, 0), axis=0)
    assert np.all(np.isclose(direction, positive, rtol=1e-12, atol=1e-15)
                  | np.isclose(direction, negative, rtol=1e-12, atol=1e-15))
    # leak = 1: nothing dropped
    np.testing.assert_allclose(details("graddrop", g, leak=1.0)[0], g.sum(axis=0), atol=1e-12)
    # leak = 0.2: the dropped part leaks through at 0.2
    leaky = details("graddrop", g, leak=0.2, seed=1, step=0)[0]
    kept = np.where(np.abs(direction - positive) < np.abs(direction - negative), positive, negative)
    np.testing.assert_allclose(leaky, kept + 0.2 * (g.sum(axis=0) - kept), atol=1e-12)


# -------------------------------------------------------------------------------------------------- CAGrad
def test_cagrad_hand_case():
    # orthogonal unit gradients: by symmetry w = (1/2, 1/2), g_w = g0, d = (1 + c) g0, rescaled by 1 / (1 + c^2)
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    direction, weights, _ = details("cagrad", g)
    np.testing.assert_allclose(direction, [0.5 * 1.4 / 1.16] * 2, atol=1e-8)
    np.testing.assert_allclose(weights, [0.5 * 1.4 / 1.16] * 2, atol=1e-8)
    method = build_gradient_method("cagrad", 2)
    assert (method.c, method.rescale) == (0.4, 1)


def test_cagrad_inner_solution_matches_scipy():
    rng = np.random.default_rng(3)
    for num_tasks in (2, 3, 4, 6):
        solve = compiled(lambda m: cagrad_inner_weights(m, 0.4, 250))
        for trial in range(4):
            g = rng.normal(size=(num_tasks, int(rng.integers(2, 10))))
            if trial == 3:  # very different norms
                g *= 10.0 ** rng.uniform(-1.5, 1.5, size=(num_tasks, 1))
            m = g @ g.T
            ours = np_(solve(ops.convert_to_tensor(m)))
            reference = scipy_cagrad_weights(m, 0.4)
            assert np.all(ours >= 0) and abs(ours.sum() - 1) < 1e-10
            scale = np.mean(m)
            assert cagrad_objective(ours, m, 0.4) <= cagrad_objective(reference, m, 0.4) + 1e-7 * scale
            if trial < 3:
                np.testing.assert_allclose(np_cagrad_direction(g, ours, 0.4), np_cagrad_direction(g, reference, 0.4),
                                           atol=1e-4 * np.linalg.norm(g.mean(axis=0)))


def test_cagrad_maximises_the_worst_improvement_in_the_ball():
    """The paper's primal problem: d maximises min_i g_i . d over ||d - g0|| <= c ||g0|| (rescale=0: Alg. 1's d)."""
    rng = np.random.default_rng(4)
    run = compiled(lambda g: aggregate("cagrad", g, rescale=0))
    for _ in range(3):
        g = rng.normal(size=(3, 4))
        d = np_(run(ops.convert_to_tensor(g)))
        g0 = g.mean(axis=0)
        radius = 0.4 * np.linalg.norm(g0)
        np.testing.assert_allclose(np.linalg.norm(d - g0), radius, rtol=1e-6)
        samples = rng.normal(size=(20000, 4))
        samples = g0 + radius * samples / np.linalg.norm(samples, axis=1, keepdims=True) * rng.uniform(
            size=(20000, 1)) ** 0.25
        best_sampled = np.max(np.min(samples @ g.T, axis=1))
        assert np.min(g @ d) >= best_sampled - 1e-9
        assert np.min(g @ d) <= best_sampled + 0.05 * radius * np.max(np.linalg.norm(g, axis=1))


def test_cagrad_c_zero_is_the_mean_gradient_and_rescale_options():
    g = np.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])
    np.testing.assert_allclose(details("cagrad", g, c=0.0)[0], g.mean(axis=0), atol=1e-12)
    d0 = details("cagrad", g, rescale=0)[0]
    np.testing.assert_allclose(details("cagrad", g, rescale=2)[0], d0 / 1.4, atol=1e-12)
    with pytest.raises(ValueError, match="rescale"):
        build_gradient_method("cagrad", 2, rescale=3)


# -------------------------------------------------------------------------------------------------- Aligned-MTL
def test_aligned_mtl_hand_case():
    # orthogonal gradients of norms 1 and 2: lambda_min = 1, B = diag(1, 1/2): the aligned gradients are g1, g2 / 2
    g = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    direction, weights, _ = details("aligned_mtl", g)
    np.testing.assert_allclose(direction, [1.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(weights, [1.0, 0.5], atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 8), (5, 6), (4, 2)])
def test_aligned_mtl_gradients_have_condition_number_one(shape):
    """Aligned gradients B G are orthogonal with equal norms sqrt(lambda_min) (on the span of G when K > rank)."""
    rng = np.random.default_rng(shape[0])
    g = rng.normal(size=shape)
    b = np_(aligned_mtl_transform(ops.convert_to_tensor(g @ g.T)))
    aligned = b @ g
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    rank = int(np.sum(s > s[0] * 1e-6))
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    np.testing.assert_allclose(aligned @ aligned.T, s[-1] ** 2 * (u @ u.T), atol=1e-9)
    np.testing.assert_allclose(np.linalg.svd(aligned, compute_uv=False)[:rank], s[-1], rtol=1e-9)
    direction = details("aligned_mtl", g)[0]
    np.testing.assert_allclose(direction, np.ones(shape[0]) @ (s[-1] * u @ vt), atol=1e-9)


def test_aligned_mtl_scale_modes():
    g = np.diag([1.0, 2.0, 4.0])  # eigenvalues 1, 4, 16; aligned rows: sqrt(scale) e_i
    for mode, scale in (("min", 1.0), ("median", 4.0), ("rmse", 7.0)):
        np.testing.assert_allclose(details("aligned_mtl", g, scale_mode=mode)[0], [np.sqrt(scale)] * 3, atol=1e-9)
    with pytest.raises(ValueError, match="scale_mode"):
        build_gradient_method("aligned_mtl", 2, scale_mode="max")


# -------------------------------------------------------------------------------------------------- ConFIG
def test_config_hand_case():
    # unit gradients e1, e2: g_c = e1 + e2, its unit (1, 1)/sqrt 2, length (1 + 2)/sqrt 2: d = (1.5, 1.5)
    direction, weights, _ = details("config", np.array([[1.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_allclose(direction, [1.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(weights, [1.5, 0.75], atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5), (3, 4), (6, 10)])
def test_config_equal_positive_cosines(shape):
    """ConFIG's defining property: the update has the same positive cosine with every task gradient."""
    rng = np.random.default_rng(shape[0] * 7)
    g = rng.normal(size=shape) * rng.uniform(0.1, 10, size=(shape[0], 1))
    direction = details("config", g)[0]
    cosines = [cosine(direction, row) for row in g]
    assert min(cosines) > 0
    np.testing.assert_allclose(cosines, cosines[0], atol=1e-9)
    np.testing.assert_allclose(direction, np_config(g), atol=1e-8)


# -------------------------------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_are_deterministic_in_seed_and_step(name):
    rng = np.random.default_rng(5)
    g = rng.normal(size=(4, 12))
    first = details(name, g, seed=1, step=3)[0]
    np.testing.assert_array_equal(details(name, g, seed=1, step=3)[0], first)
    others = [details(name, g, seed=1, step=s)[0] for s in range(4, 12)] + [details(name, g, seed=2, step=3)[0]]
    assert any(not np.allclose(first, other) for other in others)


@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_and_one_task(name):
    direction = details(name, np.zeros((3, 4)))[0]
    np.testing.assert_array_equal(direction, np.zeros(4))
    g = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])  # one zero task gradient: finite
    assert np.all(np.isfinite(details(name, g)[0]))
    g = np.array([[1.0, -2.0, 0.5]])
    expected = g[0] * (1.4 / 1.16 if name == "cagrad" else 1.0)
    np.testing.assert_allclose(details(name, g)[0], expected, atol=1e-7)


@pytest.mark.parametrize("name", METHODS)
def test_compiled_matches_eager(name):
    if keras.config.backend() != "tensorflow":
        pytest.skip("tf.function check")
    import tensorflow as tf

    rng = np.random.default_rng(6)
    g = tf.constant(rng.normal(size=(3, 9)).astype("float32"))
    method = build_gradient_method(name, 3)
    state = {k: tf.constant(v) for k, v in method.initial_state(9).items()}
    if "phi_hat" in state:
        state["phi_hat"] = tf.constant(rng.uniform(-0.5, 0.5, size=(3, 3)).astype("float32"))

    def run(gradients, state, step):
        return method.aggregate(gradients, None, state, step, 4)

    step = tf.constant(2, tf.int32)
    eager = run(g, state, step)
    graph = tf.function(run, jit_compile=False)(g, state, step)
    np.testing.assert_allclose(np_(graph[0]), np_(eager[0]), rtol=1e-5, atol=1e-5)
    if eager[1] is not None:
        np.testing.assert_allclose(np_(graph[1]), np_(eager[1]), rtol=1e-5, atol=1e-5)
    assert set(graph[2]) == set(state)
    for key in state:
        assert graph[2][key].dtype == state[key].dtype and graph[2][key].shape == state[key].shape
        np.testing.assert_allclose(np_(graph[2][key]), np_(eager[2][key]), atol=1e-6)
