"""One serving export: a training run's ``export/`` is experiments/export.py's SavedModel, and experiments/evaluate.py
gives the same metrics on a run folder, its model.keras and its export (and on older exports), or fails in one line
when a task it must evaluate has no output."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import mtl_keras
from mtl_keras import export
from mtl_keras.config import TrainConfig
from mtl_keras.experiment import run_training
from tests.helpers import evaluate_script, random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(ROOT, "experiments", "evaluate.py")
TASKS = ("semantic", "instance", "depth")
SIGNATURES = ("serving_default", "serve", "serve_uint8")
RUN_OUTPUTS = ["semantic_logits", "semantic_labels", "instance_vectors", "depth", "instance_ids"]
# The metrics that depend on the model's predictions only (not on timings or paths).
QUALITY_METRICS = ("semantic_miou", "semantic_pixel_accuracy", "semantic_per_class_iou", "instance_mean_error_px",
                   "depth_mean_error_px", "depth_rel_error", "instance_ari_mean", "instance_ari_split", "num_images")
TINY = dict(synthetic_num_train=2, synthetic_num_val=2, image_size=(32, 64), batch_size=2, steps=1,
            model="kendall_deeplabv3_resnet26_slim", num_sample_images=0,
            model_overrides=dict(backbone_width=8, aspp_channels=16, decoder_channels=16))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run of experiments/train.py's code (one step), with its export/ as the run writes it."""
    base = tmp_path_factory.mktemp("serving")
    out = base / "run"
    run_training(TrainConfig(output_dir=str(out), data_dir=str(base / "synthetic"), **TINY), verbose=0)
    assert (out / "export" / "saved_model.pb").is_file() and (out / "model.keras").is_file()
    return out


def signature_interface(path):
    """{signature: (its inputs as {name: (dtype, shape)}, its sorted output names)} of a SavedModel."""
    loaded = tf.saved_model.load(str(path))
    interface = {}
    for name in SIGNATURES:
        signature = loaded.signatures[name]
        inputs = {k: (v.dtype.name, v.shape.as_list()) for k, v in signature.structured_input_signature[1].items()}
        interface[name] = (inputs, sorted(signature.structured_outputs))
    return interface


def evaluate_and_compare(model_paths, reference_path, **flags):
    """Evaluates ``reference_path`` and each of ``model_paths`` (run folders, .keras files, SavedModel folders, and
    preset names or folders: anything ``--model_path`` takes) with ``experiments/evaluate.py``'s ``run_evaluation``
    at their default output folders, and asserts that each gives the reference's tasks and quality metrics (to 1e-5).
    ``flags``: run_evaluation's keywords (e.g. ``dataset``, ``data_dir`` for a model outside a run folder; the
    default ``clustering="none"``: mtl_keras.instances' NumPy clustering of an untrained model's noisy votes takes
    8 to 13 s per image here, and it is the same code on the same predictions for every form). Returns
    ``{path: metrics}``."""
    script = evaluate_script()
    flags = dict(dict(batch_size=2, num_images=0, clustering="none"), **flags)
    reference = script.run_evaluation(str(reference_path), **flags)
    results = {str(reference_path): reference}
    for path in model_paths:
        metrics = script.run_evaluation(str(path), **flags)
        assert metrics["tasks"] == reference["tasks"], path
        assert metrics["clustering"] == reference["clustering"], path
        for key in QUALITY_METRICS:
            assert (key in metrics) == (key in reference), (path, key)
            if key in reference:
                # (None: a class absent from both prediction and truth, NaN before metrics.json)
                np.testing.assert_allclose(np.array(metrics[key], float), np.array(reference[key], float),
                                           rtol=1e-5, atol=1e-5, err_msg=f"{path}: {key}")
        results[str(path)] = metrics
    return results


# --------------------------------------------------------------------------------------- the run's export (a)
@pytest.mark.slow  # the tiny run: 20 to 30 s
def test_the_runs_export_is_export_py_s_serving_export(trained_run, tmp_path):
    run_export = trained_run / "export"
    info = json.loads((run_export / "assets.extra" / "export_info.json").read_text())
    assert info["outputs"] == RUN_OUTPUTS and info["tasks"] == list(TASKS)
    # experiments/export.py RUN --instances: the same function on the run's model.keras.
    model = mtl_keras.load_model(str(trained_run))
    export.export_saved_model(model, str(tmp_path / "serving"), instances=True)
    interface = signature_interface(run_export)
    assert interface == signature_interface(tmp_path / "serving")
    assert interface["serve_uint8"][0] == {"images": ("uint8", [None, None, None, 3])}
    assert interface["serving_default"][0] == {"images": ("float32", [None, None, None, 3])}
    assert interface["serving_default"][1] == sorted(RUN_OUTPUTS)

    loaded = tf.saved_model.load(str(run_export))
    # At the training size: the Keras model's outputs.
    images = random_images(2, 32, 64, seed=3)
    got = loaded.signatures["serving_default"](images=tf.constant(images))
    for task, value in model(images, training=False).items():
        np.testing.assert_allclose(got[export.OUTPUT_NAMES[task]].numpy(), np.asarray(value), rtol=1e-4, atol=1e-4)
    # Another size, uint8 and float32 alike.
    pixels = np.random.default_rng(0).integers(0, 256, (1, 40, 56, 3)).astype(np.uint8)
    as_uint8 = loaded.signatures["serve_uint8"](images=tf.constant(pixels))
    as_float = loaded.signatures["serving_default"](images=tf.constant(pixels.astype(np.float32)))
    for name in RUN_OUTPUTS:
        assert as_uint8[name].shape[:3] == (1, 40, 56), name
        np.testing.assert_allclose(as_uint8[name].numpy(), as_float[name].numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert as_uint8["instance_ids"].dtype == tf.int32 and as_uint8["semantic_labels"].dtype == tf.int32


@pytest.mark.slow  # about 20 s: a fresh interpreter imports TensorFlow and Keras
@pytest.mark.subprocess
def test_jax_and_torch_runs_write_the_same_export_from_model_keras_in_a_tensorflow_process(tmp_path):
    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", input_shape=(32, 64, 3), backbone_width=8,
                                  aspp_channels=16, decoder_channels=16)
    model.save(str(tmp_path / "model.keras"))
    info = export.write_run_export(model, str(tmp_path / "export"), keras_file=str(tmp_path / "model.keras"),
                                   backend="jax")  # what a JAX or PyTorch run does
    assert info["outputs"] == RUN_OUTPUTS
    export.write_run_export(model, str(tmp_path / "here"))  # this process's (TensorFlow) way
    assert signature_interface(tmp_path / "export") == signature_interface(tmp_path / "here")
    images = random_images(1, 36, 52, seed=4)
    a = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"](images=tf.constant(images))
    b = tf.saved_model.load(str(tmp_path / "here")).signatures["serving_default"](images=tf.constant(images))
    for name in RUN_OUTPUTS:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    # A child that fails is one error naming the child's last words, not a traceback of the parent.
    (tmp_path / "broken.keras").write_text("not a zip")
    with pytest.raises(export.ExportSubprocessError, match="exited with"):
        export.export_in_subprocess(str(tmp_path / "broken.keras"), str(tmp_path / "none"))


def test_a_runs_export_gets_instance_ids_only_where_it_can():
    full = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", input_shape=(32, 64, 3), backbone_width=8,
                                 aspp_channels=16, decoder_channels=16)
    assert export.default_instances(full)
    no_instance = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", input_shape=(32, 64, 3), backbone_width=8,
                                        aspp_channels=16, decoder_channels=16, tasks=("semantic", "depth"))
    assert not export.default_instances(no_instance)
    nyu = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", input_shape=(32, 64, 3), backbone_width=8,
                                aspp_channels=16, decoder_channels=16, num_classes=13)  # no instance classes known
    assert not export.default_instances(nyu)
    assert "--instances" in export.export_command("runs/a", "runs/a/export", True)


# ------------------------------------------------------------------------------- evaluate.py on each form (b, d)
@pytest.mark.slow  # 20 to 30 s, and the tiny run
def test_evaluate_gives_the_same_metrics_on_the_run_its_model_keras_its_preset_and_its_export(trained_run):
    paths = [trained_run / "model.keras", trained_run / "preset", trained_run / "export"]
    results = evaluate_and_compare(paths, trained_run)
    reference = results[str(trained_run)]
    assert reference["tasks"] == list(TASKS) and "instance_mean_error_px" in reference
    assert [results[str(p)]["model_kind"] for p in paths] == ["keras", "preset", "saved_model"]
    # Each in its own folder: the run's eval/ stays the run's own evaluation.
    for folder, kind in (("eval", "run"), ("eval_model", "keras"), ("eval_preset", "preset"),
                         ("eval_export", "saved_model")):
        assert json.loads((trained_run / folder / "metrics.json").read_text())["model_kind"] == kind, folder


@pytest.mark.slow  # about 25 s: Keras' model.export is the slow part
def test_an_export_written_before_the_serving_export_is_still_evaluated_fully(trained_run, tmp_path):
    import keras

    model = keras.saving.load_model(str(trained_run / "model.keras"))
    old = trained_run / "export_keras"  # beside the run's config.json, as RUN/export used to be
    try:
        model.export(str(old), format="tf_saved_model", verbose=False)  # input "image", outputs named by task
        outputs = tf.saved_model.load(str(old)).signatures["serve"].structured_outputs
        assert sorted(outputs) == sorted(TASKS)
        results = evaluate_and_compare([old], trained_run / "model.keras")
        assert results[str(old)]["tasks"] == list(TASKS) and "instance_mean_error_px" in results[str(old)]
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(trained_run / "eval_export_keras", ignore_errors=True)


# ------------------------------------------------------------------------------------ a missing output (c)
@pytest.fixture(scope="module")
def export_without_instances(tmp_path_factory):
    """A run-like folder whose config.json asks for semantic, instance and depth, and whose export/ was written from
    a model without the instance task; an earlier evaluation of that export is in eval_export/."""
    base = tmp_path_factory.mktemp("missing")
    run = base / "run"
    run.mkdir()
    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", input_shape=(32, 64, 3), backbone_width=8,
                                  aspp_channels=16, decoder_channels=16, tasks=("semantic", "depth"))
    export.export_saved_model(model, str(run / "export"))
    config = {"dataset": "synthetic", "data_dir": str(base / "synthetic"), "image_size": [32, 64],
              "num_classes": 19, "tasks": list(TASKS), "synthetic_num_train": 1, "synthetic_num_val": 2}
    (run / "config.json").write_text(json.dumps(config))
    (run / "eval_export").mkdir()
    (run / "eval_export" / "metrics.json").write_text('{"marker": "earlier evaluation"}')
    return run


def _contents(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


def test_an_export_missing_a_task_output_is_an_error_and_writes_nothing(export_without_instances):
    run = export_without_instances
    before = _contents(run.parent)
    with pytest.raises(ValueError) as error:
        evaluate_script().run_evaluation(str(run / "export"), batch_size=2, num_images=0)
    message = str(error.value)
    assert f"{run / 'export'} has no output for task(s) instance (instance_vectors)" in message
    assert "config.json" in message and "--tasks=semantic,depth" in message
    assert _contents(run.parent) == before  # no metrics, no data generated, the earlier evaluation kept


@pytest.mark.slow  # about 17 s: a fresh interpreter imports TensorFlow and loads the export
@pytest.mark.subprocess
def test_evaluate_py_reports_a_missing_output_in_one_line_with_exit_status_2(export_without_instances):
    run = export_without_instances
    before = _contents(run.parent)
    proc = subprocess.run([sys.executable, EVALUATE, f"--model_path={run / 'export'}", "--batch_size=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("evaluate.py: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{run / 'export'} has no output for task(s) instance (instance_vectors)" in errors[0]
    assert _contents(run.parent) == before
