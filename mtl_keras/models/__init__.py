"""Architectures of the zoo: backbones, task models; importing this package registers them."""

from mtl_keras.models import cross_stitch  # noqa: F401  (registers entry points)
from mtl_keras.models import experts  # noqa: F401  (registers entry points)
from mtl_keras.models import kendall  # noqa: F401  (registers entry points)
from mtl_keras.models import distillation, mtan  # noqa: F401  (registers entry points)
from mtl_keras.models import ltb  # noqa: F401  (registers entry points)
from mtl_keras.models import mt_unet  # noqa: F401  (registers entry points)
from mtl_keras.models import sharing  # noqa: F401  (registers entry points)
from mtl_keras.models.backbones import Backbone, DenseUNetEncoder, DilatedResNetBackbone
from mtl_keras.models.kendall import KendallMultiTaskModel
from mtl_keras.models.mt_unet import MTUNet

__all__ = ["Backbone", "DenseUNetEncoder", "DilatedResNetBackbone", "KendallMultiTaskModel", "MTUNet"]
