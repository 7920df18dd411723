"""Serving exports: experiments/export.py, the SavedModel without mtl_keras, saved_model_cli, ONNX, instance ids."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import mtl_keras
from mtl_keras import export, presets
from tests.helpers import load_script, random_images
from tests.test_architectures import ARCHITECTURES as SHARING_SCHEMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KENDALL = "kendall_deeplabv3_resnet26_slim"

# Runs in a fresh interpreter that cannot import mtl_keras (nor Keras' saving of it): only TensorFlow.
SERVE_WITHOUT_MTL_KERAS = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mtl_keras" or name.startswith("mtl_keras."):
            raise ImportError(f"{name} must not be needed to serve")

sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", ".")]
import numpy as np
import tensorflow as tf

export_dir, inputs, outputs = sys.argv[1:4]
loaded = tf.saved_model.load(export_dir)
results = {}
for key, images in np.load(inputs).items():
    signature = "serve_uint8" if images.dtype == np.uint8 else "serving_default"
    for name, value in loaded.signatures[signature](images=tf.constant(images)).items():
        results[f"{key}/{name}"] = value.numpy()
try:
    import mtl_keras  # noqa: F401
    raise SystemExit("mtl_keras was importable")
except ImportError:
    pass
assert not any(m.startswith("mtl_keras") for m in sys.modules)
np.savez(outputs, **results)
"""


def keras_outputs(model, images):
    """The Keras model's outputs under the export's names (float32 logits etc., argmax labels)."""
    out = {export.OUTPUT_NAMES[t]: np.asarray(v) for t, v in model(images, training=False).items()}
    if "semantic_logits" in out:
        out["semantic_labels"] = out["semantic_logits"].argmax(-1).astype(np.int32)
    return out


def at_size(model, preset, images):
    """Outputs of preset ``preset``'s architecture built by the zoo directly at the size of ``images`` (no padding),
    with ``model``'s weights: what the export's any-size serving must give (export.serving_model, the code under
    test, is not used to make the expectation)."""
    same = presets.build_from_preset(preset, tiny=True, input_shape=(*images.shape[1:3], 3))
    same.set_weights(model.get_weights())
    assert same.input.shape[1:3] == images.shape[1:3]
    return keras_outputs(same, images)


def assert_same(expected, got, prefix="", atol=1e-4):
    for name, value in expected.items():
        actual = got[f"{prefix}{name}"]
        if name == "semantic_labels":  # argmax may flip only where two logits tie to float precision
            assert (actual == value).mean() > 0.999, name
        else:
            np.testing.assert_allclose(actual, value, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.slow  # about 80 s
@pytest.mark.subprocess
def test_export_cli_serves_without_mtl_keras_saved_model_cli_and_onnx(tmp_path):
    model = presets.build_from_preset(KENDALL, tiny=True)  # 32 x 64 inputs
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")  # a training output folder, as experiments/train.py leaves it
    with_onnx = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnxruntime"))  # pip install .[test] has them
    result = subprocess.run([sys.executable, "experiments/export.py", str(run), "--instances"]
                            + (["--onnx"] if with_onnx else []), cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    served = run / "serving"
    assert (served / "saved_model.pb").is_file()
    info = json.loads((served / "assets.extra" / "export_info.json").read_text())
    assert info["outputs"] == ["semantic_logits", "semantic_labels", "instance_vectors", "depth", "instance_ids"]

    rng = np.random.default_rng(0)
    inputs = {"float": random_images(2, 32, 64, seed=1),
              "uint8": rng.integers(0, 256, (2, 32, 64, 3)).astype(np.uint8),
              "odd": random_images(1, 37, 51, seed=2)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_MTL_KERAS, str(served), str(tmp_path / "inputs.npz"),
                             str(tmp_path / "outputs.npz")], cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = dict(np.load(tmp_path / "outputs.npz"))

    assert_same(keras_outputs(model, inputs["float"]), got, "float/")
    assert_same(keras_outputs(model, inputs["uint8"].astype(np.float32)), got, "uint8/")
    assert_same(at_size(model, KENDALL, inputs["odd"]), got, "odd/")
    for key, images in inputs.items():
        ids = got[f"{key}/instance_ids"]
        assert ids.shape == images.shape[:3] and ids.dtype == np.int32 and ids.min() >= 0

    cli = shutil.which("saved_model_cli")
    command = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run(command + ["show", "--dir", str(served), "--all"], capture_output=True, text=True,
                           check=True, timeout=300).stdout
    for text in ("signature_def['serving_default']", "signature_def['serve_uint8']", "DT_UINT8", "images",
                 "semantic_logits", "semantic_labels", "instance_vectors", "depth", "instance_ids"):
        assert text in shown, text

    if not with_onnx:
        pytest.skip("tf2onnx / onnxruntime not installed: ONNX part skipped")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(run / "serving.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert sorted(names) == ["depth", "instance_vectors", "semantic_labels", "semantic_logits"]
    for key in ("float", "odd"):
        onnx_out = dict(zip(names, session.run(None, {"images": inputs[key]})))
        assert_same({k: v for k, v in got.items() if k.startswith(f"{key}/") and "instance_ids" not in k},
                    {f"{key}/{k}": v for k, v in onnx_out.items()})


@pytest.mark.parametrize("name", [n for n in mtl_keras.list_models() if n not in SHARING_SCHEMES])
@pytest.mark.slow
def test_every_registered_model_exports_and_serves_its_outputs(name, tmp_path):
    """The sharing schemes' exports are served in a fresh process by tests/test_architectures.py."""
    model = presets.build_from_preset(name, tiny=True)
    info = export.export_saved_model(model, str(tmp_path / "served"))
    loaded = tf.saved_model.load(str(tmp_path / "served"))
    height, width = model.input.shape[1:3]
    images = random_images(2, height, width)
    got = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(images)).items()}
    assert sorted(got) == sorted(info["outputs"])
    assert_same(keras_outputs(model, images), got)
    odd = random_images(1, height + 5, width - 3, seed=1)  # values at odd sizes: the CLI and MT-UNet tests
    got = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(odd)).items()}
    assert all(v.shape[1:3] == odd.shape[1:3] for v in got.values())


def test_mt_unet_export_pads_by_repeating_the_border_and_crops_back():
    model = presets.build_from_preset("mt_unet", tiny=True)
    serve = tf.function(export.serving_function(export.serving_model(model)))
    images = random_images(1, 37, 51)
    got = {k: v.numpy() for k, v in serve(tf.constant(images)).items()}
    padded = np.pad(images, ((0, 0), (0, 48 - 37), (0, 64 - 51), (0, 0)), mode="edge")
    expected = {k: v[:, :37, :51] for k, v in at_size(model, "mt_unet", padded).items()}
    assert_same(expected, got)


def test_instance_ids_need_the_semantic_and_instance_tasks(tmp_path):
    model = presets.build_from_preset("mt_unet", tiny=True)  # semantic + depth
    with pytest.raises(ValueError, match="semantic and instance"):
        export.export_saved_model(model, str(tmp_path / "served"), instances=True)


def test_onnx_export_without_tf2onnx_is_a_clear_error(monkeypatch, tmp_path):
    onnx_export = load_script("experiments/onnx_export.py", "onnx_export")  # ONNX is experiments/export.py's
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(RuntimeError, match="pip install tf2onnx"):
        onnx_export.export_onnx(presets.build_from_preset("mt_unet", tiny=True), str(tmp_path / "m.onnx"))


# ------------------------------------------------------------------------------------------ instance clustering
def synthetic_scene(seed, height=128, width=256, noise=0.7):
    """Semantic labels with rectangular instances of classes 11..18 and their centroid vectors (+ noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 11, (height, width)).astype(np.int32)  # non-instance classes
    truth = np.zeros((height, width), np.int64)
    for k in range(int(rng.integers(3, 9))):
        c = int(rng.integers(11, 19))
        y0, x0 = rng.integers(0, height - 20), rng.integers(0, width - 30)
        h, w = rng.integers(6, 40), rng.integers(6, 60)
        labels[y0:y0 + h, x0:x0 + w] = c
        truth[y0:y0 + h, x0:x0 + w] = c * 1000 + k
    vectors = np.zeros((height, width, 2), np.float32)
    for value in np.unique(truth[truth > 0]):
        ys, xs = np.nonzero(truth == value)
        vectors[ys, xs, 0], vectors[ys, xs, 1] = ys.mean() - ys, xs.mean() - xs
    return labels, vectors + rng.normal(0, noise, vectors.shape).astype(np.float32)


def test_tf_instance_clustering_gives_the_numpy_histogram_clustering():
    instances = pytest.importorskip("mtl_keras.instances")
    params = export.clustering_parameters((128, 256), list(range(11, 19)))
    cluster = tf.function(lambda labels, vectors: export.cluster_instance_ids(labels, vectors, params))
    scenes = [synthetic_scene(seed) for seed in range(6)]
    labels = np.stack([s[0] for s in scenes])
    vectors = np.stack([s[1] for s in scenes])
    ids = cluster(labels, vectors).numpy()
    for i, (image_labels, image_vectors) in enumerate(scenes):
        expected = instances.cluster_instances(image_labels, image_vectors, num_classes=19).ids
        assert expected.max() >= 3
        np.testing.assert_array_equal(ids[i], expected)
    # No instance pixels at all, and a batch of one.
    empty = cluster(np.zeros((1, 16, 24), np.int32), np.zeros((1, 16, 24, 2), np.float32)).numpy()
    assert empty.shape == (1, 16, 24) and not empty.any()


@pytest.mark.slow
def test_a_model_of_any_size_exports_with_plain_keras_export(tmp_path):
    # ResizeLike reads its target size at run time; under model.export (tf.function without autograph) that size
    # is symbolic, which keras.ops.image.resize refused. No patching: the layer itself handles it.
    from tests.helpers import tiny_kendall_kwargs

    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=("semantic", "depth"), num_classes=3,
                                  input_shape=(None, None, 3), output_stride=16, **tiny_kendall_kwargs())
    path = str(tmp_path / "export")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    for height, width in ((32, 48), (40, 24)):
        images = random_images(batch=1, height=height, width=width)
        got = served.serve(tf.constant(images))
        expected = model(images, training=False)
        got = got if isinstance(got, dict) else dict(zip(sorted(expected), got))
        for key in expected:
            assert tuple(got[key].shape) == (1, height, width, expected[key].shape[-1])
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(expected[key]), atol=1e-4)
