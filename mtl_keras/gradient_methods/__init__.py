"""Gradient-based loss weightings (LibMTL's family and beyond), as pure ``keras.ops`` functions.

``aggregate(name, gradients, **options)`` turns ``(K, P)`` per-task gradients into the ``(P,)`` update direction;
``mtl_keras.weighting.GradientWeighting`` wraps a method for training. The methods by module are listed in the
README's "Gradient weightings" table.
"""

import numpy as np
from keras import ops

from mtl_keras.gradient_methods import loss_based, projection, solvers, stochastic  # noqa: F401 (registration)
from mtl_keras.gradient_methods.base import GRADIENT_METHODS, GradientMethod, register_gradient_method  # noqa: F401

# LibMTL's names that are spelled differently here: an unknown-name error points to ours.
LIBMTL_NAMES = {"ew": "equal"}


def renamed_hint(name):
    """`` (LibMTL's 'ew' is 'equal' here)`` for a LibMTL name, else ``""``."""
    return f" (LibMTL's {name!r} is {LIBMTL_NAMES[name]!r} here)" if name in LIBMTL_NAMES else ""


def build_gradient_method(name, num_tasks, **options):
    """The registered method ``name`` for ``num_tasks`` tasks with ``options`` (its paper defaults otherwise)."""
    if name not in GRADIENT_METHODS:
        raise ValueError(f"Unknown gradient weighting {name!r}{renamed_hint(name)}. "
                         f"Valid: {', '.join(sorted(GRADIENT_METHODS))}.")
    return GRADIENT_METHODS[name](num_tasks, **options)


def aggregate(name, gradients, losses=None, state=None, step=0, seed=0, return_details=False, **options):
    """The (P,) update direction of method ``name`` for ``gradients`` (K, P); ``losses`` (K,) where the method
    reads them; ``state`` defaults to the initial one. ``return_details``: ``(direction, weights or None, state)``.
    """
    gradients = ops.convert_to_tensor(gradients)
    method = build_gradient_method(name, gradients.shape[-2], **options)
    if method.needs_losses and losses is None:
        raise ValueError(f"Weighting {name!r} needs the task losses: aggregate({name!r}, gradients, losses=...).")
    if losses is not None:
        losses = ops.cast(ops.convert_to_tensor(losses), gradients.dtype)
    if state is None:
        state = method.initial_state(gradients.shape[-1])
    state = {k: ops.convert_to_tensor(np.asarray(v)) if isinstance(v, (np.ndarray, float, int)) else v
             for k, v in state.items()}
    direction, weights, new_state = method.aggregate(gradients, losses, state, ops.convert_to_tensor(step, "int32"),
                                                     int(seed))
    return (direction, weights, new_state) if return_details else direction
