"""Architectures of the zoo; importing this package registers them."""

from mtl_keras.models import kendall  # noqa: F401  (registers entry points)
from mtl_keras.models.kendall import KendallMultiTaskModel

__all__ = ["KendallMultiTaskModel"]
