"""The official CityScapes scripts run on files we write, and our mIoU equals theirs on the same predictions.

Apples to apples: the official ``averageScoreClasses`` is the mean IoU over the 19 evaluated classes (labelIds with
``ignoreInEval=False``) that have ``TP + FP + FN > 0``, at the ground truth's resolution, with pixels of ignored
ground-truth labels skipped. Ours (``our_semantic_scores``) maps the same labelIds PNGs to trainIds (ignored ->
255) and scores one confusion matrix the same way; see experiments/cityscapes_eval.py.
"""

import json
import os

import cv2
import numpy as np
import pytest

from mtl_keras.labels import label_lookup_table
from mtl_keras.evaluation import confusion_matrix, segmentation_scores
from mtl_keras.instances import Instances
from tests.helpers import load_script

ce = load_script("experiments/cityscapes_eval.py", "cityscapes_eval")

H, W = 32, 64
# labelIds on the ground truth: void (0, 1, 4), ignored-in-eval (9 parking, 29 caravan), 17 classes
GT_IDS = np.array([0, 1, 4, 7, 8, 9, 11, 12, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31])


def fake_val(root, num_images=3, seed=0):
    """A tiny CityScapes val folder: labelIds (8-bit) and instanceIds (16-bit), two cities. Returns stems."""
    rng = np.random.default_rng(seed)
    stems = []
    for i in range(num_images):
        city = ("aachen", "bonn")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        folder = os.path.join(root, "gtFine", "val", city)
        os.makedirs(folder, exist_ok=True)
        blocks = rng.choice(GT_IDS, size=(H // 8, W // 8))
        labels = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
        labels[rng.random((H, W)) < 0.1] = rng.choice(GT_IDS)
        instances = labels.astype(np.uint16)
        # two cars and a person as instances, all >= 100 px (the official minimum region); the rest of a class stays
    # a group
        instances[2:10, 2:20] = 26000 + 2 * i
        instances[12:24, 30:50] = 26001 + 2 * i
        instances[20:32, 2:14] = 24000 + i
        labels[2:10, 2:20] = 26
        labels[12:24, 30:50] = 26
        labels[20:32, 2:14] = 24
        assert cv2.imwrite(os.path.join(folder, f"{stem}_gtFine_labelIds.png"), labels)
        assert cv2.imwrite(os.path.join(folder, f"{stem}_gtFine_instanceIds.png"), instances)
        stems.append(stem)
    return stems


@pytest.mark.subprocess  # the official scripts run in a Python child process
def test_official_pixel_level_score_equals_ours(tmp_path):
    root = str(tmp_path / "cityscapes")
    stems = fake_val(root)
    gt_files = ce.ground_truth_files(root, "val")
    assert [ce.cityscapes_stem(f) for f in gt_files] == sorted(stems)
    lut = label_lookup_table(19)
    rng = np.random.default_rng(1)
    results = str(tmp_path / "results" / "semantic")
    predictions, ours_direct = [], np.zeros((19, 19), np.int64)
    for gt_file in gt_files:
        gt = lut[cv2.imread(gt_file, cv2.IMREAD_UNCHANGED)]
        # predictions at half resolution (the model's), mostly right, classes 16 (train) and 18 never predicted
        low = gt[::2, ::2].astype(np.int64)
        noise = rng.integers(0, 16, size=low.shape)
        pred = np.where((low == 255) | (rng.random(low.shape) < 0.4), noise, low)
        pred[pred == 16] = 17
        path = ce.write_semantic_prediction(results, ce.cityscapes_stem(gt_file), pred, size=(H, W))
        predictions.append(path)
        full = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert full.shape == (H, W) and full.dtype == np.uint8
        ours_direct += confusion_matrix(gt, lut[full], 19)

    official = ce.run_official_semantic(results, root, "val")
    ours = ce.our_semantic_scores(gt_files, predictions)
    print(f"official mIoU {official['averageScoreClasses']:.6f}  ours {ours['mean_iou']:.6f}")
    assert ours["mean_iou"] == pytest.approx(official["averageScoreClasses"], abs=1e-4)
    assert ours["mean_iou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)  # in fact exact
    # ...and it is our usual evaluation of the trainId maps, per class too (NaN where the official one is NaN)
    assert segmentation_scores(ours_direct)["mean_iou"] == pytest.approx(ours["mean_iou"], abs=1e-12)
    from cityscapesscripts.helpers.labels import trainId2label

    for train_id, iou in enumerate(ours["per_class_iou"]):
        theirs = official["classScores"][trainId2label[train_id].name]
        if theirs is None or np.isnan(iou):  # JSON has no NaN: the worker writes None
            assert theirs is None and np.isnan(iou), train_id
        else:
            assert iou == pytest.approx(theirs, abs=1e-12), train_id
    assert official["predictionFiles"] == [os.path.abspath(p) for p in predictions]
    assert np.isnan(ours["per_class_iou"][18]) and ours["per_class_iou"][16] == 0.0  # absent / only in GT


@pytest.mark.subprocess  # the official scripts run in a Python child process
def test_non_evaluated_predicted_labels_and_categories(tmp_path):
    """A predicted labelId outside the evaluated set is a miss (FN, no FP), as in the official script; and the
    7-category mode equals the official category score."""
    root = str(tmp_path / "cityscapes")
    fake_val(root, num_images=2, seed=3)
    gt_files = ce.ground_truth_files(root, "val")
    rng = np.random.default_rng(4)
    results = str(tmp_path / "results_void")
    predictions = []
    for gt_file in gt_files:
        gt = cv2.imread(gt_file, cv2.IMREAD_UNCHANGED)
        pred = np.where(rng.random(gt.shape) < 0.3, rng.choice([0, 4, 9, 29, 7, 26], size=gt.shape), gt)
        path = os.path.join(results, f"{ce.cityscapes_stem(gt_file)}_pred_labelIds.png")
        os.makedirs(results, exist_ok=True)
        cv2.imwrite(path, pred.astype(np.uint8))
        predictions.append(path)
    official = ce.run_official_semantic(results, root)
    for num_classes, key in ((19, "averageScoreClasses"), (7, "averageScoreCategories")):
        ours = ce.our_semantic_scores(gt_files, predictions, num_classes=num_classes)
        assert ours["mean_iou"] == pytest.approx(official[key], abs=1e-12), num_classes


@pytest.mark.subprocess  # the official scripts run in a Python child process
def test_official_instance_evaluation_of_written_instances(tmp_path):
    root = str(tmp_path / "cityscapes")
    fake_val(root, num_images=2)
    gt_files = ce.ground_truth_files(root, "val", kind="instanceIds")
    results = str(tmp_path / "results" / "instance")
    for i, gt_file in enumerate(gt_files):
        gt = cv2.imread(gt_file, cv2.IMREAD_UNCHANGED).astype(np.int64)
        ids = np.zeros((H // 2, W // 2), np.int32)  # predicted at half resolution
        low = gt[::2, ::2]
        classes, scores = [], []
        for k, (inst_id, cls) in enumerate(((26000 + 2 * i, 13), (26001 + 2 * i, 13), (24000 + i, 11))):
            if i == 1 and inst_id == 24000 + i:
                continue  # image 1 misses its person
            ids[low == inst_id] = len(classes) + 1
            classes.append(cls)
            scores.append(0.9 - 0.1 * k)
        classes.append(13)  # plus a false positive car
        scores.append(0.3)
        ids[0:2, 28:32] = len(classes)
        inst = Instances(ids=ids, classes=np.array(classes), scores=np.array(scores), sizes=np.zeros(len(classes)),
                         centers=np.zeros((len(classes), 2)))
        txt = ce.write_instance_prediction(results, ce.cityscapes_stem(gt_file), inst.ids, inst.classes,
                                           inst.scores, size=(H, W))
        lines = open(txt).read().splitlines()
        assert len(lines) == len(classes)
        rel, label_id, conf = lines[0].split(" ")
        assert label_id == "26" and float(conf) == pytest.approx(0.9)
        mask = cv2.imread(os.path.join(results, rel), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (H, W) and set(np.unique(mask)) == {0, 255}
    result = ce.run_official_instance(results, root, "val")
    classes = result["averages"]["classes"]
    # every car found exactly, ranked above the false positive -> AP 1; person: 1 of 2 found -> AP 0.5
    assert classes["car"]["ap"] == pytest.approx(1.0)
    assert classes["person"]["ap"] == pytest.approx(0.5)
    assert classes["rider"]["ap"] is None  # no ground truth: NaN, skipped in the average
    assert result["averages"]["allAp"] == pytest.approx(0.75)
    assert result["averages"]["allAp50%"] == pytest.approx(0.75)
    json.dumps(result)  # plain JSON


@pytest.mark.subprocess  # the official scripts run in a Python child process
def test_failures_are_reported_not_exited(tmp_path):
    root = str(tmp_path / "cityscapes")
    fake_val(root, num_images=1)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(RuntimeError, match="Found no prediction"):
        ce.run_official_semantic(str(tmp_path / "empty"), root)
    with pytest.raises(FileNotFoundError):
        ce.ground_truth_files(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="train_ids"):
        ce.write_semantic_prediction(str(tmp_path), "a_000000_000019", np.full((2, 2), 19))
