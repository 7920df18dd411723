"""Loss-based weightings (EW, GLS, RLW, STCH, FAMO): each against its paper's formula, derived independently here."""

import keras
import numpy as np
import pytest
from keras import ops

from mtl_keras.gradient_methods import GRADIENT_METHODS, aggregate, build_gradient_method

METHODS = ["equal", "gls", "rlw", "stch", "famo"]
# float64 inputs stay float64 except under JAX without jax_enable_x64, where they become float32
FLOAT = keras.backend.standardize_dtype(ops.convert_to_tensor(np.zeros(1)).dtype)


def tol(rtol):
    """``rtol`` for float64 results, loosened to float32 precision where float64 is unavailable."""
    return rtol if FLOAT == "float64" else max(rtol, 2e-5)


def np_(x):
    return ops.convert_to_numpy(x)


def numeric_gradient(f, x, h=1e-6):
    """Central differences of the scalar function ``f`` at ``x`` (float64)."""
    x = np.asarray(x, dtype="float64")
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def details(name, gradients, losses=None, **kwargs):
    d, w, s = aggregate(name, gradients, losses=losses, return_details=True, **kwargs)
    return np_(d), np_(w), {k: np_(v) for k, v in s.items()}


def test_registered_with_truthful_flags():
    for name in METHODS:
        cls = GRADIENT_METHODS[name]
        assert cls.uses_gradients is False
        assert cls.gradient_samples == 1
        assert cls.needs_losses == (name not in ("equal", "rlw"))
        assert cls.needs_losses_after_step == (name == "famo")


# ------------------------------------------------------------------------------------------------------- EW
def test_ew_is_the_plain_sum():
    g = np.random.default_rng(0).normal(size=(3, 7))
    d, w, s = details("equal", g)
    np.testing.assert_allclose(w, np.ones(3))
    np.testing.assert_allclose(d, g.sum(0), rtol=tol(1e-12))
    assert s == {} and d.dtype == FLOAT


# ------------------------------------------------------------------------------------------------------- GLS
def test_gls_weights_are_the_gradient_of_the_geometric_mean():
    losses = np.array([0.3, 2.5, 1.1, 7.0])
    g = np.random.default_rng(1).normal(size=(4, 5))
    d, w, _ = details("gls", g, losses)
    expected = numeric_gradient(lambda x: np.prod(x) ** (1 / 4), losses)
    np.testing.assert_allclose(w, expected, rtol=tol(1e-7))
    np.testing.assert_allclose(d, expected @ g, rtol=tol(1e-7))
    # equal losses: 1/K each; Euler: sum_k w_k L_k = GLS for any losses
    np.testing.assert_allclose(details("gls", g, np.full(4, 3.0))[1], np.full(4, 0.25), rtol=tol(1e-12))
    rng = np.random.default_rng(2)
    for _ in range(5):
        losses = rng.uniform(0.01, 10, 4)
        w = details("gls", g, losses)[1]
        np.testing.assert_allclose(w @ losses, np.prod(losses) ** 0.25, rtol=tol(1e-10))


def test_gls_is_safe_where_the_product_underflows():
    losses = np.array([1e-30, 1e-30, 1e-30, 1e-30, 1e-30, 2.0], dtype="float32")  # product 0 in float32
    g = np.ones((6, 3), dtype="float32")
    d, w, _ = details("gls", g, losses)
    expected = np.exp(np.mean(np.log(losses.astype("float64"))) - np.log(losses.astype("float64"))) / 6
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(d))
    np.testing.assert_allclose(w, expected, rtol=1e-4)
    assert np.all(np.isfinite(details("gls", g, np.zeros(6, "float32"))[1]))


# ------------------------------------------------------------------------------------------------------- RLW
def test_rlw_is_softmax_of_a_standard_normal_draw():
    method = build_gradient_method("rlw", 4)
    draws = np.stack([np_(method.loss_weights(None, {}, ops.convert_to_tensor(t, "int32"), 3)[0])
                      for t in range(200)])
    assert np.all(draws > 0)
    np.testing.assert_allclose(draws.sum(1), 1.0, rtol=1e-6)  # not multiplied by K (the paper, LibMTL)
    # log w = z - logsumexp(z): the centred logs are the centred normal draws, each with variance (K-1)/K
    centred = np.log(draws) - np.log(draws).mean(1, keepdims=True)
    assert abs(centred.std() - np.sqrt(3 / 4)) < 0.08
    assert abs(centred.mean()) < 1e-6
    np.testing.assert_allclose(draws.mean(0), 0.25, atol=0.05)  # 200 draws: sd of a mean ~0.013


def test_rlw_is_deterministic_in_seed_and_step():
    g = np.random.default_rng(3).normal(size=(3, 4))
    a = details("rlw", g, step=5, seed=1)
    np.testing.assert_array_equal(a[1], details("rlw", g, step=5, seed=1)[1])
    assert not np.allclose(a[1], details("rlw", g, step=6, seed=1)[1])
    assert not np.allclose(a[1], details("rlw", g, step=5, seed=2)[1])
    np.testing.assert_allclose(a[0], a[1] @ g, rtol=tol(1e-6))


# ------------------------------------------------------------------------------------------------------- STCH
def stch_official_total(losses, nadir, mu):
    """The authors' (and LibMTL's) STCH loss after the warm-up, in numpy."""
    u = np.log(losses / nadir + 1e-20)
    reg = u - np.max(u)  # a constant shift in the official code (detached), it does not change the gradient
    return mu * np.log(np.sum(np.exp(reg / mu))) * len(losses) + np.max(u) * len(losses)


@pytest.mark.parametrize("mu", [1.0, 0.3])
def test_stch_weights_after_warmup_are_the_gradient_of_the_official_loss(mu):
    losses = np.array([0.8, 2.0, 0.05])
    nadir = np.array([1.0, 1.5, 0.1])
    g = np.random.default_rng(4).normal(size=(3, 6))
    d, w, s = details("stch", g, losses, state={"nadir": nadir.astype("float32")}, step=10, mu=mu,
                      warmup_steps=10, nadir_steps=5)
    nadir32 = nadir.astype("float32").astype("float64")
    expected = numeric_gradient(lambda x: stch_official_total(x, nadir32, mu), losses, h=1e-7)
    np.testing.assert_allclose(w, expected, rtol=tol(1e-6))
    np.testing.assert_allclose(d, expected @ g, rtol=tol(1e-6))
    np.testing.assert_allclose(w @ losses, 3.0, rtol=tol(1e-12))  # sum_k w_k L_k = K
    np.testing.assert_allclose(s["nadir"], nadir.astype("float32"))  # fixed after the warm-up


def test_stch_small_mu_is_tchebycheff():
    losses = np.array([1.0, 3.0, 2.0])
    nadir = np.array([1.0, 2.0, 0.5])  # normalised: 1, 1.5, 4 -> task 2 is the worst
    w = details("stch", np.eye(3), losses, state={"nadir": nadir.astype("float32")}, step=0, mu=1e-3,
                warmup_steps=0, nadir_steps=0)[1]
    np.testing.assert_allclose(w, [0.0, 0.0, 3.0 / 2.0], atol=1e-10)  # K / L_worst on the worst task only


def test_stch_warmup_and_nadir_estimation_over_steps():
    method = build_gradient_method("stch", 2, warmup_steps=4, nadir_steps=2)
    state = {k: ops.convert_to_tensor(v) for k, v in method.initial_state(5).items()}
    history = [np.array([4.0, 1.0]), np.array([2.0, 0.5]), np.array([1.0, 0.2]), np.array([3.0, 0.4]),
               np.array([2.0, 0.3])]
    nadirs, weights = [], []
    for step, losses in enumerate(history):
        w, state = method.loss_weights(ops.convert_to_tensor(losses), state, ops.convert_to_tensor(step, "int32"), 0)
        nadirs.append(np_(state["nadir"]))
        weights.append(np_(w))
        assert state["nadir"].dtype == "float32" or str(state["nadir"].dtype).endswith("float32'>")
    # steps 0-3: warm-up, minimise sum_k log L_k (weights 1/L_k); nadir averaged over steps 2 and 3 only
    for step in range(4):
        np.testing.assert_allclose(weights[step], 1.0 / history[step], rtol=1e-6)
    np.testing.assert_allclose(nadirs[0], [1.0, 1.0])
    np.testing.assert_allclose(nadirs[1], [1.0, 1.0])
    np.testing.assert_allclose(nadirs[2], [1.0, 0.2], rtol=1e-6)
    np.testing.assert_allclose(nadirs[3], [2.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(nadirs[4], [2.0, 0.3], rtol=1e-6)
    # step 4: STCH with n = (2, 0.3): u = log(1, 1) -> softmax (1/2, 1/2) -> w_k = 2 * 1/2 / L_k
    np.testing.assert_allclose(weights[4], [0.5, 1 / 0.3], rtol=1e-5)


def test_stch_options_are_validated():
    with pytest.raises(ValueError, match="nadir_steps"):
        build_gradient_method("stch", 2, warmup_steps=5, nadir_steps=6)
    with pytest.raises(ValueError, match="no option"):
        build_gradient_method("stch", 2, warmup_epoch=3)


# ------------------------------------------------------------------------------------------------------- FAMO
def test_famo_direction_weights():
    losses = np.array([0.5, 2.0, 1.0])
    g = np.random.default_rng(5).normal(size=(3, 4))
    d, w, s = details("famo", g, losses)
    inverse = 1 / (losses + 1e-8)
    np.testing.assert_allclose(w, inverse / inverse.sum(), rtol=tol(1e-10))  # xi = 0: normalised gradient of sum log L
    np.testing.assert_allclose(d, w @ g, rtol=tol(1e-10))
    logits = np.array([0.3, -1.0, 0.5], dtype="float32")
    state = {"logits": logits, "adam_m": np.zeros(3, "float32"), "adam_v": np.zeros(3, "float32"),
             "adam_t": np.zeros((), "int32")}
    w = details("famo", g, losses, state=state)[1]
    z = np.exp(logits.astype("float64")) / np.exp(logits.astype("float64")).sum()
    c = 1 / np.sum(z / (losses + 1e-8))
    np.testing.assert_allclose(w, c * z / (losses + 1e-8), rtol=tol(1e-6))  # paper: c_t sum_i z_i / l_i grad l_i


def famo_reference(history, w_lr, w_gamma):
    """The authors' famo.py update in numpy: the softmax VJP of the log-loss decrease, then one step of
    torch.optim.Adam(lr=w_lr, weight_decay=w_gamma) as torch documents it (L2 term added to the gradient)."""
    k = len(history[0][0])
    w, m, v = np.zeros(k), np.zeros(k), np.zeros(k)
    logits = []
    for t, (before, after) in enumerate(history, start=1):
        delta = np.log(before + 1e-8) - np.log(after + 1e-8)
        z = np.exp(w) / np.exp(w).sum()
        grad = (np.diag(z) - np.outer(z, z)).T @ delta + w_gamma * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        w = w - w_lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        logits.append(w.copy())
    return logits


def test_famo_logit_updates_match_the_authors_adam_rule():
    history = [(np.array([1.0, 2.0, 0.5]), np.array([0.8, 1.9, 0.5])),
               (np.array([0.9, 1.8, 0.6]), np.array([0.85, 1.5, 0.55])),
               (np.array([0.7, 1.6, 0.5]), np.array([0.71, 1.55, 0.3]))]
    expected = famo_reference(history, 0.025, 1e-3)
    method = build_gradient_method("famo", 3)
    state = {k: ops.convert_to_tensor(v) for k, v in method.initial_state(10).items()}
    for step, ((before, after), logits) in enumerate(zip(history, expected)):
        state = method.after_step(ops.convert_to_tensor(before), ops.convert_to_tensor(after), state, step)
        np.testing.assert_allclose(np_(state["logits"]), logits, rtol=2e-5, atol=1e-7)
        assert int(np_(state["adam_t"])) == step + 1
        assert keras.backend.standardize_dtype(state["logits"].dtype) == "float32"
        assert keras.backend.standardize_dtype(state["adam_t"].dtype) == "int32"
    # after the first step the task that improved most (task 0, by log 1.25) lost weight, the stalled one gained
    first = expected[0]
    assert first[0] < 0 and first[2] > 0


def test_famo_sgd_is_algorithm_1():
    before, after = np.array([1.0, 2.0]), np.array([0.5, 1.9])
    xi = np.array([0.2, -0.1])
    state = {"logits": xi.astype("float32"), "adam_m": np.zeros(2, "float32"), "adam_v": np.zeros(2, "float32"),
             "adam_t": np.zeros((), "int32")}
    method = build_gradient_method("famo", 2, optimizer="sgd", w_lr=0.1, w_gamma=0.01)
    new = method.after_step(ops.convert_to_tensor(before), ops.convert_to_tensor(after),
                            {k: ops.convert_to_tensor(v) for k, v in state.items()}, 0)
    xi = xi.astype("float32").astype("float64")
    z = np.exp(xi) / np.exp(xi).sum()
    jacobian = np.diag(z) - np.outer(z, z)  # d softmax / d xi
    delta = np.log(before + 1e-8) - np.log(after + 1e-8)
    np.testing.assert_allclose(np_(new["logits"]), xi - 0.1 * (jacobian.T @ delta + 0.01 * xi), rtol=tol(1e-6))


# ------------------------------------------------------------------------------------------------------- all
@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_and_degenerate_losses_stay_finite(name):
    for k in (1, 6):
        zero = np.zeros((k, 5), "float32")
        for losses in (np.zeros(k, "float32"), np.full(k, 1e-12, "float32"), np.full(k, 1e6, "float32"),
                       -np.ones(k, "float32")):
            for step in (0, 200):
                d, w, s = details(name, zero, losses, step=step)
                assert np.all(np.isfinite(w)) and np.all(d == 0)
                assert all(np.all(np.isfinite(v)) for v in s.values())


@pytest.mark.parametrize("name", METHODS)
def test_state_keeps_keys_shapes_and_dtypes(name):
    method = build_gradient_method(name, 3)
    initial = method.initial_state(4)
    g = np.random.default_rng(6).normal(size=(3, 4))
    _, w, state = details(name, g, np.array([1.0, 2.0, 3.0]), step=150)
    assert w.shape == (3,) and w.dtype == FLOAT
    assert set(state) == set(initial)
    for key, value in initial.items():
        assert state[key].shape == value.shape and state[key].dtype == value.dtype
    if name == "famo":
        after = method.after_step(ops.convert_to_tensor([1.0, 2.0, 3.0]), ops.convert_to_tensor([0.9, 2.0, 2.0]),
                                  {k: ops.convert_to_tensor(v) for k, v in initial.items()}, 0)
        for key, value in initial.items():
            assert np_(after[key]).shape == value.shape and np_(after[key]).dtype == value.dtype


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.function")
@pytest.mark.parametrize("name", METHODS)
def test_compiled_matches_eager(name):
    import tensorflow as tf

    rng = np.random.default_rng(7)
    g = rng.normal(size=(4, 9)).astype("float32")
    options = {"warmup_steps": 3, "nadir_steps": 2} if name == "stch" else {}
    method = build_gradient_method(name, 4, **options)

    def run(losses, state, step):
        d, w, new_state = method.aggregate(ops.convert_to_tensor(g), losses, state, step, 11)
        if name == "famo":
            new_state = method.after_step(losses, losses * tf.constant([0.8, 0.95, 1.0, 0.6]), new_state, step)
        return d, w, new_state

    compiled = tf.function(run, jit_compile=False)
    eager_state = {k: tf.constant(v) for k, v in method.initial_state(9).items()}
    compiled_state = dict(eager_state)
    for step in range(5):
        losses = tf.constant(rng.uniform(0.1, 3.0, 4).astype("float32"))
        step_tensor = tf.constant(step, tf.int32)
        d1, w1, eager_state = run(losses, eager_state, step_tensor)
        d2, w2, compiled_state = compiled(losses, compiled_state, step_tensor)
        np.testing.assert_allclose(np_(d1), np_(d2), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np_(w1), np_(w2), rtol=1e-5, atol=1e-7)
        for key in eager_state:
            np.testing.assert_allclose(np_(eager_state[key]), np_(compiled_state[key]), rtol=1e-5, atol=1e-7)
