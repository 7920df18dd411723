"""benchmarks/torch_reference.py (the same architecture, outputs and losses as the Keras model), benchmarks/gpu.py
(its FLOP count by hand, its peak table, a tiny row on the CPU) and benchmarks/backends.py (its table and a tiny
run). Tiny models only; no timing is asserted, only that the numbers exist and are positive."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch

import mtl_keras
from tests.helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(backbone_width=8, aspp_channels=16, decoder_channels=16)  # small widths of the depth-50 model
TINY_MODEL = "kendall_deeplabv3_resnet50"


torch_reference = load_script("benchmarks/torch_reference.py", "torch_reference_under_test")


def _keras_tiny(input_shape=(64, 64, 3), depth=50, **overrides):
    name = {50: "kendall_deeplabv3_resnet50", 101: "kendall_deeplabv3_resnet101"}[depth]
    return mtl_keras.build_model(name, input_shape=input_shape, **{**TINY, **overrides})


def _element_count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


# ------------------------------------------------------------------------------------------ torch_reference.py
@pytest.mark.parametrize("depth", [50, 101])
def test_torch_reference_has_the_keras_parameter_count(depth):
    """Like with like: PyTorch's parameters = Keras' trainable weights; PyTorch's BN running mean/var buffers =
    Keras' non-trainable BN moving mean/variance; their sum = ``count_params()``."""
    keras_model = _keras_tiny(depth=depth)
    model = torch_reference.KendallDeepLabV3(backbone_depth=depth, num_classes=19, **TINY)  # built by hand
    counts = torch_reference.parameter_counts(model)
    assert counts["trainable"] == _element_count(keras_model.trainable_weights)
    assert counts["moving_stats"] == _element_count(keras_model.non_trainable_weights)
    assert counts["total"] == keras_model.count_params()
    from_config = torch_reference.KendallDeepLabV3.from_keras_config(keras_model.get_config())
    assert torch_reference.parameter_counts(from_config) == counts


def test_torch_reference_computes_what_the_keras_model_computes():
    """Keras weights (BN statistics randomised) loaded by layer name give the same outputs in inference. ASPP rates
    2/3/5 so that every ASPP tap sees the 8x8 feature map of a 64x64 image (rates 12+ would see only padding)."""
    keras_model = _keras_tiny(aspp_rates=(2, 3, 5))
    rng = np.random.default_rng(0)
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 1.5, n)])
    model = torch_reference.KendallDeepLabV3.from_keras_config(keras_model.get_config())
    torch_reference.copy_keras_weights(model, keras_model)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    expected = keras_model(images, training=False)
    model.eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert set(outputs) == set(expected) == {"semantic", "instance", "depth"}
    for task, output in outputs.items():
        want = keras.ops.convert_to_numpy(expected[task])
        got = output.permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), err_msg=task)


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_reference_output_shapes(channels_last):
    model = torch_reference.KendallDeepLabV3(backbone_depth=50, **TINY)
    images, _ = torch_reference.random_batch(2, 32, 64, channels_last=channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        outputs = model(images)
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {
        "semantic": (2, 19, 32, 64), "instance": (2, 2, 32, 64), "depth": (2, 1, 32, 64)}


def test_torch_reference_losses_and_weighting_equal_mtl_keras():
    from mtl_keras.losses import task_loss
    from mtl_keras.weighting import UncertaintyWeightingLayer

    rng = np.random.default_rng(1)
    n, h, w = 2, 6, 7
    labels = rng.integers(0, 5, (n, h, w)).astype("int32")
    labels[0, :2] = 255  # ignored pixels
    targets = {"semantic": labels, "instance": rng.normal(size=(n, h, w, 2)).astype("float32"),
               "instance_mask": (rng.uniform(size=(n, h, w, 1)) > 0.5).astype("float32"),
               "depth": rng.uniform(size=(n, h, w, 1)).astype("float32"),
               "depth_mask": (rng.uniform(size=(n, h, w, 1)) > 0.3).astype("float32")}
    predictions = {"semantic": rng.normal(size=(n, h, w, 5)).astype("float32"),
                   "instance": rng.normal(size=(n, h, w, 2)).astype("float32"),
                   "depth": rng.normal(size=(n, h, w, 1)).astype("float32")}
    log_variances = {"semantic": 0.3, "instance": -0.2, "depth": 0.7}

    keras_losses = {t: float(keras.ops.convert_to_numpy(task_loss(t, targets, predictions))) for t in predictions}
    weighting = UncertaintyWeightingLayer(predictions.keys(), initial_log_variance=log_variances)
    keras_total = float(keras.ops.convert_to_numpy(weighting.weighted_total(keras_losses)))

    def nchw(array):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 1)))

    torch_targets = {k: (torch.from_numpy(v).long() if k == "semantic" else nchw(v)) for k, v in targets.items()}
    torch_outputs = {k: nchw(v) for k, v in predictions.items()}
    torch_losses = {t: torch_reference.task_loss(t, torch_targets, torch_outputs) for t in predictions}
    torch_weighting = torch_reference.UncertaintyWeighting(tuple(predictions))
    with torch.no_grad():
        for t, s in log_variances.items():
            torch_weighting.log_variances[t].fill_(s)
        torch_total = float(torch_weighting(torch_losses))
    for t in predictions:
        assert float(torch_losses[t]) == pytest.approx(keras_losses[t], rel=1e-5), t
    assert torch_total == pytest.approx(keras_total, rel=1e-5)


def test_torch_reference_trains_and_decays_conv_kernels_only():
    model = torch_reference.KendallDeepLabV3(backbone_depth=50, **TINY)
    trainer = torch_reference.ReferenceTrainer(model)
    decayed = {id(p) for p in trainer.decayed}
    assert decayed == {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert not any(id(m.bias) in decayed for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    images, targets = torch_reference.random_batch(2, 32, 32)
    before = model.backbone.conv1.weight.detach().clone()
    loss = trainer.train_step(images, targets)
    assert math.isfinite(loss)
    assert not torch.equal(before, model.backbone.conv1.weight)
    ips = torch_reference.train_images_per_s(depth=50, height=32, width=32, batch=2, steps=1, warmup=1, threads=1,
                                             **TINY)
    assert math.isfinite(ips) and ips > 0


# --------------------------------------------------------------------------------------------------------- gpu.py
def test_gpu_flop_count_of_one_conv_by_hand():
    gpu = load_script("benchmarks/gpu.py", "gpu_under_test")
    image = keras.Input((8, 10, 3))
    model = keras.Model(image, keras.layers.Conv2D(4, 3, padding="same", name="conv")(image))
    forward = 2 * (3 * 3 * 3) * 4 * (8 * 10)  # 2 FLOPs per multiply-add x kh*kw*cin x cout x output pixels
    assert gpu.training_flops_per_image(model) == 3 * forward == 51840


def test_gpu_peak_table():
    gpu = load_script("benchmarks/gpu.py", "gpu_under_test_peaks")
    assert gpu.peak_for("NVIDIA H200", "mixed_bfloat16", None) == (989e12, "H200 bf16 (data sheet)")
    assert gpu.peak_for("NVIDIA H100 80GB HBM3", "float32", None)[0] == 494e12  # TF32 at JAX's default precision
    assert gpu.peak_for("NVIDIA H100 80GB HBM3", "float32", "highest")[0] == 67e12
    assert gpu.peak_for("NVIDIA H100 PCIe", "mixed_bfloat16", None)[0] == 756e12
    assert gpu.peak_for("NVIDIA A100-SXM4-80GB", "float32", "float32")[0] == 19.5e12
    peak, label = gpu.peak_for("Tesla T4", "float32", None)
    assert peak is None and "--peak_tflops" in label


def _environment_without_backend():
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@pytest.mark.subprocess
def test_gpu_row_on_cpu(tmp_path):
    """One tiny row through gpu.py's child process on the CPU: JAX chosen without being asked, TensorFlow never
    imported, positive images/s, the FLOPs of benchmarks/flops.py, an MFU against the measured matmul rate."""
    output = tmp_path / "gpu.json"
    overrides = json.dumps({TINY_MODEL: TINY})
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--models", TINY_MODEL, "--model_overrides",
         overrides, "--sizes", "32x64", "--batch_size", "2", "--precisions", "float32", "--steps", "1", "--warmup",
         "1", "--matmul_size", "256", "--json", str(output)],
        env=_environment_without_backend(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["device"]["platform"] == "cpu" and report["device"]["matmul_flops"] > 0
    (row,) = report["rows"]
    assert "error" not in row, row["error"]
    assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["peak_memory_bytes"] > 0
    assert row["peak_memory_source"] == "process max RSS"  # JAX's CPU device reports no memory statistics
    assert not row["tensorflow_imported"]
    count_flops = load_script("benchmarks/flops.py", "flops").count_flops
    assert row["train_flops_per_image"] == 3 * count_flops(_keras_tiny((32, 64, 3)))["matmul"] > 0
    assert row["peak_label"] == "measured matmul" and row["mfu"] > 0
    assert f"| {TINY_MODEL} | 32x64 | 2 | float32 |" in done.stdout


@pytest.mark.subprocess
def test_gpu_refuses_other_backends():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py")],
                          env={**_environment_without_backend(), "KERAS_BACKEND": "tensorflow"},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "measures Keras on JAX only, but KERAS_BACKEND=tensorflow" in done.stderr


# ---------------------------------------------------------------------------------------------------- backends.py
def test_backends_table_shows_failures_in_their_rows():
    backends = load_script("benchmarks/backends.py", "backends_under_test")
    rounds = {
        "jax": [{"row": "jax", "median_s": 0.5, "jit_compile": True}, {"row": "jax", "median_s": 0.7}],
        "torch": [{"row": "torch", "error": "TypeError: train_step() takes 2 | 3 arguments"}],
        "pytorch": [{"row": "pytorch", "median_s": 1.0, "intra_op_threads": 2, "parameters": 1234}],
        "matmul": [{"row": "matmul", "gflops": 50.0}],
    }
    summary = backends.summarise(rounds, batch=4)
    assert summary["jax"]["images_per_s"] == pytest.approx(4 / 0.6)  # median over rounds
    assert summary["jax"]["relative_to_plain_pytorch"] == pytest.approx(4 / 0.6 / 4.0)
    machine = {"cpu_flags": "avx2", "cpu_model": "test CPU", "logical_cpus": 2, "versions": {"keras": "3"},
               "load_start": 0.0, "load_end": 0.0}
    settings = {"model": TINY_MODEL, "height": 32, "width": 64, "batch_size": 4, "steps": 1, "warmup": 1,
                "rounds": 2, "matmul_size": 256}
    text = backends.markdown(summary, "python benchmarks/backends.py", machine, settings)
    assert "| path | img/s | s/step | relative to plain PyTorch |" in text
    assert "| Keras + JAX (jit) | 6.67 | 0.600 | 1.67x |" in text
    assert "| Keras + PyTorch | failed: TypeError: train_step() takes 2 \\| 3 arguments | - | - |" in text
    assert "| plain PyTorch | 4.00 | 1.000 | 1.00x |" in text
    assert "50.0 GFLOP/s" in text and "avx2" in text
    assert backends.child_arguments(["--rows", "jax", "--steps=2", "--json=x.json", "--rounds", "3"], "jax") == [
        "--steps=2", "--child", "jax"]


@pytest.mark.subprocess
def test_backends_plain_pytorch_and_matmul_rows(tmp_path):
    output = tmp_path / "backends.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "backends.py"), "--model", TINY_MODEL, "--model_overrides",
         json.dumps(TINY), "--image_size", "32,64", "--batch_size", "2", "--steps", "1", "--warmup", "1", "--rows",
         "pytorch,matmul", "--matmul_size", "256", "--threads", "1", "--json", str(output)],
        env=_environment_without_backend(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(output.read_text())["rows"]}
    assert not rows["pytorch"]["errors"], rows["pytorch"]["errors"]
    assert rows["pytorch"]["images_per_s"] > 0 and rows["matmul"]["gflops"] > 0
    assert rows["pytorch"]["rounds"][0]["parameters"] == _keras_tiny((32, 64, 3)).count_params()
    assert "| plain PyTorch |" in done.stdout and "1.00x" in done.stdout
    assert "grep -o -w -E 'avx2|avx512f' /proc/cpuinfo | sort -u" in done.stdout
