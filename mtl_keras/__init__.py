"""mtl_keras: multi-task dense prediction (semantic, instance, depth) in Keras 3."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mtl_keras import platform as _platform  # noqa: E402

# Before anything imports TensorFlow: its fast oneDNN CPU kernels on every x86 CPU, not only AVX-512 ones, unless
# the user chose (TF_ENABLE_ONEDNN_OPTS set). See mtl_keras/platform.py.
_platform.request_onednn()
# TensorFlow (the default backend) loads here, not inside `import keras`: without its C++ start-up banners.
_platform.import_tensorflow_quietly()

from mtl_keras import models  # noqa: E402,F401  (registers the architectures)
from mtl_keras.models import (Backbone, DenseUNetEncoder, DilatedResNetBackbone,  # noqa: E402
                              KendallMultiTaskModel, MTUNet)
from mtl_keras.predict import predict  # noqa: E402
from mtl_keras.presets import VERSION as __version__  # noqa: E402
from mtl_keras.presets import build_model, from_preset, list_presets, load_model, save_to_preset  # noqa: E402
from mtl_keras.registry import list_models, register_model  # noqa: E402

__all__ = ["Backbone", "DenseUNetEncoder", "DilatedResNetBackbone", "KendallMultiTaskModel", "MTUNet", "build_model",
           "from_preset", "list_models", "list_presets", "load_model", "predict", "register_model", "save_to_preset",
           "__version__"]
