"""The same training on TensorFlow, JAX and PyTorch; JAX data parallelism; training without TensorFlow; a model
trained on one backend served on the others.

Each backend runs in its own process (the Keras backend is fixed at import). ``tests/scripts/backend_steps.py`` trains
a small Kendall model in float64 from the same weights on the same batches with every loss weighting; its per-step
losses, logged loss weights and weights are compared here.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mtl_keras.weighting import WEIGHTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_SCRIPT = os.path.join(ROOT, "tests", "scripts", "backend_steps.py")
BACKENDS = ("tensorflow", "jax", "torch")
# Block TensorFlow in a child process, as where it is not installed: ``import tensorflow`` raises ImportError and it
# never appears in sys.modules (Keras reads ``"tensorflow" in sys.modules`` as "TensorFlow is loaded").
WITHOUT_TENSORFLOW = """import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("No module named 'tensorflow' (blocked by the test)")
sys.meta_path.insert(0, NoTensorFlow())
"""

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def backend_env(backend, **extra):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", JAX_ENABLE_X64="1", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_python(args, env, timeout=900):
    proc = subprocess.run([sys.executable] + list(args), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_backend_steps(folder):
    results = {}
    for backend in BACKENDS:
        path = folder / f"{backend}.npz"
        extra = ["--data_parallel"] if backend == "jax" else []
        env = backend_env(backend, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        run_python([STEPS_SCRIPT, str(path)] + extra, env)
        results[backend] = dict(np.load(path))
    return results


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_every_weighting_trains_the_same_on_every_backend_and_data_parallel_on_jax(tmp_path):
    """One test (one xdist worker) for the three backend runs, which take minutes."""
    runs = run_backend_steps(tmp_path)
    tf_run = runs["tensorflow"]
    for weighting in WEIGHTINGS:
        key = f"{weighting}/"
        for backend in ("jax", "torch"):
            other, where = runs[backend], f"{weighting} on {backend}"
            assert list(other[key + "paths"]) == list(tf_run[key + "paths"]), where  # same variables, same order
            # Per step: total and task losses (as logged: Keras' Mean trackers hold float32), then the weighting's
            # sigma^2 / task weights after the step (float64 variables).
            assert relative_error(other[key + "losses"], tf_run[key + "losses"]) < 1e-6, where
            assert relative_error(other[key + "logged"], tf_run[key + "logged"]) < 1e-9, where
            # After the first plain-SGD step w1 = w0 - lr * gradient: equal w1 means equal gradients.
            assert relative_error(other[key + "weights_step1"], tf_run[key + "weights_step1"]) < 1e-9, where
            assert relative_error(other[key + "weights_final"], tf_run[key + "weights_final"]) < 1e-8, where
        # The comparison has teeth: the losses, and the loss weights of the adaptive methods, really changed.
        assert np.max(np.abs(np.diff(tf_run[key + "losses"][:, 0]))) > 1e-3, weighting
        if weighting in ("uncertainty", "dwa", "mtunet"):
            assert np.max(np.abs(tf_run[key + "logged"][-1] - tf_run[key + "logged"][0])) > 1e-4, weighting
        # JAX, two devices, batches whose halves have different numbers of labelled pixels: the global masked means
        # make the data-parallel step the one-device step (a per-device mean would not).
        jax_run = runs["jax"]
        assert int(jax_run["dp/devices"]) == 2
        for name, tolerance in (("losses", 1e-6), ("logged", 1e-9), ("weights_final", 1e-8)):
            assert relative_error(jax_run[f"dp/{key}{name}"], jax_run[key + name]) < tolerance, (weighting, name)


TRAIN_FLAGS = ["--image_size", "32,64", "--batch_size", "4", "--steps", "4", "--val_batches", "1",
               "--model", "kendall_deeplabv3_resnet26_slim"]
TINY_DATA = textwrap.dedent("""
    from mtl_keras.data import generate_synthetic_cityscapes
    generate_synthetic_cityscapes({folder!r}, num_train=8, num_val=4, height=64, width=128, seed=0)
""")


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("synthetic") / "data")
    run_python(["-c", TINY_DATA.format(folder=folder)], backend_env("jax"))
    return folder


def train_script(extra_prelude=""):
    return (extra_prelude + "import runpy, sys\nsys.argv = ['train.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path('experiments/train.py', run_name='__main__')\n"
            "finally:\n    print('MODULES:', sorted({m.split('.')[0] for m in sys.modules}))\n")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_train_py_runs_to_the_end_on_jax_and_torch(tmp_path, tiny_synthetic, backend):
    out = tmp_path / "run"
    run_python(["-c", train_script(), "--data_dir", tiny_synthetic, "--output_dir", str(out)] + TRAIN_FLAGS,
               backend_env(backend))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == backend and metrics["steps"] == 4
    assert metrics["jit_compile"] == (backend == "jax")  # XLA by default on JAX only
    for name in ("model.keras", "task_weights.png", "samples/val_00.png"):
        assert (out / name).exists(), name
    # The serving SavedModel, written from model.keras in a TensorFlow child process (TF cannot run the JAX or
    # PyTorch model's ops): the same signatures as on TensorFlow.
    assert (out / "export" / "saved_model.pb").exists()
    info = json.loads((out / "export" / "assets.extra" / "export_info.json").read_text())
    assert info["outputs"] == ["semantic_logits", "semantic_labels", "instance_vectors", "depth", "instance_ids"]
    for key in ("semantic_miou", "instance_mean_error_px", "depth_mean_error_px"):
        assert np.isfinite(metrics["val"][key]), key


def test_training_on_jax_without_tensorflow(tmp_path, tiny_synthetic):
    """import mtl_keras, the model, losses, weighting, trainer and the numpy loader with ``import tensorflow``
    failing: the whole default job runs (no SavedModel: that needs TensorFlow)."""
    out = tmp_path / "run"
    proc = run_python(["-c", train_script(WITHOUT_TENSORFLOW), "--data_dir", tiny_synthetic, "--output_dir",
                       str(out)] + TRAIN_FLAGS, backend_env("jax"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "jax" and metrics["steps"] == 4
    assert (out / "model.keras").exists() and not (out / "export").exists()
    assert "TensorFlow is not installed" in proc.stderr
    assert "tensorflow" not in proc.stdout.split("MODULES:")[-1]
    # Every epoch of the plan (4 steps = 2 epochs x 2 batches of the 8 scenes) trained with finite losses.
    losses = metrics["train_history"]["loss"]
    assert len(losses) == 2 and np.all(np.isfinite(losses))


CROSS_BACKEND_PREDICT = textwrap.dedent("""
    import sys, numpy as np, keras, mtl_keras
    model = keras.saving.load_model(sys.argv[1])  # safe_mode on
    images = np.random.default_rng(3).uniform(0, 255, (2, 32, 64, 3)).astype("float32")
    outputs = model.predict(images, verbose=0)
    np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in outputs.items()})
""")


def test_a_keras_file_trained_on_jax_predicts_the_same_on_every_backend(tmp_path, tiny_synthetic):
    out = tmp_path / "run"
    run_python(["-c", train_script(), "--data_dir", tiny_synthetic, "--output_dir", str(out), "--export=false"]
               + TRAIN_FLAGS, backend_env("jax"))
    predictions = {}
    for backend in BACKENDS:
        path = tmp_path / f"{backend}.npz"
        run_python(["-c", CROSS_BACKEND_PREDICT, str(out / "model.keras"), str(path)], backend_env(backend))
        predictions[backend] = np.load(path)
    for backend in ("tensorflow", "torch"):
        for task in ("semantic", "instance", "depth"):
            np.testing.assert_allclose(predictions[backend][task], predictions["jax"][task], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{backend} {task}")
