"""The interface of a gradient-based weighting and the numerics several methods share.

A :class:`GradientMethod` turns the ``(K, P)`` per-task gradients of the shared parameters into the ``(P,)`` update
direction, in ``keras.ops`` with fixed-length loops (``ops.fori_loop``) so that it runs eagerly, under
``tf.function`` / XLA and ``jax.jit``. State is a dict of tensors in and out: ``mtl_keras.weighting.GradientWeighting``
keeps it in variables (checkpointed, identical on every replica). Randomness is stateless in ``(seed, step)``.
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
        name: the registry and ``--weighting`` name.
        defaults: ``{option: value}``, the paper's hyper-parameters; the only accepted options.
        uses_gradients: False for loss-only methods: the trainer takes one backward pass of ``sum_k w_k L_k``.
        needs_losses: the method reads the task losses.
        supports_rep_grad: also defined on the shared representation's gradients (LibMTL's ``rep_grad``).
        gradient_samples: independent gradient estimates per step (MoDo, SDMGrad: 3; then ``(S, K, P)``).
        needs_losses_after_step: the trainer calls ``after_step`` with the losses after the update (FAMO).
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

    def initial_state(self, num_params):
        """``{name: numpy array}``: the state before the first step (``num_params``: P)."""
        return {}

    def aggregate(self, gradients, losses, state, step, seed):
        """One step: ``(direction (P,), weights (K,) or None, new_state)``.

        ``gradients`` (K, P) (or (S, K, P)); ``losses`` (K,) or None; ``state`` as ``initial_state``; ``step`` the
        number of updates before this one (int tensor); ``seed`` a python int. The default is for loss-only methods.
        """
        gradients = ops.convert_to_tensor(gradients)
        weights, state = self.loss_weights(losses, state, step, seed)
        weights = ops.cast(weights, gradients.dtype)
        return ops.matmul(weights, gradients), weights, state

    def loss_weights(self, losses, state, step, seed):
        """Loss-only methods: ``(weights (K,), new_state)``; the direction is ``sum_k w_k g_k``."""
        raise NotImplementedError(f"{type(self).__name__} needs the per-task gradients.")

    def after_step(self, losses_before, losses_after, state, step):
        """``needs_losses_after_step`` methods: the new state from the losses before and after the update."""
        return state

    def get_config(self):
        return dict(self.options)


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
    """The simplex weights minimising ``w^T M w`` (MGDA's min-norm point): Frank-Wolfe with exact line search
    (Sener & Koltun 2018, Alg. 2) from the uniform weights, a fixed ``iterations`` (no early exit: compiles)."""
    m = ops.convert_to_tensor(gram_matrix)
    k = m.shape[0]
    dtype = m.dtype
    w0 = ops.full((k,), 1.0 / k, dtype=dtype)

    def body(_, w):
        mw = ops.matmul(m, w)
        t = ops.argmin(mw)
        e_t = ops.one_hot(t, k, dtype=dtype)
        # line search over gamma in [0, 1] on the norm of (1 - gamma) w + gamma e_t
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


def stateless_uniform(shape, seed, step, stream=0, dtype="float32"):
    """Uniform [0, 1) numbers determined by ``(seed, step, stream)`` only (``step`` may be traced): identical on
    every replica and after a resume. ``stream`` separates the draws of one method within a step."""
    backend = keras.config.backend()
    base = (int(seed) * 1_000_003 + int(stream) * 7919) % (2 ** 31 - 1)
    if backend == "tensorflow":
        import tensorflow as tf

        pair = tf.stack([tf.constant(base, tf.int64), tf.cast(step, tf.int64)])
        # philox named: the default algorithm differs under XLA, which would change the draws with jit_compile
        return tf.random.stateless_uniform(tuple(shape), seed=pair, dtype=dtype, alg="philox")
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(base), ops.cast(step, "int32"))
        return jax.random.uniform(key, tuple(shape), dtype=dtype)
    if backend == "torch":
        import torch

        generator = torch.Generator().manual_seed(base * 1_000_033 + int(step))
        values = torch.rand(tuple(shape), generator=generator, dtype=getattr(torch, dtype))
        return ops.convert_to_tensor(values)
    # numpy backend
    rng = np.random.default_rng([base, int(step)])
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
