"""Architectures of the zoo; importing this package registers them."""

from mtl_keras.models import kendall  # noqa: F401  (registers entry points)
from mtl_keras.models.kendall import KendallMultiTaskModel
from mtl_keras.models import mt_unet  # noqa: F401  (registers entry points)
from mtl_keras.models.mt_unet import MTUNet  # noqa: F401

__all__ = ["KendallMultiTaskModel"]
