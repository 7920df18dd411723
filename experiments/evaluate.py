"""Evaluate a trained multi-task model on a split: metrics, instance segmentation, pictures, official CityScapes scores.

    python experiments/evaluate.py --model_path runs/default                       # a training output folder
    python experiments/evaluate.py --model_path runs/default --official            # + the cityscapesscripts scores
    python experiments/evaluate.py --model_path runs/default/model.keras --dataset cityscapes --data_dir /data/cs
    python experiments/evaluate.py --model_path runs/default/export --clustering optics   # a SavedModel
    python experiments/evaluate.py --model_path kendall_deeplabv3_resnet26_slim_synthetic   # a preset

``--model_path``: a training output folder (its ``model.keras``; data settings from its ``config.json``), a
``.keras`` file (``keras.saving.load_model``, safe mode on), an exported SavedModel folder (the serving export of
``experiments/export.py`` and of a run's ``export/``, outputs ``semantic_logits``, ``instance_vectors``, ``depth``,
``normals``; also an older ``model.export`` with outputs named ``semantic``, ``instance``, ``depth``), or a preset
name or preset folder (``mtl_keras.presets.load_model``). For a file or a SavedModel, the ``config.json`` of the folder
around it (e.g. ``runs/x`` for ``runs/x/export``), when there is one, supplies the data settings; flags override them.

Tasks evaluated: ``--tasks``, else the run's (its ``config.json``), else those the dataset supplies. A task the model
has no output for is an error (one line naming the model path and the missing output, exit status 2, nothing
written): an evaluation never covers fewer tasks than asked.

Writes to ``--output_dir``, default: one folder per evaluated model and split (``eval/`` in a run folder for its model
on ``val``, ``eval_export/``, ``eval_model/`` for its SavedModel or ``.keras`` file, ``eval_test/`` for ``--split
test``, next to the model file otherwise). An earlier evaluation in that folder is replaced whole; a folder holding
other files is refused:

* ``metrics.json``: everything below, ``metrics.md``: the same as a markdown table;
* the streaming metrics of ``mtl_keras.evaluation.MultiTaskEvaluator`` at the model's resolution (mIoU, per-class
  IoU, pixel accuracy, instance-vector error, inverse-depth errors, normals when present);
* instance segmentation from the predicted semantics + centroid votes (``--clustering histogram|optics|none``):
  adjusted Rand index against the ground-truth instances (``instance_ari_mean`` per image, ``instance_ari_split``
  over the whole split) and the clustering time per image;
* with ``--official`` (CityScapes-layout datasets: ``cityscapes``, ``synthetic``): predictions written in the
  official formats at the ground truth's resolution (semantic logits upsampled bilinearly, instance masks nearest)
  under ``cityscapes_results/``, the official ``evalPixelLevelSemanticLabeling`` / ``evalInstanceLevelSemantic
  Labeling`` results (mIoU, iIoU, AP, AP50), and our mIoU on the very same files with the difference to the
  official one (it should be 0);
* ``--baseline_metrics`` (``metrics.json`` files of single-task runs): ``delta_m`` in percent, Delta_m =
  100 / T sum over tasks of the mean over the task's metrics of (-1)^{w} (M_b - M_m) / M_b, w = 1 where higher
  is better (LibMTL's count_improvement, as the benchmark's table); POSITIVE = the multi-task model is better
  (:func:`delta_m`);
* ``images/``: for the first ``--num_images`` images, the semantic prediction and ground truth in CityScapes
  colours, the inverse depth colour map, surface normals (when predicted), the instances over the image, and the
  usual prediction panel;
* ``sigma2.png``: the sigma^2 curves of training from the run's ``metrics.json`` (``train_history``) when present,
  and a copy of the run's ``task_weights.png``.
"""

import json
import logging
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mtl_keras import cli  # noqa: E402

log = logging.getLogger("mtl_keras.evaluate")

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "Run folder, .keras file, SavedModel folder, or preset name or folder.")
flags.DEFINE_string("dataset", None, "Dataset name (default: the run's, else synthetic).")
flags.DEFINE_string("data_dir", None, "Dataset root (default: the run's, else data/synthetic for synthetic).")
flags.DEFINE_string("split", "val", "Split to evaluate.")
flags.DEFINE_list("image_size", None, "height,width fed to the model (default: the run's, else the model's input).")
flags.DEFINE_integer("num_classes", None, "Semantic classes (default: the run's, else the model's output).")
flags.DEFINE_list("tasks", None, "Tasks to evaluate (default: the run's, else the dataset's); each needs a model "
                  "output.")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("max_batches", 0, "Evaluate only this many batches (0: the whole split).")
flags.DEFINE_enum("clustering", "histogram", ["histogram", "optics", "none"], "Instance clustering method.")
flags.DEFINE_boolean("official", False, "Also run the official CityScapes evaluation scripts.")
flags.DEFINE_list("baseline_metrics", [], "metrics.json files of single-task runs, for Delta_m.")
flags.DEFINE_integer("num_images", 4, "Images to draw.")
flags.DEFINE_string("output_dir", None, "Output folder (default: eval/ in a run folder, eval_MODEL[_SPLIT]/ for "
                    "another model file or split, beside it, or in the working folder for a preset name); an earlier "
                    "evaluation there is replaced.")

# Delta_m over these metrics, where both the model and the baselines have them: {metric: higher is better}.
DELTA_M_METRICS = {"semantic_miou": True, "instance_mean_error_px": False, "depth_mean_error_px": False,
                   "normals_mean_angle_deg": False}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def _read_json(path):
    from mtl_keras.config import read_json

    return read_json(path)


# Outputs of a SavedModel and the task each holds: the serving export's names (mtl_keras.export.OUTPUT_NAMES), and the
# task names themselves, as Keras' model.export(format="tf_saved_model") wrote them (run exports before the serving
# export). Outputs that are no task's: the export's argmax labels and instance ids (evaluate.py clusters itself).
SAVED_MODEL_OUTPUTS = {"semantic_logits": "semantic", "instance_vectors": "instance", "depth": "depth",
                       "normals": "normals", "semantic": "semantic", "instance": "instance"}
DERIVED_OUTPUTS = ("semantic_labels", "instance_ids")


def _looks_like_a_path(model_path):
    return (os.sep in model_path or (os.altsep or os.sep) in model_path or model_path.startswith(".")
            or model_path.endswith((".keras", ".h5")))


def _keras_predictor(model, info):
    """Fills ``info`` from a Keras model (input size, classes, tasks, outputs) and returns its ``predict``."""
    import numpy as np

    from mtl_keras.evaluation import TASKS

    shape = model.input_shape
    if isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[1] and shape[2]:
        info["input_size"] = (int(shape[1]), int(shape[2]))
    outputs = model.output if isinstance(model.output, dict) else {}
    if "semantic" in outputs:
        info["num_classes"] = int(outputs["semantic"].shape[-1])
    info["outputs"] = {t: t for t in outputs}
    info["model_tasks"] = [t for t in TASKS if t in outputs]

    def predict(images):
        out = model.predict_on_batch(np.asarray(images, np.float32))
        return {k: np.asarray(v) for k, v in out.items()}

    return predict


def _saved_model_predictor(model_path, info):
    """Fills ``info`` from a SavedModel (the serving export of mtl_keras.export, or an older ``model.export``) and
    returns its ``predict``, whose outputs are renamed to their tasks."""
    import numpy as np
    import tensorflow as tf

    from mtl_keras.evaluation import TASKS

    export_info = None
    info_file = os.path.join(model_path, "assets.extra", "export_info.json")
    if os.path.isfile(info_file):
        export_info = _read_json(info_file)
    loaded = tf.saved_model.load(model_path)
    serve = getattr(loaded, "serve", None)  # the float32 function (both kinds of export); positional images
    signature = loaded.signatures.get("serving_default") or loaded.signatures.get("serve")
    if signature is None and serve is None:
        raise ValueError(f"SavedModel {model_path} has neither a serve function nor a serving_default signature.")
    names = []
    if signature is not None:
        spec = list(signature.structured_input_signature[1].values())[0]
        if spec.shape.rank == 4 and spec.shape[1] and spec.shape[2]:
            info["input_size"] = (int(spec.shape[1]), int(spec.shape[2]))
        names = sorted(signature.structured_outputs)
        for name in ("semantic_logits", "semantic"):
            sem = signature.structured_outputs.get(name)
            if sem is not None and sem.shape[-1]:
                info["num_classes"] = int(sem.shape[-1])
                break
    if export_info:
        config = export_info.get("config") or {}
        shape = config.get("input_shape")
        if info["input_size"] is None and shape and len(shape) == 3 and shape[0] and shape[1]:
            info["input_size"] = (int(shape[0]), int(shape[1]))
        if info["num_classes"] is None and config.get("num_classes"):
            info["num_classes"] = int(config["num_classes"])
        names = names or list(export_info.get("outputs", []))
    unknown = [n for n in names if n not in SAVED_MODEL_OUTPUTS and n not in DERIVED_OUTPUTS]
    if unknown:
        log.warning("SavedModel %s: outputs %s are no task's; evaluate.py leaves them out.", model_path, unknown)
    renames = {n: SAVED_MODEL_OUTPUTS[n] for n in names if n in SAVED_MODEL_OUTPUTS}
    info["outputs"] = {task: name for name, task in renames.items()}
    info["model_tasks"] = [t for t in TASKS if t in info["outputs"]]
    declared = [t for t in (export_info or {}).get("tasks", []) if t not in info["outputs"]]
    if declared:
        raise ValueError(f"SavedModel {model_path}: its export_info.json lists task(s) {', '.join(declared)} but it "
                         f"has no output for them (outputs: {', '.join(names)}).")

    def predict(images, _keep_alive=loaded):  # the functions need the loaded object (its variables) alive
        images = tf.constant(np.asarray(images, np.float32))
        out = serve(images) if serve is not None else signature(**{list(
            signature.structured_input_signature[1])[0]: images})
        if not isinstance(out, dict):
            raise ValueError(f"SavedModel {model_path} returns {type(out).__name__}, not a dict of named outputs.")
        return {renames[k]: np.asarray(v) for k, v in out.items() if k in renames}

    return predict


def load_predictor(model_path):
    """``(predict, info)``: ``predict(images float32 (B,H,W,3)) -> {task: numpy array}`` and ``info`` with
    ``kind`` (run / keras / saved_model / preset), ``run_dir`` (the folder holding ``config.json``, or None),
    ``config`` (its dict or None), ``input_size`` ((H, W) or None), ``num_classes`` (or None), ``model_tasks`` (the
    tasks the model has an output for) and ``outputs`` ({task: the model's output name}).

    ``model_path``: a run folder (its ``model.keras``), a ``.keras`` file, a SavedModel folder (the serving export
    of ``mtl_keras.export``, or an older ``model.export`` with outputs named by task), or a preset name or preset
    folder (``mtl_keras.presets.load_model``)."""
    model_path = os.fspath(model_path)
    as_path = os.path.abspath(model_path)
    if os.path.isdir(as_path) and os.path.isfile(os.path.join(as_path, "saved_model.pb")):
        kind, run_dir = "saved_model", os.path.dirname(as_path)
    elif os.path.isdir(as_path) and os.path.isfile(os.path.join(as_path, "model.keras")):
        kind, run_dir = "run", as_path
    elif as_path.endswith(".keras") and os.path.isfile(as_path):
        kind, run_dir = "keras", os.path.dirname(as_path)
    elif os.path.isdir(as_path) and os.path.isfile(os.path.join(as_path, "config.json")) and os.path.isdir(
            os.path.join(as_path, "checkpoints")):  # a run folder without model.keras: its last checkpoint
        kind, run_dir = "run", as_path
    elif os.path.isdir(as_path) or (not os.path.exists(as_path) and not _looks_like_a_path(model_path)):
        kind, run_dir = "preset", None
    else:
        raise FileNotFoundError(f"--model_path {model_path} is neither a run folder (with model.keras), a .keras "
                                f"file, a SavedModel folder (with saved_model.pb) nor a preset name or folder.")
    if kind != "preset":
        model_path = as_path
    config = None
    from mtl_keras.presets import is_preset_dir, read_preset_metadata

    if kind == "preset" and is_preset_dir(as_path):
        # A preset folder carries its training config (dataset, data folder, image size, tasks); inside a run folder
        # (RUN/preset) its evaluation goes beside the run's own, as eval_preset/.
        model_path = as_path
        config = read_preset_metadata(as_path).get("training")
        parent = os.path.dirname(as_path)
        run_dir = parent if os.path.isfile(os.path.join(parent, "config.json")) else None
    elif run_dir is not None:
        config_path = os.path.join(run_dir, "config.json")
        config = _read_json(config_path) if os.path.isfile(config_path) else None
        if config is None and kind != "run":
            run_dir = None
    info = {"kind": kind, "model_path": model_path, "run_dir": run_dir, "config": config, "input_size": None,
            "num_classes": None}

    if kind == "saved_model":
        return _saved_model_predictor(model_path, info), info
    # The model itself through the package's one loader of each kind: a run (its preset/, model.keras or last
    # checkpoint), else a .keras file, a preset folder or a name (safe_mode on, sha256 checked).
    from mtl_keras.experiment import load_run
    from mtl_keras.presets import load_model

    try:
        model = load_run(model_path) if kind == "run" else load_model(model_path)
    except (ValueError, OSError) as e:
        if kind != "preset":
            raise
        raise ValueError(f"--model_path {model_path} is neither a run folder, a .keras file nor a SavedModel "
                         f"folder, and as a preset: {e}") from e
    return _keras_predictor(model, info), info


def tasks_to_evaluate(info, dataset, tasks=None):
    """The tasks to evaluate: ``tasks`` (--tasks), else the run's config.json tasks, else those ``dataset`` supplies
    (those of the model's tasks it supplies when the model has more). Raises ValueError, one line naming the model
    path and the missing output, when the model has no output for one of them: evaluating fewer tasks than asked is
    never silent."""
    from mtl_keras.data.datasets import dataset_entry
    from mtl_keras.evaluation import TASKS

    unknown = [t for t in (tasks or ()) if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks {','.join(unknown)}: unknown task(s); valid: {', '.join(TASKS)}.")
    if tasks:
        wanted, source = list(tasks), "--tasks"
    elif info["config"] and info["config"].get("tasks"):
        wanted, source = list(info["config"]["tasks"]), f"the tasks of {os.path.join(info['run_dir'], 'config.json')}"
    else:
        wanted, source = list(dataset_entry(dataset).tasks), f"the tasks of dataset {dataset}"
    wanted = [t for t in TASKS if t in wanted]
    missing = [t for t in wanted if t not in info["model_tasks"]]
    if missing:
        from mtl_keras.export import OUTPUT_NAMES

        expected = ", ".join(f"{t} ({OUTPUT_NAMES.get(t, t)})" for t in missing)
        has = ", ".join(info["outputs"].values()) or "none"
        present = [t for t in wanted if t not in missing]
        hint = f"; pass --tasks={','.join(present)} to evaluate only those" if present else ""
        raise ValueError(f"{info['model_path']} has no output for task(s) {expected}, which {source} ask(s) to "
                         f"evaluate (its outputs: {has}){hint}. Nothing was written.")
    return wanted


def _train_config(config_dict):
    from mtl_keras.config import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in (config_dict or {}).items() if k in fields}
    if hasattr(TrainConfig, "from_dict"):
        return TrainConfig.from_dict(values)
    defaults = TrainConfig()
    return defaults.replace(**{k: tuple(v) if isinstance(getattr(defaults, k), tuple) else v
                               for k, v in values.items()})


def resolve_settings(info, dataset=None, data_dir=None, image_size=None, num_classes=None, tasks=None):
    """Data settings: flags, else the run's config.json, else the model's, else the defaults."""
    config = info["config"] or {}
    settings = {
        "dataset": dataset or config.get("dataset") or "synthetic",
        "data_dir": data_dir if data_dir is not None else config.get("data_dir", ""),
        "image_size": tuple(int(v) for v in (image_size or config.get("image_size") or info["input_size"]
                                             or (128, 256))),
        "num_classes": int(num_classes or config.get("num_classes") or info["num_classes"] or 19),
        "tasks": tuple(tasks) if tasks else None,
    }
    if settings["dataset"] == "synthetic" or settings["data_dir"]:
        from mtl_keras.experiment import resolve_data_dir

        cfg = _train_config(dict(config, dataset=settings["dataset"], data_dir=settings["data_dir"]))
        settings["data_dir"] = resolve_data_dir(cfg)
    if not settings["data_dir"]:
        raise ValueError(f"--data_dir is required for --dataset {settings['dataset']}.")
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

def _resize_to(x, size, nearest=False):
    """(B, h, w, C) -> (B, H, W, C) (bilinear, or nearest for label maps)."""
    import cv2
    import numpy as np

    x = np.asarray(x)
    if x.shape[1:3] == tuple(size):
        return x
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    out = []
    for item in x:
        channels = [cv2.resize(np.ascontiguousarray(item[..., c]), (size[1], size[0]), interpolation=interp)
                    for c in range(item.shape[-1])]
        out.append(np.stack(channels, axis=-1))
    return np.stack(out).astype(x.dtype)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return _finite_or_none(value.item())
    except ImportError:  # pragma: no cover
        pass
    return value


def default_output_dir(info, split):
    """One folder per evaluated model and split: ``eval`` in a run folder for its model on ``val``; ``eval_{model}``
    for another model file or SavedModel there (``eval_export``, ``eval_last``), ``_{split}`` for another split."""
    base = info["run_dir"] or (os.path.dirname(os.path.abspath(info["model_path"])) if info["kind"] != "run"
                               else info["model_path"])
    name = "eval"
    if info["kind"] != "run":
        stem = os.path.basename(os.path.normpath(info["model_path"]))
        for suffix in (".weights.h5", ".keras", ".h5"):
            stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
        name += f"_{stem}"
    if split != "val":
        name += f"_{split}"
    return os.path.join(base, name)


def check_not_the_runs_eval(info, output_dir):
    """Refuses to write the evaluation of anything but a run folder's own model into that run's ``eval/`` (an
    export or a ``.keras`` file of the run gets ``eval_export/``, ``eval_model/``): the run's evaluation stays."""
    if info["kind"] == "run":
        return
    target = os.path.realpath(os.path.abspath(output_dir))
    for folder in {info["run_dir"], os.path.dirname(os.path.abspath(info["model_path"]))} - {None}:
        run_eval = os.path.realpath(os.path.join(folder, "eval"))
        if target == run_eval and os.path.isfile(os.path.join(folder, "model.keras")):
            raise ValueError(f"--output_dir {output_dir} is the run's own evaluation folder; the {info['kind']} "
                             f"{info['model_path']} is evaluated into {default_output_dir(info, 'val')} by default.")


def prepare_output_dir(output_dir):
    """An empty folder for this evaluation: an earlier evaluation there (its ``metrics.json``) is replaced whole, so
    no stale picture or result file stays beside the new ones; a folder holding anything else is refused."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file; expected a folder for the evaluation.")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not os.path.isfile(os.path.join(output_dir, "metrics.json")):
            raise ValueError(f"--output_dir {output_dir} holds files that are not an earlier evaluation; choose "
                             f"another --output_dir.")
        log.info("Replacing the earlier evaluation in %s.", output_dir)
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)


def delta_m(multi_task, single_task, higher_is_better):
    """Delta_m in percent over the metrics of ``higher_is_better`` (``{metric: bool}``), grouped by task as
    :func:`mtl_keras.benchmark.delta_m` (LibMTL's count_improvement, the benchmark's table): POSITIVE means the
    multi-task model is better. A metric missing from either dict is a KeyError, a zero or non-finite baseline or a
    non-finite multi-task value a ValueError."""
    from mtl_keras import benchmark
    from mtl_keras.tasks import TASKS

    if not higher_is_better:
        raise ValueError("higher_is_better must name at least one metric.")
    missing = [k for k in higher_is_better if k not in multi_task or k not in single_task]
    if missing:
        raise KeyError(f"Metrics missing from multi_task or single_task: {missing}.")
    directions = {}
    for name, higher in higher_is_better.items():
        for label, value in (("Baseline", single_task[name]), ("Multi-task value", multi_task[name])):
            if not math.isfinite(float(value)) or (label == "Baseline" and float(value) == 0.0):
                raise ValueError(f"{label} of {name!r} must be finite{' and non-zero' if label == 'Baseline' else ''}, "
                                 f"got {value}.")
        task = next((t for t in TASKS if name.startswith(f"{t}_")), name)
        directions.setdefault(task, {})[name] = "higher" if higher else "lower"
    return benchmark.delta_m({k: float(multi_task[k]) for k in higher_is_better},
                             {k: float(single_task[k]) for k in higher_is_better}, directions)


def run_evaluation(model_path, dataset=None, data_dir=None, split="val", image_size=None, num_classes=None,
                   tasks=None, batch_size=8, max_batches=0, clustering="histogram", official=False,
                   baseline_metrics=(), num_images=4, output_dir=None):
    """Everything ``experiments/evaluate.py`` does; returns the dict written to ``metrics.json``."""
    import cv2
    import numpy as np

    from mtl_keras import visualize as viz
    from mtl_keras.data.datasets import class_table, dataset_entry, load_dataset
    from mtl_keras.labels import label_lookup_table
    from mtl_keras.evaluation import TASKS, MultiTaskEvaluator
    from mtl_keras.instances import InstanceQuality, cluster_instances, instance_ids_from_vectors

    start = time.time()
    predict, info = load_predictor(model_path)
    # Tasks: --tasks, else the run's, else the dataset's; every one needs a model output (checked before anything
    # is written or generated).
    eval_tasks = tasks_to_evaluate(info, dataset or (info["config"] or {}).get("dataset") or "synthetic", tasks)
    settings = resolve_settings(info, dataset, data_dir, image_size, num_classes, eval_tasks)
    height, width = settings["image_size"]
    num_classes = settings["num_classes"]
    if output_dir is None:
        output_dir = default_output_dir(info, split)
    check_not_the_runs_eval(info, output_dir)
    probe = predict(np.zeros((1, height, width, 3), np.float32))
    missing = [t for t in eval_tasks if t not in probe]
    if missing:  # the model declared an output its predictions lack
        raise ValueError(f"{info['model_path']} returned no output for task(s) {', '.join(missing)} (it returned "
                         f"{', '.join(sorted(probe))}). Nothing was written.")
    prepare_output_dir(output_dir)
    image_dir = os.path.join(output_dir, "images")
    ds = load_dataset(settings["dataset"], settings["data_dir"], split, image_size=(height, width),
                      batch_size=batch_size, num_classes=num_classes, tasks=tuple(eval_tasks), shuffle=False,
                      flip=False)

    cityscapes_layout = dataset_entry(settings["dataset"]).cityscapes_layout
    files = None
    if cityscapes_layout:
        from mtl_keras.data.cityscapes import list_cityscapes_files

        files = list_cityscapes_files(settings["data_dir"], split, require=("label_ids", "instance_ids"))
    do_official = bool(official)
    if do_official and (not cityscapes_layout or num_classes not in (7, 19)):
        raise ValueError(f"--official needs a CityScapes-layout dataset (cityscapes, synthetic) with 7 or 19 "
                         f"classes, got {settings['dataset']} with {num_classes}.")
    try:  # the dataset's class names, colours and instance classes (a model of another class count: numbered)
        table = class_table(settings["dataset"], num_classes, settings["data_dir"])
    except ValueError:
        table = None
    do_instances = (clustering != "none" and "semantic" in probe and "instance" in probe
                    and table is not None and bool(table.instance_ids))
    results_root = os.path.join(output_dir, "cityscapes_results")
    if do_official:
        import cityscapes_eval as ce  # experiments/cityscapes_eval.py, beside this script

        shutil.rmtree(results_root, ignore_errors=True)
        sem_results, inst_results = os.path.join(results_root, "semantic"), os.path.join(results_root, "instance")
    palette = table.colors if table is not None else viz.default_palette(num_classes)
    # Legend names: the dataset's (mtl_keras.data.datasets.class_table); numbered names otherwise.
    names = list(table.names) if table is not None else None
    lut = label_lookup_table(num_classes) if num_classes in (7, 19) else None

    evaluator = MultiTaskEvaluator(num_classes, eval_tasks)
    quality = InstanceQuality()
    cluster_times, predict_times = [], []
    gt_files, pred_files, index = [], [], 0
    for b, (images, targets) in enumerate(ds):
        if max_batches and b >= max_batches:
            break
        images = np.asarray(images, np.float32)
        targets = {k: np.asarray(v) for k, v in targets.items()}
        t0 = time.perf_counter()
        preds = predict(images)
        predict_times.append((time.perf_counter() - t0) / len(images))
        preds = {k: _resize_to(v, (height, width)) for k, v in preds.items() if k in TASKS}
        evaluator.update(targets, {k: preds[k] for k in eval_tasks})
        for i in range(len(images)):
            entry = files[index] if files is not None else None
            stem = entry["id"] if entry is not None else f"{split}_{index:05d}"  # {city}_{seq}_{frame}
            instances = None
            if do_instances:
                t0 = time.perf_counter()
                instances = cluster_instances(preds["semantic"][i], preds["instance"][i], method=clustering,
                                              instance_classes=list(table.instance_ids),
                                              num_classes=num_classes)
                cluster_times.append(time.perf_counter() - t0)
                if "instance" in targets:
                    true_ids = instance_ids_from_vectors(targets["instance"][i], targets["instance_mask"][i])
                    quality.update(true_ids, instances.ids)
            if do_official:
                gt_file = entry["label_ids"]
                gt_label_ids = cv2.imread(gt_file, cv2.IMREAD_UNCHANGED)
                gt_shape = gt_label_ids.shape[:2]
                if "semantic" in targets:  # the loader must have yielded this very file
                    expected = lut[cv2.resize(gt_label_ids, (width, height), interpolation=cv2.INTER_NEAREST)]
                    if (expected == targets["semantic"][i]).mean() < 0.8:
                        raise RuntimeError(f"Image {index} of the dataset does not match {gt_file}: the split's "
                                           f"file order differs from list_cityscapes_files'.")
                logits = _resize_to(preds["semantic"][i:i + 1], gt_shape)[0]
                pred_files.append(ce.write_semantic_prediction(sem_results, ce.cityscapes_stem(gt_file),
                                                               np.argmax(logits, axis=-1), num_classes))
                gt_files.append(gt_file)
                if instances is not None:
                    ce.write_instance_prediction(inst_results, ce.cityscapes_stem(gt_file), instances.ids,
                                                 instances.classes, instances.scores, num_classes, size=gt_shape)
            if index < num_images:
                _draw(image_dir, index, stem, images[i], {k: v[i] for k, v in preds.items()},
                      {k: v[i] for k, v in targets.items()}, instances, palette, viz, class_names=names)
            index += 1

    metrics = {
        "model_path": info["model_path"], "model_kind": info["kind"], "dataset": settings["dataset"],
        "data_dir": os.path.abspath(settings["data_dir"]), "split": split, "image_size": [height, width],
        "num_classes": num_classes, "tasks": list(eval_tasks), "clustering": clustering if do_instances else "none",
    }
    metrics.update(evaluator.result())
    if names is not None and "semantic_per_class_iou" in metrics:
        metrics["semantic_per_class_iou_named"] = dict(zip(names,
                                                           metrics["semantic_per_class_iou"]))
    if do_instances:
        metrics.update(quality.result())
        metrics["clustering_ms_median"] = 1000.0 * float(np.median(cluster_times)) if cluster_times else math.nan
        metrics["clustering_ms_mean"] = 1000.0 * float(np.mean(cluster_times)) if cluster_times else math.nan
    metrics["predict_ms_per_image"] = 1000.0 * float(np.mean(predict_times)) if predict_times else math.nan

    if do_official:
        official_sem = ce.run_official_semantic(sem_results, settings["data_dir"], split, gt_files=gt_files)
        ours = ce.our_semantic_scores(gt_files, pred_files, num_classes)
        key = "averageScoreClasses" if num_classes == 19 else "averageScoreCategories"
        off = official_sem[key]
        off = math.nan if off is None else float(off)
        metrics["official_semantic_miou"] = off
        metrics["official_semantic_iiou"] = (official_sem.get("averageScoreInstClasses") if num_classes == 19
                                             else official_sem.get("averageScoreInstCategories"))
        metrics["official_our_semantic_miou_same_files"] = ours["mean_iou"]
        metrics["official_miou_abs_difference"] = abs(ours["mean_iou"] - off)
        metrics["official_gt_resolution"] = list(cv2.imread(gt_files[0], cv2.IMREAD_UNCHANGED).shape[:2])
        if do_instances:
            inst_gt = [f.replace("_gtFine_labelIds.png", "_gtFine_instanceIds.png") for f in gt_files]
            official_inst = ce.run_official_instance(inst_results, settings["data_dir"], split, gt_files=inst_gt)
            averages = official_inst["averages"]
            metrics["official_instance_ap"] = averages["allAp"]
            metrics["official_instance_ap50"] = averages["allAp50%"]
            metrics["official_instance_ap_per_class"] = {k: v["ap"] for k, v in averages["classes"].items()}

    if baseline_metrics:
        baseline = {}
        for path in baseline_metrics:
            data = _read_json(path)
            data = data.get("val", data) if "semantic_miou" not in data and "val" in data else data
            for k, v in data.items():
                baseline.setdefault(k, v)
        used = {k: hib for k, hib in DELTA_M_METRICS.items()
                if isinstance(metrics.get(k), float) and math.isfinite(metrics[k])
                and isinstance(baseline.get(k), (int, float)) and baseline.get(k)}
        if used:
            metrics["delta_m"] = delta_m(metrics, baseline, used)
            metrics["delta_m_metrics"] = {k: {"multi_task": metrics[k], "single_task": float(baseline[k]),
                                              "higher_is_better": hib} for k, hib in used.items()}

    if info["run_dir"]:
        run_metrics = os.path.join(info["run_dir"], "metrics.json")
        if os.path.isfile(run_metrics):
            series = viz.sigma2_history(run_metrics)
            if series:
                viz.plot_task_weights(series, os.path.join(output_dir, "sigma2.png"),
                                      title="learned sigma^2 during training", xlabel="epoch")
                metrics["train_sigma2_final"] = {k: v[-1] for k, v in series.items()}
        weights_png = os.path.join(info["run_dir"], "task_weights.png")
        if os.path.isfile(weights_png):
            shutil.copyfile(weights_png, os.path.join(output_dir, "task_weights.png"))

    metrics["num_images_drawn"] = min(index, num_images)
    metrics["wall_seconds"] = time.time() - start
    metrics = _finite_or_none(metrics)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    with open(os.path.join(output_dir, "metrics.md"), "w") as f:
        f.write(markdown_table(metrics))
    return metrics


def _draw(image_dir, index, stem, image, pred, target, instances, palette, viz, class_names=None):
    """One image's pictures. The panel shows ``instances`` (clustered by the caller, not again; without them, as
    with ``--clustering none``, no instances tile) and a legend named by ``class_names``."""
    import numpy as np

    prefix = os.path.join(image_dir, f"{index:02d}_{stem}")
    if "semantic" in pred:
        labels = np.argmax(pred["semantic"], axis=-1)
        viz.save_rgb(f"{prefix}_semantic.png", viz.semantic_to_color(labels, palette))
        if "semantic" in target:
            viz.save_rgb(f"{prefix}_semantic_true.png", viz.semantic_to_color(target["semantic"], palette))
    if "depth" in pred:
        vmax = None
        if "depth" in target:
            valid = target.get("depth_mask", np.ones_like(target["depth"])) > 0.5
            values = target["depth"][valid]
            vmax = float(np.percentile(values, 99)) if values.size else None
        viz.save_rgb(f"{prefix}_depth.png", viz.depth_to_color(pred["depth"], vmax=vmax))
    if "normals" in pred:
        viz.save_rgb(f"{prefix}_normals.png", viz.normals_to_color(pred["normals"]))
        if "normals" in target:
            viz.save_rgb(f"{prefix}_normals_true.png",
                         viz.normals_to_color(target["normals"], target.get("normals_mask")))
    if instances is not None:
        viz.save_rgb(f"{prefix}_instances.png", viz.instances_to_color(instances.ids, image))
    viz.save_prediction_panel(f"{prefix}_panel.png", image, pred, target, palette=palette, class_names=class_names,
                              cluster=False, instance_ids=None if instances is None else instances.ids)


def markdown_table(metrics):
    """The scalar metrics as a two-column markdown table (per-class IoU as a second table)."""
    def fmt(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| metric | value |", "| --- | --- |"]
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, (dict, list)):
            continue
        lines.append(f"| {key} | {fmt(value)} |")
    named = metrics.get("semantic_per_class_iou_named")
    if named:
        lines += ["", "| class | IoU |", "| --- | --- |"] + [f"| {k} | {fmt(v)} |" for k, v in named.items()]
    per_class_ap = metrics.get("official_instance_ap_per_class")
    if per_class_ap:
        lines += ["", "| class | official AP |", "| --- | --- |"] + [f"| {k} | {fmt(v)} |"
                                                                         for k, v in per_class_ap.items()]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if not FLAGS.model_path:
        raise ValueError("--model_path is required (a run folder, a .keras file, a SavedModel folder or a preset).")
    metrics = run_evaluation(
        FLAGS.model_path, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=FLAGS.split,
        image_size=FLAGS.image_size, num_classes=FLAGS.num_classes, tasks=FLAGS.tasks, batch_size=FLAGS.batch_size,
        max_batches=FLAGS.max_batches, clustering=FLAGS.clustering, official=FLAGS.official,
        baseline_metrics=FLAGS.baseline_metrics, num_images=FLAGS.num_images, output_dir=FLAGS.output_dir)
    keys = ("semantic_miou", "official_semantic_miou", "official_our_semantic_miou_same_files",
            "instance_mean_error_px", "instance_ari_mean", "official_instance_ap", "official_instance_ap50",
            "depth_mean_error_px", "depth_rel_error", "normals_mean_angle_deg", "clustering_ms_median", "delta_m")
    print(f"\nEvaluated {metrics['num_images']:.0f} images of {metrics['dataset']}/{metrics['split']} "
          f"in {metrics['wall_seconds']:.0f} s")
    for key in keys:
        if metrics.get(key) is not None:
            print(f"  {key:40s} {metrics[key]:.4f}")


if __name__ == "__main__":
    cli.run(main)
