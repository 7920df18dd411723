"""experiments/evaluate.py end to end on a tiny model and a tiny synthetic split, and the new pictures."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import tiny_kendall_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "evaluate.py")


def _import_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A training output folder as experiments/train.py leaves it (model.keras, config.json, metrics.json)."""
    import keras

    import mtl_keras

    base = tmp_path_factory.mktemp("evaluate")
    run = base / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=("semantic", "instance", "depth"),
                                  num_classes=19, input_shape=(64, 128, 3), **tiny_kendall_kwargs())
    model.save(str(run / "model.keras"))
    config = {"dataset": "synthetic", "data_dir": str(base / "synthetic"), "image_size": [64, 128],
              "num_classes": 19, "tasks": ["semantic", "instance", "depth"], "synthetic_num_train": 1,
              "synthetic_num_val": 2, "model": "kendall_deeplabv3_resnet50"}
    (run / "config.json").write_text(json.dumps(config))
    history = {"loss": [3.0, 2.0, 1.5], "semantic_sigma2": [1.0, 0.8, 0.7], "instance_sigma2": [1.0, 3.0, 5.0],
               "depth_sigma2": [1.0, 0.6, 0.5]}
    (run / "metrics.json").write_text(json.dumps({"train_history": history, "val": {}}))
    return run, model


def test_evaluate_run_folder_with_official_scores(run_folder):
    run, _ = run_folder
    out = run / "eval"
    proc = subprocess.run([sys.executable, SCRIPT, f"--model_path={run}", "--official", "--batch_size=2",
                           "--num_images=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["image_size"] == [64, 128] and metrics["model_kind"] == "run"
    for key in ("semantic_miou", "semantic_pixel_accuracy", "instance_mean_error_px", "depth_mean_error_px",
                "depth_rel_error", "instance_ari_split", "clustering_ms_median", "official_semantic_miou",
                "official_instance_ap"):
        assert key in metrics, key
    assert len(metrics["semantic_per_class_iou"]) == 19 and "car" in metrics["semantic_per_class_iou_named"]
    # The official script and we agree on the same prediction files (at the ground truth's 256x512).
    assert metrics["official_gt_resolution"] == [256, 512]
    assert metrics["official_our_semantic_miou_same_files"] == pytest.approx(metrics["official_semantic_miou"],
                                                                             abs=1e-4)
    assert metrics["official_miou_abs_difference"] < 1e-4
    assert metrics["train_sigma2_final"] == {"depth_sigma2": 0.5, "instance_sigma2": 5.0, "semantic_sigma2": 0.7}
    assert "| semantic_miou |" in (out / "metrics.md").read_text()
    images = sorted(os.listdir(out / "images"))
    stem = "00_synthville_000000_000019"
    for kind in ("semantic", "semantic_true", "depth", "instances", "panel"):
        assert f"{stem}_{kind}.png" in images, kind
    assert len(images) == 5  # --num_images=1
    assert (out / "sigma2.png").stat().st_size > 1000
    results = out / "cityscapes_results"
    assert len(os.listdir(results / "semantic")) == 2
    assert len([f for f in os.listdir(results / "instance") if f.endswith(".txt")]) == 2


def test_keras_file_and_saved_model_give_the_same_metrics(run_folder, tmp_path):
    run, model = run_folder
    script = _import_script()
    common = dict(batch_size=2, num_images=0, clustering="histogram")
    # Delta_m against "single-task" baselines (a metrics.json of a run: its "val" dict)
    baseline = tmp_path / "single.json"
    baseline.write_text(json.dumps({"val": {"semantic_miou": 0.5, "depth_mean_error_px": 2.0}}))
    from_run = script.run_evaluation(str(run), output_dir=str(tmp_path / "a"), baseline_metrics=[str(baseline)],
                                     **common)
    miou, depth = from_run["semantic_miou"], from_run["depth_mean_error_px"]
    assert from_run["delta_m"] == pytest.approx((-(miou - 0.5) / 0.5 + (depth - 2.0) / 2.0) / 2 * 100)
    assert set(from_run["delta_m_metrics"]) == {"semantic_miou", "depth_mean_error_px"}
    if (run / "eval" / "metrics.json").exists():  # the CLI run of the previous test: the same numbers
        cli = json.loads((run / "eval" / "metrics.json").read_text())
        assert cli["semantic_miou"] == pytest.approx(miou, abs=1e-9)
    # a .keras file: data settings from the config.json beside it
    from_file = script.run_evaluation(str(run / "model.keras"), output_dir=str(tmp_path / "b"), **common)
    export = tmp_path / "export"
    model.export(str(export), format="tf_saved_model", verbose=False)
    # a SavedModel with no config beside it: data flags given explicitly, input size from its signature
    cfg = json.loads((run / "config.json").read_text())
    from_saved = script.run_evaluation(str(export), dataset="synthetic", data_dir=cfg["data_dir"],
                                       output_dir=str(tmp_path / "c"), tasks=("semantic", "depth"), **common)
    assert from_file["model_kind"] == "keras" and from_saved["model_kind"] == "saved_model"
    for key in ("semantic_miou", "instance_mean_error_px", "depth_mean_error_px", "instance_ari_split"):
        assert from_file[key] == pytest.approx(from_run[key], rel=1e-6, abs=1e-9), key
    for key in ("semantic_miou", "depth_mean_error_px"):
        assert from_saved[key] == pytest.approx(from_run[key], rel=1e-4, abs=1e-6), key
    assert from_saved["tasks"] == ["semantic", "depth"] and "instance_mean_error_px" not in from_saved
    with pytest.raises(FileNotFoundError, match="model_path"):
        script.load_predictor(str(tmp_path / "nothing"))


def test_instance_overlay_and_sigma2_history(tmp_path):
    from mtl_keras.visualize import instance_colors, instances_to_color, normals_to_color, sigma2_history

    ids = np.zeros((10, 12), np.int32)
    ids[1:5, 1:6] = 1
    ids[6:9, 3:11] = 2
    image = np.full((10, 12, 3), 100.0)
    rgb = instances_to_color(ids, image)
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [60, 60, 60])  # background dimmed
    np.testing.assert_array_equal(rgb[1, 1], [255, 255, 255])  # outline
    colours = instance_colors(2)
    expected = np.clip(100 * 0.4 + colours[0].astype(float) * 0.6 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[2, 2], expected)  # blended inside
    assert len({tuple(c) for c in instance_colors(30)}) == 30
    plain = instances_to_color(ids, contours=False)
    assert (plain[0, 0] == 0).all() and (plain[2, 2] == colours[0]).all()
    normals = np.zeros((2, 2, 3))
    normals[0, 0] = [0, 0, 2.0]
    normals[0, 1] = [-1, 0, 0]
    normals[1, 1] = [0, 1, 0]
    rgb = normals_to_color(normals, mask=np.array([[1, 1], [1, 0]]))
    np.testing.assert_array_equal(rgb[0, 0], [128, 128, 255])
    np.testing.assert_array_equal(rgb[0, 1], [0, 128, 128])
    assert (rgb[1] == 0).all()  # zero normal, masked pixel
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"train_history": {"loss": [1, 2], "depth_sigma2": [0.5, None]}}))
    series = sigma2_history(str(path))
    assert list(series) == ["depth_sigma2"] and series["depth_sigma2"][0] == 0.5
    assert np.isnan(series["depth_sigma2"][1])  # a null (non-finite) value in the JSON
    assert sigma2_history({"train_history": {"loss": [1.0]}}) == {}
