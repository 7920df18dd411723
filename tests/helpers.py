"""Shared test helpers (keras-hub style): config round trip and .keras save/load of any model or layer."""

import os

import keras
import numpy as np


def tiny_kendall_kwargs():
    """A structurally complete Kendall model small enough for unit tests."""
    return dict(backbone_depth=26, backbone_width=8, aspp_channels=16, decoder_channels=16)


def random_images(batch=2, height=64, width=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


def assert_outputs_close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a[key]), keras.ops.convert_to_numpy(b[key]), atol=atol,
                                   rtol=1e-5, err_msg=key)


def assert_config_round_trip(obj):
    """from_config(get_config()) rebuilds an object with the same config (and, for models, the same outputs)."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    return clone


def assert_model_config_round_trip(model, images):
    clone = assert_config_round_trip(model)
    clone.set_weights(model.get_weights())
    assert_outputs_close(model(images, training=False), clone(images, training=False))


def assert_keras_save_load(model, images, folder):
    path = os.path.join(folder, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode stays on
    assert_outputs_close(model(images, training=False), loaded(images, training=False))
    return loaded


def run_quick_experiment(script, tmp_path, summary_file, timeout):
    """Runs ``experiments/SCRIPT --quick`` in a subprocess with its outputs in ``tmp_path`` (``out/`` and
    ``results.md``); returns (the JSON summary ``out/SUMMARY_FILE``, the markdown path)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results_md = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, os.path.join(root, "experiments", script), "--quick", "--output_dir",
                           str(tmp_path / "out"), "--results_md", str(results_md)], cwd=root,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "out" / summary_file) as f:
        return json.load(f), results_md


def load_script(relative, name):
    """A script of the repository (e.g. ``benchmarks/gpu.py``) imported as module ``name``, with its folder on
    ``sys.path`` as when it runs (scripts import their siblings, e.g. ``benchmarks/common.py``)."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.dirname(os.path.join(root, relative))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
