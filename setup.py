"""mtl_keras: multi-task dense prediction (semantic, instance, depth) in Keras 3 / TensorFlow.

``pip install -e .`` installs the CPU build of TensorFlow. On a GPU machine, install with
``MTL_KERAS_TENSORFLOW="tensorflow[and-cuda]" pip install -e .`` (the CUDA build of TensorFlow instead).
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
TENSORFLOW = os.environ.get("MTL_KERAS_TENSORFLOW", "tensorflow-cpu>=2.16,<2.22")


class build_py_with_presets(build_py):
    """Installs the model presets, kept at the top of the repository in models/*.json, as mtl_keras/presets/.

    An editable install (or a checkout on sys.path) reads models/ directly (mtl_keras.presets.builtin_presets_dir).
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "mtl_keras", "presets")
        self.mkpath(target)
        for path in sorted(glob.glob(os.path.join(HERE, "models", "*.json"))):
            self.copy_file(path, os.path.join(target, os.path.basename(path)))


setup(
    name="mtl_keras",
    version="0.1.0",
    description="Multi-task dense prediction (semantic, instance, depth) with learned uncertainty weighting, "
                "Keras 3",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mtl_keras", "mtl_keras.*"]),
    include_package_data=True,
    cmdclass={"build_py": build_py_with_presets},
    python_requires=">=3.10",
    install_requires=[
        TENSORFLOW,
        "keras>=3.8,<4",
        "tensorboard",
        "numpy",
        "opencv-python-headless",
        "scikit-learn",
        "absl-py",
        "h5py",
        "scipy",  # NYUv2 splits.mat / class maps (MATLAB v5)
        "matplotlib",
        "cityscapesscripts",
    ],
    extras_require={
        "onnx": ["tf2onnx", "onnxruntime"],  # experiments/export.py --onnx
        # The JAX and PyTorch backends, CPU builds: the backend tests and benchmarks (torch 2.13.0 is the CPU wheel
        # this project's machines carry; a newer torch from PyPI is a CUDA build of several GB).
        "backends": ["jax>=0.4.36", "torch==2.13.0"],
        # keras-hub's FeaturePyramidBackbones (ResNet, EfficientNet, MiT, CSPNet, DenseNet...) as encoders of every
        # architecture: backbone=<a keras_hub backbone> or "keras_hub:PRESET" (mtl_keras.models.hub). keras-hub 0.32
        # pulls tensorflow-text, which requires the full `tensorflow` wheel: it must be the same version as the
        # `tensorflow-cpu` above (one TensorFlow version installed as both distributions, which share their files),
        # hence the same range here; if pip picks two versions, `pip install tensorflow==<tensorflow-cpu's version>`.
        "hub": ["keras-hub>=0.32", "tensorflow>=2.16,<2.22"],
        # import-linter: the layer contract (.importlinter); hypothesis: the fuzzed readers (tests/test_fuzz_readers.py)
        "test": ["pytest", "pytest-xdist", "tf2onnx", "onnxruntime", "jax>=0.4.36", "torch==2.13.0",
                 "import-linter", "hypothesis"],
    },
)
