"""Shared test helpers (keras-hub style): config round trip and .keras save/load of any model or layer."""

import os

import keras
import numpy as np


def tiny_kendall_kwargs():
    """A structurally complete Kendall model small enough for unit tests: the tiny arguments of the default model's
    preset (models/kendall_deeplabv3_resnet26_cpu.json, one place for them), input size left to the test."""
    from mtl_keras import presets

    tiny = dict(presets.get_preset("kendall_deeplabv3_resnet26_cpu")["tiny_arguments"])
    tiny.pop("input_shape")
    return dict(backbone_depth=26, **tiny)


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
    if name in sys.modules:  # loaded once per process: a script's absl flags cannot be defined twice
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, relative))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def reference_dense_metrics(pairs, num_classes, ignore_label=255):
    """Plain-numpy metrics of ``(predictions, targets)`` batch pairs, written from the definitions (not from
    ``mtl_keras.evaluation``), to check that code's numbers against:

    * ``semantic_miou``: from one confusion matrix over the whole split, IoU_c = TP / (TP + FP + FN) over the classes
      present in the ground truth or the prediction (the CityScapes convention), pixels labelled ``ignore_label``
      left out; predictions are the argmax of the logits;
    * ``instance_mean_error_px``: mean over pixels with ``instance_mask`` of the Euclidean norm of the vector error;
    * ``depth_mean_error_px``: mean over pixels with ``depth_mask`` of |predicted - true|;
    * ``normals_mean_angle_deg``: mean over pixels with ``normals_mask`` (and a non-zero true normal) of the angle
      in degrees between the predicted and the true normal.

    Only the tasks present in both are computed; every mean is over all the split's pixels at once.
    """
    import numpy as np

    confusion = np.zeros((num_classes, num_classes), np.int64)
    sums = {"instance": [0.0, 0], "depth": [0.0, 0], "normals": [0.0, 0]}

    def mask_of(targets, key, shape):
        if key not in targets:
            return np.ones(shape, bool)
        return np.asarray(targets[key], np.float64).reshape(shape) > 0.5

    for predictions, targets in pairs:
        predictions = {k: np.asarray(v, np.float64) for k, v in predictions.items()}
        targets = {k: np.asarray(v) for k, v in targets.items()}
        if "semantic" in predictions and "semantic" in targets:
            labels = targets["semantic"].reshape(predictions["semantic"].shape[:3]).astype(np.int64)
            predicted = predictions["semantic"].argmax(-1)
            keep = labels != ignore_label
            np.add.at(confusion, (labels[keep], predicted[keep]), 1)
        if "instance" in predictions and "instance" in targets:
            true = targets["instance"].astype(np.float64)
            mask = mask_of(targets, "instance_mask", true.shape[:3])
            sums["instance"][0] += np.sqrt(((predictions["instance"] - true) ** 2).sum(-1))[mask].sum()
            sums["instance"][1] += mask.sum()
        if "depth" in predictions and "depth" in targets:
            true = targets["depth"].astype(np.float64).reshape(predictions["depth"].shape[:3])
            mask = mask_of(targets, "depth_mask", true.shape) & np.isfinite(true)
            sums["depth"][0] += np.abs(predictions["depth"].reshape(true.shape) - true)[mask].sum()
            sums["depth"][1] += mask.sum()
        if "normals" in predictions and "normals" in targets:
            true = targets["normals"].astype(np.float64)
            true_norm = np.linalg.norm(true, axis=-1)
            mask = mask_of(targets, "normals_mask", true.shape[:3]) & (true_norm > 1e-6)
            pred = predictions["normals"]
            cosine = (pred * true).sum(-1) / np.maximum(np.linalg.norm(pred, axis=-1) * true_norm, 1e-12)
            sums["normals"][0] += np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))[mask].sum()
            sums["normals"][1] += mask.sum()

    out = {}
    if confusion.any():
        tp = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - tp
        out["semantic_miou"] = float(np.mean(tp[union > 0] / union[union > 0]))
    for task, key in (("instance", "instance_mean_error_px"), ("depth", "depth_mean_error_px"),
                      ("normals", "normals_mean_angle_deg")):
        if sums[task][1]:
            out[key] = float(sums[task][0] / sums[task][1])
    return out


def run_backbone_test(backbone, images, expected_shapes, folder=None):
    """keras-hub's ``run_vision_backbone_test``: the pyramid's levels and shapes are ``expected_shapes`` ({level:
    (H, W, C)}), ``pyramid_strides`` agree with the shapes, the config round-trips (same outputs), and with
    ``folder`` the backbone saves and loads as a .keras file."""
    outputs = backbone(images, training=False)
    assert {k: tuple(v.shape[1:]) for k, v in outputs.items()} == expected_shapes
    height = images.shape[1]
    assert {k: height // v for k, v in backbone.pyramid_strides.items()} == {k: s[0] for k, s in
                                                                             expected_shapes.items()}
    assert_model_config_round_trip(backbone, images)
    if folder is not None:
        assert_keras_save_load(backbone, images, folder)


def evaluate_script():
    """``experiments/evaluate.py`` as a module (one per process: its absl flags are defined once)."""
    return load_script("experiments/evaluate.py", "evaluate_script")
