"""The official CityScapes evaluation (``cityscapesscripts`` 2.3.0), run on our predictions, kept in a box.

Writing predictions in the formats the official scripts read:

* :func:`write_semantic_prediction`: one single-channel PNG of CityScapes *labelIds* (not trainIds) per image,
  ``{results}/{city}_{seq}_{frame}_pred_labelIds.png``, at the ground truth's resolution;
* :func:`write_instance_prediction`: ``{results}/{city}_{seq}_{frame}_pred.txt`` with one line
  ``masks/{stem}_{k:03d}.png {labelId} {confidence}`` per instance, and the mask PNGs (0 / 255) under
  ``{results}/masks/``.

Semantic and instance predictions need separate result folders: the pixel-level script takes *every*
``{city}_{seq}_{frame}*.png`` below its folder as the prediction and fails on two.

Running them: :func:`run_official_semantic` and :func:`run_official_instance` return the official result dicts.

Isolation. ``cityscapesscripts`` 2.3.0 breaks with numpy >= 2.4 (``np.in1d`` was removed) and, with numpy 2.3, in
the instance evaluator's JSON writing (numpy scalars); it also configures itself from environment variables read at
import time, writes ``matches.json`` into the current folder and calls ``sys.exit`` on any error. So the scripts
never run in this process: each call starts a fresh ``python`` subprocess (cwd = a temporary folder,
``CITYSCAPES_DATASET`` / ``CITYSCAPES_RESULTS`` set before the import) that loads this file without importing
``mtl_keras`` (hence its imports inside the functions that need it), installs two numpy shims scoped to that
subprocess, runs the evaluator and writes its result as JSON. Nothing is pinned.

Our own numbers on the same files: :func:`our_semantic_scores` reads the same prediction and ground-truth PNGs,
maps both through ``mtl_keras.labels.label_lookup_table`` and scores one confusion matrix with
``mtl_keras.evaluation.segmentation_scores``. That is apples to apples with the official ``averageScoreClasses``
(19 classes) / ``averageScoreCategories`` (7 categories) because both

* score at the ground-truth resolution, on the same files;
* count only ground-truth pixels of the 19 evaluated classes (every ``ignoreInEval`` label -> 255 -> skipped), so
  a prediction on an ignored pixel is no false positive for anyone;
* treat a predicted labelId outside the evaluated set as a miss (a false negative of the true class, no false
  positive): our matrix gets one extra "void" prediction column for them;
* average the per-class IoU over classes whose ``TP + FP + FN > 0`` (NaN otherwise).
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

SEMANTIC_SUFFIX = "pred_labelIds.png"
INSTANCE_SUFFIX = "pred.txt"


# ----------------------------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------------------------

def cityscapes_stem(path):
    """``{city}_{seq}_{frame}`` of a CityScapes file name (e.g. ``.../aachen_000000_000019_gtFine_labelIds.png``)."""
    parts = os.path.basename(os.fspath(path)).split("_")
    if len(parts) < 3:
        raise ValueError(f"{path} is not a CityScapes file name ({{city}}_{{seq}}_{{frame}}_...).")
    return "_".join(parts[:3])


def ground_truth_files(cityscapes_root, split="val", kind="labelIds"):
    """Sorted ``{root}/gtFine/{split}/*/*_gtFine_{kind}.png`` (``kind``: ``labelIds`` or ``instanceIds``)."""
    import glob

    pattern = os.path.join(glob.escape(os.fspath(cityscapes_root)), "gtFine", split, "*", f"*_gtFine_{kind}.png")
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No ground truth matches {pattern}.")
    return files


# ----------------------------------------------------------------------------------------------------------------
# Writing predictions
# ----------------------------------------------------------------------------------------------------------------

def _resize_nearest(x, size):
    import cv2

    if size is None or tuple(x.shape[:2]) == tuple(size):
        return x
    return cv2.resize(x, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)


def _imwrite(path, array):
    import cv2

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, array):
        raise OSError(f"Could not write {path}.")
    return path


def write_semantic_prediction(results_dir, stem, train_ids, num_classes=19, size=None):
    """Writes ``{results_dir}/{stem}_pred_labelIds.png``: the training-id map ``train_ids`` (H, W) as labelIds.

    ``num_classes`` 19 (exact inverse of the trainIds) or 7 (each category as its first label, e.g. flat -> road).
    ``size``: (H, W) of the ground truth; the map is resized with nearest neighbour when it differs. Returns the
    path.
    """
    from mtl_keras.labels import train_id_to_label_id

    train_ids = np.asarray(train_ids)
    if train_ids.ndim == 3 and train_ids.shape[-1] == 1:
        train_ids = train_ids[..., 0]
    table = train_id_to_label_id(num_classes)
    if train_ids.min(initial=0) < 0 or train_ids.max(initial=0) >= len(table):
        raise ValueError(f"train_ids must be in [0, {len(table)}), got [{train_ids.min()}, {train_ids.max()}].")
    label_ids = table[train_ids.astype(np.int64)].astype(np.uint8)
    return _imwrite(os.path.join(os.fspath(results_dir), f"{stem}_{SEMANTIC_SUFFIX}"),
                    _resize_nearest(label_ids, size))


def write_instance_prediction(results_dir, stem, instance_ids, classes, scores, num_classes=19, size=None):
    """Writes the official instance format for one image; returns the txt path.

    ``instance_ids``: (H, W) int, 0 = none, ``k + 1`` = instance ``k``; ``classes`` / ``scores``: per instance its
    training id and confidence (e.g. the fields of :class:`mtl_keras.instances.Instances`). One mask PNG per
    instance goes to ``{results_dir}/masks/{stem}_{k:03d}.png`` (255 = instance; resized with nearest neighbour
    to ``size`` when given) and one line per non-empty mask to ``{results_dir}/{stem}_pred.txt``. An image without
    instances gets an empty txt (the script needs one per ground-truth image).
    """
    from mtl_keras.labels import train_id_to_label_id

    results_dir = os.fspath(results_dir)
    instance_ids = _resize_nearest(np.asarray(instance_ids).astype(np.int32), size)
    table = train_id_to_label_id(num_classes)
    lines = []
    for k, (cls, score) in enumerate(zip(np.asarray(classes).reshape(-1), np.asarray(scores).reshape(-1))):
        mask = instance_ids == k + 1
        if not mask.any():
            continue
        rel = f"masks/{stem}_{k:03d}.png"
        _imwrite(os.path.join(results_dir, rel), mask.astype(np.uint8) * 255)
        lines.append(f"{rel} {int(table[int(cls)])} {float(score):.6f}\n")
    path = os.path.join(results_dir, f"{stem}_{INSTANCE_SUFFIX}")
    os.makedirs(results_dir, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(lines)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Our scores on the same files
# ----------------------------------------------------------------------------------------------------------------

def _read_png(path, flags=None):
    import cv2

    image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED if flags is None else flags)
    if image is None:
        raise FileNotFoundError(f"Could not read {path}.")
    return image


def our_semantic_scores(gt_label_files, prediction_files, num_classes=19):
    """Our mIoU on the official inputs: labelIds PNGs of ground truth and prediction, paired in order.

    Returns ``mtl_keras.evaluation.segmentation_scores`` of one confusion matrix over all pairs (C classes plus a
    "void" prediction column for predicted labelIds outside the evaluated set; ``per_class_iou`` / ``mean_iou``
    over the C classes) and ``"confusion"`` ((C+1, C+1), list of lists). ``num_classes`` 19 compares with the
    official ``averageScoreClasses``, 7 with ``averageScoreCategories`` (see the module docstring).
    """
    from mtl_keras.labels import label_lookup_table
    from mtl_keras.evaluation import IGNORE_LABEL, confusion_matrix, segmentation_scores

    if len(gt_label_files) != len(prediction_files):
        raise ValueError(f"{len(gt_label_files)} ground-truth files but {len(prediction_files)} predictions.")
    lut = label_lookup_table(num_classes).astype(np.int64)
    pred_lut = np.where(lut == IGNORE_LABEL, num_classes, lut)  # a non-evaluated predicted label -> "void" column
    confusion = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for gt_file, pred_file in zip(gt_label_files, prediction_files):
        gt = _read_png(gt_file)
        pred = _read_png(pred_file)
        if gt.shape != pred.shape:
            raise ValueError(f"{pred_file} is {pred.shape[:2]}, its ground truth {gt_file} {gt.shape[:2]}.")
        confusion += confusion_matrix(lut[gt], pred_lut[pred], num_classes + 1, IGNORE_LABEL)
    # The void class (index C) never occurs in the ground truth, so its row is empty: its column only adds to the
    # FN of the true class (row sums), never to anyone's FP. Its own IoU (0 or NaN) is dropped from the mean.
    scores = segmentation_scores(confusion)
    per_class = np.asarray(scores["per_class_iou"][:num_classes], dtype=np.float64)
    scores["per_class_iou"] = per_class.tolist()
    scores["mean_iou"] = float(np.nanmean(per_class)) if (~np.isnan(per_class)).any() else float("nan")
    scores["confusion"] = confusion.tolist()
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Running the official scripts (in a subprocess)
# ----------------------------------------------------------------------------------------------------------------

def _run_worker(task, timeout=None, verbose=False, **config):
    with tempfile.TemporaryDirectory(prefix="cityscapes_eval_") as tmp:
        config = dict(config, task=task, tmp=tmp, result=os.path.join(tmp, "result.json"), verbose=bool(verbose))
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        env = dict(os.environ)
        env["CITYSCAPES_DATASET"] = config["cityscapes_root"]
        env["CITYSCAPES_RESULTS"] = config["results_dir"]
        env.pop("CITYSCAPES_EXPORT_DIR", None)
        code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_cityscapes_eval_worker', "
                f"{os.path.abspath(__file__)!r}); m = importlib.util.module_from_spec(spec); "
                "spec.loader.exec_module(m); m._worker_main(sys.argv[1])")
        proc = subprocess.run([sys.executable, "-c", code, config_path], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(config["result"]):
            tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
            raise RuntimeError(f"The official CityScapes {task} evaluation failed (exit {proc.returncode}):\n{tail}")
        with open(config["result"]) as f:
            result = json.load(f)
        if verbose:
            print(proc.stdout)
        return result


def _gt_and_predictions(cityscapes_root, split, kind, gt_files):
    gt_files = ground_truth_files(cityscapes_root, split, kind) if gt_files is None else list(gt_files)
    return [os.path.abspath(os.fspath(p)) for p in gt_files]


def run_official_semantic(results_dir, cityscapes_root, split="val", gt_files=None, timeout=None, verbose=False):
    """Runs ``evalPixelLevelSemanticLabeling`` on ``results_dir`` against the split's ``*_gtFine_labelIds.png``.

    Each ground-truth file is paired with its prediction by the script's own ``getPrediction`` (the one
    ``{city}_{seq}_{frame}*.png`` below ``results_dir``); its ``*_gtFine_instanceIds.png`` must exist too (nIoU).
    Returns the official dict: ``averageScoreClasses`` (the official mIoU over the 19 classes),
    ``classScores`` ({name: IoU}), ``averageScoreCategories``, ``categoryScores``, ``averageScoreInstClasses``
    (iIoU), ``confMatrix`` (labelId x labelId) and ``predictionFiles`` / ``groundTruthFiles`` (the pairs used).
    """
    gt_files = _gt_and_predictions(cityscapes_root, split, "labelIds", gt_files)
    return _run_worker("semantic", timeout=timeout, verbose=verbose, gt_files=gt_files,
                       results_dir=os.path.abspath(os.fspath(results_dir)),
                       cityscapes_root=os.path.abspath(os.fspath(cityscapes_root)))


def run_official_instance(results_dir, cityscapes_root, split="val", gt_files=None, timeout=None, verbose=False):
    """Runs ``evalInstanceLevelSemanticLabeling`` on ``results_dir`` against the split's
    ``*_gtFine_instanceIds.png``; the ground-truth instance cache goes to a temporary file.

    Returns the official dict: ``averages`` with ``allAp`` (AP averaged over IoU 0.5:0.95 and the 8 classes, NaN
    classes skipped), ``allAp50%`` and ``classes`` ({name: {"ap", "ap50%"}}), plus ``resultApMatrix``, ...
    """
    gt_files = _gt_and_predictions(cityscapes_root, split, "instanceIds", gt_files)
    return _run_worker("instance", timeout=timeout, verbose=verbose, gt_files=gt_files,
                       results_dir=os.path.abspath(os.fspath(results_dir)),
                       cityscapes_root=os.path.abspath(os.fspath(cityscapes_root)))


# ----------------------------------------------------------------------------------------------------------------
# The subprocess side
# ----------------------------------------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else None
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return _jsonable(vars(value))
    return value


def _install_shims():
    """Numpy compatibility for cityscapesscripts 2.3.0, installed only in the worker subprocess."""
    if not hasattr(np, "in1d"):
        def in1d(ar1, ar2, assume_unique=False, invert=False, **kwargs):
            return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert, **kwargs)

        np.in1d = in1d

    def write_dict_to_json(data, file_name):
        with open(file_name, "w") as f:
            json.dump(_jsonable(data), f, sort_keys=True, indent=4)

    return write_dict_to_json


def _worker_main(config_path):  # pragma: no cover - runs in the subprocess (exercised by the tests through it)
    with open(config_path) as f:
        config = json.load(f)
    write_json = _install_shims()
    quiet = not config.get("verbose")
    gt_files = config["gt_files"]
    if config["task"] == "semantic":
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

        ev.writeDict2JSON = write_json
        args = ev.args
        args.predictionPath = config["results_dir"]
        args.predictionWalk = None
        args.exportFile = os.path.join(config["tmp"], "resultPixelLevelSemanticLabeling.json")
        args.quiet = quiet
        args.colorized = False
        args.bold = args.nocol = ""
        predictions = [ev.getPrediction(args, gt) for gt in gt_files]
        result = ev.evaluateImgLists(predictions, gt_files, args)
    else:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as ev

        ev.writeDict2JSON = write_json
        args = ev.args
        args.predictionPath = config["results_dir"]
        args.predictionWalk = None
        args.exportFile = os.path.join(config["tmp"], "resultInstanceLevelSemanticLabeling.json")
        args.gtInstancesFile = os.path.join(config["tmp"], "gtInstances.json")
        args.quiet = quiet
        args.colorized = False
        args.JSONOutput = True
        predictions = [ev.getPrediction(gt, args) for gt in gt_files]
        result = ev.evaluateImgLists(predictions, gt_files, args)
    result = dict(result)
    result["predictionFiles"] = predictions
    result["groundTruthFiles"] = gt_files
    write_json(result, config["result"])


__all__ = [
    "cityscapes_stem", "ground_truth_files", "write_semantic_prediction", "write_instance_prediction",
    "our_semantic_scores", "run_official_semantic", "run_official_instance",
]
