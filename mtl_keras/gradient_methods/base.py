"""The interface of a gradient-based weighting and the numerics several methods share.

A :class:`GradientMethod` turns the per-task gradients of the shared parameters, a ``(K, P)`` matrix ``G`` (row k:
the gradient of task k's loss), into the update direction ``d`` (shape ``(P,)``) that the optimiser applies as the
shared parameters' gradient. It is written in ``keras.ops`` only, with every loop of fixed length
(``ops.fori_loop``), so one implementation runs eagerly, inside ``tf.function`` / XLA and under ``jax.jit`` on every
backend. Methods that keep state between steps (GradNorm's weights, GradVac's targets, MoCo's tracked gradients,
FAMO's logits, Nash-MTL's previous solution, ...) receive it as a dict of tensors and return the new dict: the
caller (``mtl_keras.weighting.GradientWeighting``) keeps it in variables, so it is checkpointed, resumed bit for bit
and identical on every replica.

Randomness (GradDrop, RLW, PCGrad's task order) is stateless in ``(seed, step)``: the same seed and step give the
same draw on every replica and after a resume.
"""

import keras
import numpy as np
from keras import ops

GRADIENT_METHODS = {}


def register_gradient_method(cls):
    """Class decorator: makes ``cls`` available under ``cls.name`` to ``aggregate`` and ``--weighting``."""
    if not cls.name or cls.name in GRADIENT_METHODS:
        raise ValueError(f"Gradient method name {cls.name!r} is empty or taken.")
    GRADIENT_METHODS[cls.name] = cls
    return cls


class GradientMethod:
    """Base class. Subclasses set the class attributes and implement ``aggregate`` (or ``loss_weights``).

    Class attributes:
        name: the registry and ``--weighting`` name (lower case, e.g. ``"pcgrad"``).
        defaults: ``{option: value}``, the paper's default hyper-parameters; the only accepted options.
        uses_gradients: False for methods whose weights depend on the losses only (GLS, RLW, STCH, FAMO): the
            trainer then takes one backward pass of ``sum_k w_k L_k`` instead of K.
        needs_losses: the method reads the task losses (then ``aggregate(..., losses=None)`` is an error).
        supports_rep_grad: the method is defined on the gradients of the shared representation (LibMTL's
            ``rep_grad=True``) as well as of the shared parameters. False where the state or the definition is per
            parameter (MoCo, GradNorm, ExcessMTL, ...).
        gradient_samples: independent gradient estimates the method needs per step (MoDo and SDMGrad: 3); the trainer
            splits each batch into that many parts and passes ``(S, K, P)``.
        needs_losses_after_step: FAMO: the trainer evaluates the losses again after the update and calls
            ``after_step``.
    """

    name = None
    defaults = {}
    uses_gradients = True
    needs_losses = False
    supports_rep_grad = True
    gradient_samples = 1
    needs_losses_after_step = False

    def __init__(self, num_tasks, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"Weighting {self.name!r} has no option(s) {unknown}; its options: {valid}.")
        self.num_tasks = int(num_tasks)
        if self.num_tasks < 1:
            raise ValueError(f"Weighting {self.name!r} needs at least one task, got {num_tasks}.")
        self.options = {**self.defaults, **options}
        for key, value in self.options.items():
            setattr(self, key, value)

    # ---------------------------------------------------------------------------------------------- state
    def initial_state(self, num_params):
        """``{name: numpy array}``: the state before the first step (``num_params``: P)."""
        return {}

    # ---------------------------------------------------------------------------------------------- the method
    def aggregate(self, gradients, losses, state, step, seed):
        """One step: ``(direction (P,), weights (K,) or None, new_state)``.

        Args:
            gradients: ``(K, P)`` per-task gradients (``(S, K, P)`` when ``gradient_samples > 1``).
            losses: ``(K,)`` task losses (no gradient), or None when the caller has none and ``needs_losses`` is
                False.
            state: ``{name: tensor}`` as ``initial_state`` describes.
            step: scalar int tensor, the number of updates made before this one (0 at the first step).
            seed: python int; with ``step`` it determines every random draw (see :func:`stateless_uniform`).
        The default, for loss-only methods: ``d = sum_k w_k g_k`` with ``w = loss_weights(...)``.
        """
        weights, state = self.loss_weights(losses, state, step, seed)
        gradients = ops.convert_to_tensor(gradients)
        return ops.matmul(ops.cast(weights, gradients.dtype), gradients), weights, state

    def loss_weights(self, losses, state, step, seed):
        """Loss-only methods: ``(weights (K,), new_state)``; the direction is ``sum_k w_k g_k``."""
        raise NotImplementedError(f"{type(self).__name__} needs the per-task gradients.")

    def after_step(self, losses_before, losses_after, state, step):
        """``needs_losses_after_step`` methods: the new state from the losses before and after the update."""
        return state

    def get_config(self):
        return dict(self.options)


# -------------------------------------------------------------------------------------------- shared numerics
def dtype_name(x):
    """The standard name ("float32", ...) of a tensor's dtype."""
    return keras.backend.standardize_dtype(x.dtype)


def safe_divide(numerator, denominator):
    """``numerator / denominator`` where the denominator is positive, else 0 (no inf/NaN for zero gradients)."""
    positive = denominator > 0
    return ops.where(positive, numerator / ops.where(positive, denominator, ops.ones_like(denominator)),
                     ops.zeros_like(numerator))


def gram(gradients):
    """``G G^T``, the (K, K) inner products of the task gradients."""
    return ops.matmul(gradients, ops.transpose(gradients))


def project_to_simplex(v):
    """The Euclidean projection of ``v`` (K,) onto ``{w >= 0, sum w = 1}`` (Duchi et al. 2008, sort based)."""
    v = ops.convert_to_tensor(v)
    k = v.shape[-1]
    u = ops.flip(ops.sort(v), axis=0)
    css = ops.cumsum(u)
    index = ops.arange(1, k + 1, dtype=v.dtype)
    candidates = u - (css - 1.0) / index > 0
    rho = ops.max(ops.where(candidates, index, ops.zeros_like(index)))
    theta = (ops.sum(ops.where(index <= rho, u, ops.zeros_like(u))) - 1.0) / rho
    return ops.maximum(v - theta, 0.0)


def min_norm_weights(gram_matrix, iterations=250, tolerance=1e-6):
    """The simplex weights ``w`` minimising ``||sum_k w_k g_k||^2 = w^T M w`` (MGDA's min-norm point).

    Frank-Wolfe with exact line search on ``M = G G^T`` (Sener & Koltun 2018, Alg. 2), ``iterations`` steps, no
    early exit (so the loop compiles to a fixed trip count; steps after convergence do not move ``w``). Starts from
    the uniform weights. For K = 2 the first step is already the exact solution of Sener & Koltun's Alg. 1.
    """
    m = ops.convert_to_tensor(gram_matrix)
    k = m.shape[0]
    dtype = m.dtype
    w0 = ops.full((k,), 1.0 / k, dtype=dtype)

    def body(_, w):
        mw = ops.matmul(m, w)
        t = ops.argmin(mw)
        e_t = ops.one_hot(t, k, dtype=dtype)
        # minimise over gamma in [0, 1] the norm of (1 - gamma) w + gamma e_t:
        # ||v1||^2 = w^T M w, ||v2||^2 = M_tt, <v1, v2> = (M w)_t
        v1v1 = ops.sum(w * mw)
        v1v2 = ops.sum(e_t * mw)
        v2v2 = ops.sum(e_t * ops.matmul(m, e_t))
        denominator = v1v1 - 2.0 * v1v2 + v2v2
        gamma = ops.where(denominator > tolerance * ops.maximum(v1v1, 1e-30),
                          (v1v1 - v1v2) / ops.where(denominator > 0, denominator, ops.ones_like(denominator)),
                          ops.zeros_like(denominator))
        gamma = ops.clip(gamma, 0.0, 1.0)
        return (1.0 - gamma) * w + gamma * e_t

    return ops.fori_loop(0, int(iterations), body, w0)


# -------------------------------------------------------------------------------------------- stateless random
def _seed_pair(seed, step, stream):
    return int(seed) * 1_000_003 + int(stream) * 7919, step


def stateless_uniform(shape, seed, step, stream=0, dtype="float32"):
    """Uniform [0, 1) numbers determined by ``(seed, step, stream)`` only: no generator state, so identical on every
    replica, after a resume and inside compiled steps (``step`` may be a traced tensor). ``stream`` separates the
    draws of one method within a step."""
    backend = keras.config.backend()
    base, step = _seed_pair(seed, step, stream)
    if backend == "tensorflow":
        import tensorflow as tf

        pair = tf.stack([tf.constant(base % (2 ** 31 - 1), tf.int64), tf.cast(step, tf.int64)])
        # philox named: the default algorithm differs under XLA, which would change the draws with jit_compile
        return tf.random.stateless_uniform(tuple(shape), seed=pair, dtype=dtype, alg="philox")
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(base % (2 ** 31 - 1)), ops.cast(step, "int32"))
        return jax.random.uniform(key, tuple(shape), dtype=dtype)
    if backend == "torch":
        import torch

        generator = torch.Generator().manual_seed(base % (2 ** 31 - 1) * 1_000_033 + int(step))
        values = torch.rand(tuple(shape), generator=generator, dtype=getattr(torch, dtype))
        return ops.convert_to_tensor(values)
    # numpy backend
    rng = np.random.default_rng([base % (2 ** 31 - 1), int(step)])
    return rng.random(tuple(shape)).astype(dtype)


def stateless_normal(shape, seed, step, stream=0, dtype="float32"):
    """Standard normal numbers from :func:`stateless_uniform` (Box-Muller), with the same guarantees."""
    shape = tuple(shape)
    size = int(np.prod(shape)) if shape else 1
    u = stateless_uniform((2, size), seed, step, stream, dtype)
    u1 = ops.maximum(u[0], 1e-12)
    z = ops.sqrt(-2.0 * ops.log(u1)) * ops.cos(2.0 * np.pi * u[1])
    return ops.reshape(z, shape)


def stateless_permutation(n, seed, step, stream=0):
    """A random permutation of ``range(n)`` (int32 tensor) determined by ``(seed, step, stream)``."""
    return ops.cast(ops.argsort(stateless_uniform((n,), seed, step, stream)), "int32")
