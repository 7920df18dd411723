import math

import numpy as np
import pytest

from mtl_keras.evaluation import MultiTaskEvaluator, confusion_matrix, evaluate_model, segmentation_scores


def one_hot_logits(labels, num_classes):
    return np.eye(num_classes, dtype=np.float32)[labels]


# ------------------------------------------------------------------------------------------------ confusion / scores

def test_confusion_matrix_hand_case_and_ignore():
    labels = np.array([[0, 0, 1], [1, 255, 2]])
    preds = np.array([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(labels, preds, num_classes=3)
    expected = np.array([[1, 1, 0],
                         [0, 2, 0],
                         [1, 0, 0]])  # the ignored pixel (predicted 2) is not counted
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_confusion_matrix_rejects_bad_labels_naming_them():
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        confusion_matrix(np.array([0, 3, 7, 255]), np.array([0, 0, 0, 0]), num_classes=3)
    with pytest.raises(ValueError, match="-1"):
        confusion_matrix(np.array([-1, 0]), np.array([0, 0]), num_classes=3)
    with pytest.raises(ValueError, match="Predictions"):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), num_classes=3)


def test_segmentation_scores_absent_and_false_positive_classes():
    # class 2 is never in the ground truth but predicted once -> IoU 0 (included in the mean);
    # class 3 is absent from both -> NaN (excluded). The ignored pixel (predicted 3) counts nowhere.
    labels = np.array([0, 0, 0, 1, 1, 255])
    preds = np.array([0, 0, 1, 1, 2, 3])
    scores = segmentation_scores(confusion_matrix(labels, preds, num_classes=4))
    iou = scores["per_class_iou"]
    # class 0: TP 2, FN 1, FP 0 -> 2/3 ; class 1: TP 1, FN 1 (->2), FP 1 -> 1/3 ; class 2: TP 0, FP 1 -> 0
    assert iou[0] == pytest.approx(2 / 3)
    assert iou[1] == pytest.approx(1 / 3)
    assert iou[2] == 0.0
    assert math.isnan(iou[3])
    assert scores["mean_iou"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # over GT classes 0 and 1
    assert all(isinstance(v, float) for v in iou)


def test_segmentation_scores_empty_confusion_is_nan():
    scores = segmentation_scores(np.zeros((3, 3), np.int64))
    assert math.isnan(scores["mean_iou"]) and math.isnan(scores["pixel_accuracy"])


def test_mean_iou_matches_cityscapes_convention():
    """The CityScapes script averages over classes with a non-NaN IoU (denominator tp + fp + fn > 0)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(4, 8, 8))
    labels[labels == 4] = 255  # class 4 never in GT...
    preds = rng.integers(0, 4, size=(4, 8, 8))  # ...nor predicted -> NaN
    cm = confusion_matrix(labels, preds, 5)
    ious = []
    for c in range(5):
        tp, fn, fp = cm[c, c], cm[c].sum() - cm[c, c], cm[:, c].sum() - cm[c, c]
        ious.append(float("nan") if tp + fp + fn == 0 else tp / (tp + fp + fn))
    scores = segmentation_scores(cm)
    assert math.isnan(scores["per_class_iou"][4])
    assert scores["mean_iou"] == pytest.approx(np.nanmean(ious))


# ------------------------------------------------------------------------------------------------ evaluator

def make_split(num_images=7, h=6, w=5, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    sem = rng.integers(0, num_classes, size=(num_images, h, w))
    sem[rng.random(sem.shape) < 0.2] = 255
    targets = {
        "semantic": sem,
        "instance": rng.normal(size=(num_images, h, w, 2)).astype(np.float32) * 5,
        "instance_mask": (rng.random((num_images, h, w, 1)) < 0.3).astype(np.float32),
        "depth": rng.uniform(0, 30, size=(num_images, h, w, 1)).astype(np.float32),
        "depth_mask": (rng.random((num_images, h, w, 1)) < 0.6).astype(np.float32),
    }
    targets["depth"][0, 0, 0, 0] = 0.0  # a zero disparity: counted in the abs error, not in the relative one
    targets["depth_mask"][0, 0, 0, 0] = 1.0
    # Image 0 has a lot of instance pixels, image 1 none: a mean of per-image means would differ.
    targets["instance_mask"][0] = 1.0
    targets["instance_mask"][1] = 0.0
    predictions = {
        "semantic": rng.normal(size=(num_images, h, w, num_classes)).astype(np.float32),
        "instance": rng.normal(size=(num_images, h, w, 2)).astype(np.float32) * 5,
        "depth": rng.uniform(0, 30, size=(num_images, h, w, 1)).astype(np.float32),
    }
    return targets, predictions


def slice_dict(d, a, b):
    return {k: v[a:b] for k, v in d.items()}


def assert_results_equal(r1, r2):
    assert r1.keys() == r2.keys()
    for k in r1:
        np.testing.assert_allclose(r1[k], r2[k], rtol=1e-12, err_msg=k)


def test_streaming_is_independent_of_batching():
    targets, predictions = make_split()
    whole = MultiTaskEvaluator(3)
    whole.update(targets, predictions)
    split = MultiTaskEvaluator(3)
    for a, b in [(0, 1), (1, 4), (4, 6), (6, 7)]:
        split.update(slice_dict(targets, a, b), slice_dict(predictions, a, b))
    r1, r2 = whole.result(), split.result()
    assert_results_equal(r1, r2)
    assert r1["num_images"] == 7

    # ...and it is the pixel-weighted mean, not the mean of per-batch means.
    per_batch = []
    for a, b in [(0, 1), (2, 4)]:
        ev = MultiTaskEvaluator(3, tasks=("instance",))
        ev.update(slice_dict(targets, a, b), slice_dict(predictions, a, b))
        per_batch.append(ev.result()["instance_mean_error_px"])
    ev = MultiTaskEvaluator(3, tasks=("instance",))
    ev.update(slice_dict(targets, 0, 1), slice_dict(predictions, 0, 1))
    ev.update(slice_dict(targets, 2, 4), slice_dict(predictions, 2, 4))
    assert ev.result()["instance_mean_error_px"] != pytest.approx(np.mean(per_batch))

    # Semantic metrics equal those of one confusion matrix over everything.
    cm = confusion_matrix(targets["semantic"], predictions["semantic"].argmax(-1), 3)
    scores = segmentation_scores(cm)
    assert r1["semantic_miou"] == pytest.approx(scores["mean_iou"])
    assert r1["semantic_pixel_accuracy"] == pytest.approx(scores["pixel_accuracy"])


def test_instance_and_depth_errors_hand_case():
    # 1 image, 1x3 pixels.
    targets = {
        "instance": np.array([[[[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]]]]),
        "instance_mask": np.array([[[[1.0], [1.0], [0.0]]]]),
        "depth": np.array([[[[2.0], [4.0], [np.nan]]]]),
        "depth_mask": np.array([[[[1.0], [1.0], [0.0]]]]),
    }
    predictions = {
        "instance": np.array([[[[3.0, 4.0], [3.0, 5.0], [100.0, 100.0]]]]),  # errors (3,4), (0,1), masked out
        "depth": np.array([[[[3.0], [3.0], [50.0]]]]),  # errors 1, 1, masked out (NaN target ignored)
    }
    ev = MultiTaskEvaluator(2, tasks=("instance", "depth"))
    ev.update(targets, predictions)
    r = ev.result()
    assert r["instance_mean_error_px"] == pytest.approx((5.0 + 1.0) / 2)
    assert r["instance_mean_l1_px"] == pytest.approx((7.0 + 1.0) / 2)
    assert r["depth_mean_error_px"] == pytest.approx(1.0)
    assert r["depth_rel_error"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert r["num_images"] == 1
    assert "semantic_miou" not in r
    assert all(isinstance(v, float) for v in r.values())


def test_empty_masks_give_nan_and_missing_tasks_are_skipped():
    targets, predictions = make_split(num_images=2)
    targets["instance_mask"][:] = 0
    targets["depth_mask"][:] = 0
    targets["semantic"][:] = 255
    ev = MultiTaskEvaluator(3)
    ev.update(targets, predictions)
    ev.update({"depth": targets["depth"], "depth_mask": targets["depth_mask"]}, predictions)  # no semantic/instance
    r = ev.result()
    for key in ("semantic_miou", "semantic_pixel_accuracy", "instance_mean_error_px", "instance_mean_l1_px",
                "depth_mean_error_px", "depth_rel_error"):
        assert math.isnan(r[key]), key
    assert r["num_images"] == 4

    ev.reset()
    r = ev.result()
    assert r["num_images"] == 0 and math.isnan(r["depth_mean_error_px"])


def test_label_map_predictions_and_errors():
    ev = MultiTaskEvaluator(3, tasks=("semantic",))
    labels = np.array([[[0, 1], [2, 255]]])
    ev.update({"semantic": labels[..., None]}, {"semantic": labels})  # (B,H,W,1) target, label-map prediction
    assert ev.result()["semantic_miou"] == 1.0
    with pytest.raises(ValueError, match="Resize"):
        ev.update({"semantic": labels}, {"semantic": np.zeros((1, 4, 4, 3))})
    with pytest.raises(ValueError, match="predictions have only"):
        ev.update({"semantic": labels}, {"depth": np.zeros((1, 2, 2, 1))})
    with pytest.raises(ValueError, match="Unknown task"):
        MultiTaskEvaluator(3, tasks=("edges",))


# ------------------------------------------------------------------------------------------------ normals

def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_normals_hand_case():
    # 1 image, 1x5 pixels; true normal +z everywhere. Predictions at 0, 10, 20, 45 and 90 degrees (unnormalised),
    # the last pixel masked out.
    angles = np.radians([0.0, 10.0, 20.0, 45.0, 90.0])
    true = np.tile([0.0, 0.0, 1.0], (1, 1, 5, 1))
    pred = np.stack([np.sin(angles), np.zeros(5), np.cos(angles)], axis=-1)[None, None] * 3.0
    mask = np.array([1, 1, 1, 1, 0], np.float32).reshape(1, 1, 5, 1)
    ev = MultiTaskEvaluator(19, tasks=("normals",))
    ev.update({"normals": true, "normals_mask": mask}, {"normals": pred})
    r = ev.result()
    assert r["normals_mean_angle_deg"] == pytest.approx((0 + 10 + 20 + 45) / 4)
    assert r["normals_median_angle_deg"] == pytest.approx(15.0, abs=0.006)  # (10 + 20) / 2, to half a bin
    assert r["normals_within_11_25"] == pytest.approx(2 / 4)
    assert r["normals_within_22_5"] == pytest.approx(3 / 4)
    assert r["normals_within_30"] == pytest.approx(3 / 4)
    assert r["num_images"] == 1


def test_normals_streaming_median_is_exact_over_the_split():
    rng = np.random.default_rng(3)
    true = unit(rng.normal(size=(5, 6, 7, 3)))
    pred = true + rng.normal(size=true.shape) * rng.uniform(0.05, 1.0, size=(5, 1, 1, 1))
    mask = (rng.random((5, 6, 7, 1)) < 0.7).astype(np.float32)
    true[0, 0, 0] = 0.0  # an all-zero (invalid) target normal is skipped even inside the mask
    mask[0, 0, 0] = 1.0
    whole = MultiTaskEvaluator(19, tasks=("normals",))
    whole.update({"normals": true, "normals_mask": mask}, {"normals": pred})
    parts = MultiTaskEvaluator(19, tasks=("normals",))
    for a, b in [(0, 2), (2, 3), (3, 5)]:
        parts.update({"normals": true[a:b], "normals_mask": mask[a:b]}, {"normals": pred[a:b]})
    r1, r2 = whole.result(), parts.result()
    assert_results_equal(r1, r2)

    valid = (mask[..., 0] > 0.5) & (np.linalg.norm(true, axis=-1) > 0)
    cos = (unit(pred)[valid] * true[valid]).sum(-1)
    angles = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert r1["normals_mean_angle_deg"] == pytest.approx(angles.mean(), rel=1e-12)
    assert r1["normals_median_angle_deg"] == pytest.approx(np.median(angles), abs=0.005 + 1e-9)
    # ...over the split, not a mean of per-batch medians
    batch_medians = [np.median(angles[:valid[:2].sum()]), np.median(angles[valid[:2].sum():])]
    assert abs(np.mean(batch_medians) - np.median(angles)) > 0.01
    assert r1["normals_within_22_5"] == pytest.approx((angles < 22.5).mean())


def test_normals_with_other_tasks_and_empty_mask():
    targets, predictions = make_split(num_images=2)
    targets["normals"] = np.tile([0.0, 1.0, 0.0], (2, 6, 5, 1))
    targets["normals_mask"] = np.zeros((2, 6, 5, 1), np.float32)
    predictions["normals"] = np.tile([0.0, 0.0, 1.0], (2, 6, 5, 1))
    assert MultiTaskEvaluator(3).tasks == ("semantic", "instance", "depth")  # the default, as before normals
    ev = MultiTaskEvaluator(3, tasks=("normals", "depth", "semantic", "instance"))
    assert ev.tasks == ("semantic", "instance", "depth", "normals")
    ev.update(targets, predictions)
    r = ev.result()
    assert math.isnan(r["normals_mean_angle_deg"]) and math.isnan(r["normals_median_angle_deg"])
    assert math.isfinite(r["semantic_miou"])
    targets["normals_mask"][:] = 1.0
    ev.reset()
    ev.update(targets, predictions)
    assert ev.result()["normals_mean_angle_deg"] == pytest.approx(90.0)
    assert ev.result()["normals_median_angle_deg"] == pytest.approx(90.0, abs=0.005)
    assert ev.result()["normals_within_30"] == 0.0
    with pytest.raises(ValueError, match="Resize"):
        ev.update({"normals": targets["normals"]}, {"normals": predictions["normals"][:, :3]})


# ------------------------------------------------------------------------------------------------ evaluate_model

def test_evaluate_model_with_fake_keras_model():
    keras = pytest.importorskip("keras")
    targets, predictions = make_split(num_images=5, h=4, w=4)

    class FixedModel(keras.Model):
        """Returns the stored predictions for the images, indexed by the image's first pixel value."""

        def __init__(self, preds):
            super().__init__()
            self.preds = {k: keras.ops.convert_to_tensor(v) for k, v in preds.items()}

        def call(self, images, training=False):
            idx = keras.ops.cast(images[:, 0, 0, 0], "int32")
            return {k: keras.ops.take(v, idx, axis=0) for k, v in self.preds.items()}

    images = np.zeros((5, 4, 4, 3), np.float32)
    images[:, 0, 0, 0] = np.arange(5)
    batches = [(images[a:b], slice_dict(targets, a, b)) for a, b in [(0, 2), (2, 3), (3, 5)]]

    model = FixedModel(predictions)
    result = evaluate_model(model, batches, num_classes=3, tasks=("semantic", "instance", "depth"))
    ev = MultiTaskEvaluator(3)
    ev.update(targets, predictions)
    expected = ev.result()
    assert result.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(result[k], expected[k], rtol=1e-6, err_msg=k)

    # max_batches and inferred tasks
    result = evaluate_model(model, batches, num_classes=3, max_batches=1)
    assert result["num_images"] == 2
    assert {"semantic_miou", "instance_mean_error_px", "depth_mean_error_px"} <= result.keys()


def test_evaluate_model_with_functional_model_and_tf_dataset():
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    inputs = keras.Input((4, 4, 3))
    depth = keras.layers.Lambda(lambda x: x[..., :1] * 0.0 + 2.0)(inputs)
    model = keras.Model(inputs, {"depth": depth})
    images = np.zeros((3, 4, 4, 3), np.float32)
    targets = {"depth": np.full((3, 4, 4, 1), 4.0, np.float32), "depth_mask": np.ones((3, 4, 4, 1), np.float32)}
    ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(2)
    result = evaluate_model(model, ds, num_classes=19, tasks=("depth",))
    assert result == {"depth_mean_error_px": 2.0, "depth_rel_error": 0.5, "num_images": 3.0}
    dict_batches = [{"images": images, **targets}]  # dict batches with the images under "images"
    assert evaluate_model(model, dict_batches, num_classes=19, tasks=("depth",)) == result


# ------------------------------------------------------------------------------ LibMTL's NYUv2 metrics as a reference

class _LibMTLSegMetric:
    """LibMTL examples/nyu/utils.py SegMetric (lines 10-32) in numpy: a confusion matrix of argmax(softmax(logits))
    over the pixels with 0 <= label < num_classes (its ignore label is -1); mIoU = the plain mean of the per-class
    IoU (a class absent from both labels and predictions makes it NaN), pixel accuracy = trace / total."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.record = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update_fun(self, pred, gt):  # pred (B, C, H, W) logits, gt (B, H, W) float labels
        e = np.exp(pred - pred.max(axis=1, keepdims=True))
        pred = (e / e.sum(axis=1, keepdims=True)).argmax(1).flatten()
        gt = gt.astype(np.int64).flatten()
        k = (gt >= 0) & (gt < self.num_classes)
        inds = self.num_classes * gt[k] + pred[k]
        self.record += np.bincount(inds, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def score_fun(self):
        h = self.record.astype(np.float64)
        iu = np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h))
        return [np.mean(iu), np.diag(h).sum() / h.sum()]


class _LibMTLDepthMetric:
    """LibMTL examples/nyu/utils.py DepthMetric (lines 35-63): per batch, the mean abs and rel error over the pixels
    with gt != 0, then averaged over batches weighted by ``pred.size()[0]`` taken after ``masked_select``, i.e. the
    batch's valid pixel count (so the result is the pixel mean over the split)."""

    def __init__(self):
        self.abs_record, self.rel_record, self.bs = [], [], []

    def update_fun(self, pred, gt):  # (B, 1, H, W)
        binary_mask = (np.sum(gt, axis=1) != 0)[:, None]
        pred, gt = pred[binary_mask], gt[binary_mask]
        abs_err = np.abs(pred - gt)
        rel_err = np.abs(pred - gt) / gt
        n = int(np.count_nonzero(binary_mask))
        self.abs_record.append(np.sum(abs_err) / n)
        self.rel_record.append(np.sum(rel_err) / n)
        self.bs.append(pred.shape[0])

    def score_fun(self):
        records = np.stack([np.array(self.abs_record), np.array(self.rel_record)])
        batch_size = np.array(self.bs)
        return [(records[i] * batch_size).sum() / sum(batch_size) for i in range(2)]


class _LibMTLNormalMetric:
    """LibMTL examples/nyu/utils.py NormalMetric (lines 66-82): the prediction normalised, the ground truth used as
    stored (unit), pixels with sum(gt) != 0, degrees of acos(clamp(dot)); mean, median and shares strictly below
    11.25 / 22.5 / 30 over all pixels of the split."""

    def __init__(self):
        self.record = []

    def update_fun(self, pred, gt):  # (B, 3, H, W)
        pred = pred / np.linalg.norm(pred, axis=1, keepdims=True)
        binary_mask = np.sum(gt, axis=1) != 0
        error = np.degrees(np.arccos(np.clip(np.sum(pred * gt, 1)[binary_mask], -1, 1)))
        self.record.append(error)

    def score_fun(self):
        records = np.concatenate(self.record)
        return [np.mean(records), np.median(records), np.mean((records < 11.25) * 1.0),
                np.mean((records < 22.5) * 1.0), np.mean((records < 30) * 1.0)]


def test_nyuv2_metrics_match_libmtl_reference():
    """MultiTaskEvaluator against a numpy transliteration of LibMTL's NYUv2 metric classes, batch by batch.

    Definitional differences, kept out of the data here (none arises on the NYUv2 .npy release):
    - mIoU: LibMTL takes the plain mean over all 13 classes, NaN once a class is absent from both the labels and the
      predictions; ours averages the classes with a non-empty union (the CityScapes script's rule). Every class
      appears in the labels below.
    - ignore label: LibMTL's is -1 (any label outside 0..12), ours 255 (the loaders map -1 to 255).
    - normals mask: LibMTL keeps pixels whose gt components do not sum to 0 (a unit normal such as (1, -1, 0)/sqrt(2)
      would be dropped); ours keeps pixels whose normal is not all zero (normals_mask), and also re-normalises the
      ground truth. Unit normals with a non-zero sum below. A zero prediction: LibMTL NaN, ours 90 degrees.
    - depth rel error: LibMTL divides by every gt != 0 pixel, ours by gt > 0 (the loaders refuse negative depth).
    - median angle: ours is exact to half a 0.01-degree histogram bin (streaming), LibMTL's np.median exact.
    """
    rng = np.random.default_rng(0)
    num_classes, batches = 13, [(2, 24, 32), (3, 24, 32), (1, 24, 32)]  # unequal batches: the batch weighting counts
    ours = MultiTaskEvaluator(num_classes=num_classes, tasks=("semantic", "depth", "normals"))
    seg, depth, normal = _LibMTLSegMetric(num_classes), _LibMTLDepthMetric(), _LibMTLNormalMetric()
    for b, h, w in batches:
        labels = rng.integers(0, num_classes, size=(b, h, w))
        labels[:, 0, :num_classes] = np.arange(num_classes)  # every class present
        ignore = rng.random((b, h, w)) < 0.1
        logits = rng.normal(size=(b, h, w, num_classes)).astype(np.float32)
        logits += 2.0 * np.eye(num_classes, dtype=np.float32)[labels]  # better than chance
        true_depth = rng.uniform(0.5, 10.0, size=(b, h, w, 1))
        true_depth[rng.random((b, h, w)) < 0.15] = 0.0  # invalid pixels
        pred_depth = true_depth + rng.normal(scale=0.5, size=true_depth.shape)
        true_normals = rng.normal(size=(b, h, w, 3))
        true_normals /= np.linalg.norm(true_normals, axis=-1, keepdims=True)
        true_normals[rng.random((b, h, w)) < 0.15] = 0.0  # invalid pixels
        pred_normals = true_normals + rng.normal(scale=0.4, size=true_normals.shape)
        assert not np.any((true_normals.sum(-1) == 0) & (np.abs(true_normals).sum(-1) > 0))

        ours.update({"semantic": np.where(ignore, 255, labels), "depth": true_depth,
                     "depth_mask": (true_depth != 0).astype(np.float32), "normals": true_normals,
                     "normals_mask": (np.abs(true_normals).sum(-1) > 0).astype(np.float32)},
                    {"semantic": logits, "depth": pred_depth, "normals": pred_normals})
        nchw = (0, 3, 1, 2)
        seg.update_fun(logits.transpose(nchw), np.where(ignore, -1, labels).astype(np.float32))
        depth.update_fun(pred_depth.transpose(nchw), true_depth.transpose(nchw))
        normal.update_fun(pred_normals.transpose(nchw), true_normals.transpose(nchw))

    got = ours.result()
    miou, pix_acc = seg.score_fun()
    abs_err, rel_err = depth.score_fun()
    mean, median, within_11, within_22, within_30 = normal.score_fun()
    assert np.isfinite([miou, pix_acc, abs_err, rel_err, mean, median]).all()
    assert got["semantic_miou"] == pytest.approx(miou, rel=1e-12)
    assert got["semantic_pixel_accuracy"] == pytest.approx(pix_acc, rel=1e-12)
    assert got["depth_mean_error_px"] == pytest.approx(abs_err, rel=1e-9)
    assert got["depth_rel_error"] == pytest.approx(rel_err, rel=1e-9)
    assert got["normals_mean_angle_deg"] == pytest.approx(mean, rel=1e-9)
    assert abs(got["normals_median_angle_deg"] - median) <= 0.005 + 1e-9  # half a histogram bin
    assert got["normals_within_11_25"] == pytest.approx(within_11, rel=1e-12)
    assert got["normals_within_22_5"] == pytest.approx(within_22, rel=1e-12)
    assert got["normals_within_30"] == pytest.approx(within_30, rel=1e-12)
