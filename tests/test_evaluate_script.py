"""experiments/evaluate.py end to end on a tiny model and a tiny synthetic split, and the new pictures."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.helpers import evaluate_script, reference_dense_metrics, tiny_kendall_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "evaluate.py")
TASKS = ("semantic", "instance", "depth")
# The 19 CityScapes evaluation classes as label ids, in train-id order (cityscapesScripts' labels.py: road 7,
# sidewalk 8, building 11, wall 12, fence 13, pole 17, traffic light 19, traffic sign 20, vegetation 21, terrain 22,
# sky 23, person 24, rider 25, car 26, truck 27, bus 28, train 31, motorcycle 32, bicycle 33).
CITYSCAPES_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


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
    # sigma^2 series whose last epoch is neither their first, smallest nor largest value, beside series that are
    # not sigma^2 (loss, weights).
    history = {"loss": [3.0, 2.0, 1.5], "semantic_sigma2": [1.0, 0.6, 0.7], "instance_sigma2": [1.0, 6.0, 5.0],
               "depth_sigma2": [1.0, 0.4, 0.5], "semantic_weight": [1.0, 1.6, 1.4]}
    (run / "metrics.json").write_text(json.dumps({"train_history": history, "val": {}}))
    return run, model


@pytest.fixture(scope="module")
def val_predictions(run_folder):
    """(the fixture model's outputs, the targets) of the 2 synthetic val scenes of the run's config (generated as
    evaluate.py would), read in order without flips at 64x128, as numpy batches."""
    from mtl_keras.data import generate_synthetic_cityscapes
    from mtl_keras.data.datasets import load_dataset

    run, model = run_folder
    config = json.loads((run / "config.json").read_text())
    data_dir = generate_synthetic_cityscapes(config["data_dir"], num_train=1, num_val=2, seed=0)
    dataset = load_dataset("synthetic", data_dir, "val", image_size=(64, 128), batch_size=2, num_classes=19,
                           tasks=TASKS, shuffle=False, flip=False)
    pairs = [({k: np.asarray(v) for k, v in model(np.asarray(x), training=False).items()},
              {k: np.asarray(v) for k, v in y.items()}) for x, y in dataset]
    assert sum(len(y["semantic"]) for _, y in pairs) == 2
    return pairs


@pytest.fixture(scope="module")
def reference(val_predictions):
    """The fixture model's metrics on the 2 synthetic val scenes, computed here with plain numpy."""
    metrics = reference_dense_metrics(val_predictions, num_classes=19)
    assert set(metrics) == {"semantic_miou", "instance_mean_error_px", "depth_mean_error_px"}
    return metrics


def official_miou_by_hand(results_dir, gt_files):
    """The CityScapes pixel-level mIoU of the prediction files in ``results_dir`` (``{stem}_*.png``, label ids)
    against the ground-truth labelIds files, by the definition of cityscapesScripts' evalPixelLevelSemanticLabeling:
    summed over the images, IoU_c = TP / (TP + FP + FN) for each of the 19 evaluation classes, where a false positive
    counts only on pixels whose true label is an evaluation class, and the mean over the classes with a non-zero
    denominator."""
    predictions = {name.split("_pred")[0]: os.path.join(results_dir, name) for name in os.listdir(results_dir)}
    tp, fp, fn = (np.zeros(len(CITYSCAPES_EVAL_LABEL_IDS)) for _ in range(3))
    for gt_file in gt_files:
        stem = "_".join(os.path.basename(gt_file).split("_")[:3])
        true = cv2.imread(gt_file, cv2.IMREAD_UNCHANGED)
        pred = cv2.imread(predictions[stem], cv2.IMREAD_UNCHANGED)
        assert pred.shape == true.shape, (stem, pred.shape, true.shape)
        evaluated = np.isin(true, CITYSCAPES_EVAL_LABEL_IDS)
        for c, label in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
            tp[c] += np.sum((true == label) & (pred == label))
            fn[c] += np.sum((true == label) & (pred != label))
            fp[c] += np.sum(evaluated & (true != label) & (pred == label))
    denominator = tp + fp + fn
    return float(np.mean(tp[denominator > 0] / denominator[denominator > 0]))


@pytest.mark.slow  # 20 to 25 s
@pytest.mark.subprocess
def test_evaluate_run_folder_with_official_scores(run_folder, val_predictions, reference):
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
    # ... and both are the mIoU of those files by the definition, counted here.
    from mtl_keras.data.cityscapes import list_cityscapes_files

    gt_files = [entry["label_ids"] for entry in list_cityscapes_files(metrics["data_dir"], "val")]
    by_hand = official_miou_by_hand(str(out / "cityscapes_results" / "semantic"), gt_files)
    assert metrics["official_semantic_miou"] == pytest.approx(by_hand, abs=1e-6)
    # The files scored are the model's predictions: label ids that, as train ids and at the model's 64x128 grid
    # (the centre of each 4x4 block of the 256x512 file), are the argmax of its logits but where two classes nearly
    # tie (the logits are upsampled before the argmax).
    predicted = np.concatenate([p["semantic"].argmax(-1) for p, _ in val_predictions])
    to_train_id = np.full(256, 255)
    to_train_id[list(CITYSCAPES_EVAL_LABEL_IDS)] = np.arange(19)
    for i, gt_file in enumerate(gt_files):
        stem = "_".join(os.path.basename(gt_file).split("_")[:3])
        written = cv2.imread(str(out / "cityscapes_results" / "semantic" / f"{stem}_pred_labelIds.png"),
                             cv2.IMREAD_UNCHANGED)
        agreement = (to_train_id[written[1::4, 1::4]] == predicted[i]).mean()
        assert agreement > 0.95, (stem, agreement)
    # The model's own metrics, against the numpy reference.
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # The run's last epoch of each sigma^2 series (not its first, smallest or largest value; no other series).
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


@pytest.mark.slow  # 20 to 25 s
def test_keras_file_and_saved_model_give_the_same_metrics(run_folder, reference, tmp_path):
    run, model = run_folder
    script = evaluate_script()
    common = dict(batch_size=2, num_images=0, clustering="histogram")
    # Delta_m against "single-task" baselines (a metrics.json of a run: its "val" dict)
    baseline = tmp_path / "single.json"
    baseline.write_text(json.dumps({"val": {"semantic_miou": 0.5, "depth_mean_error_px": 2.0}}))
    from_run = script.run_evaluation(str(run), output_dir=str(tmp_path / "a"), baseline_metrics=[str(baseline)],
                                     **common)
    miou, depth = from_run["semantic_miou"], from_run["depth_mean_error_px"]
    assert from_run["delta_m"] == pytest.approx(((miou - 0.5) / 0.5 - (depth - 2.0) / 2.0) / 2 * 100)
    assert set(from_run["delta_m_metrics"]) == {"semantic_miou", "depth_mean_error_px"}
    # a .keras file: data settings from the config.json beside it
    from_file = script.run_evaluation(str(run / "model.keras"), output_dir=str(tmp_path / "b"), **common)
    export = tmp_path / "export"
    model.export(str(export), format="tf_saved_model", verbose=False)
    # a SavedModel with no config beside it: data flags given explicitly, input size from its signature
    cfg = json.loads((run / "config.json").read_text())
    from_saved = script.run_evaluation(str(export), dataset="synthetic", data_dir=cfg["data_dir"],
                                       output_dir=str(tmp_path / "c"), tasks=("semantic", "depth"), **common)
    assert from_run["model_kind"] == "run" and from_file["model_kind"] == "keras"
    assert from_saved["model_kind"] == "saved_model"
    # Each way of loading the model gives the in-memory model's metrics, computed here with plain numpy.
    for key, value in reference.items():
        assert from_run[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert from_file[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key in ("semantic_miou", "depth_mean_error_px"):
        assert from_saved[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
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
