"""Train a multi-task model. With no flags: the synthetic street scenes (generated on first use), a small Kendall et
al. model, uncertainty weighting, a few minutes on a CPU. Outputs go to --output_dir (see mtl_keras/experiment.py).

    python experiments/train.py
    python experiments/train.py --preset kendall_tiny_cityscapes --data_dir /data/cityscapes
    python experiments/train.py --model mt_unet --weighting dwa --tasks semantic,depth
    python experiments/train.py --publish my_model_synthetic     # then mtl_keras.load_model("my_model_synthetic")

A preset (experiments/presets/NAME.json) sets a paper's configuration; any flag given on the command line overrides
it.
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")
HELP_REQUESTED = __name__ == "__main__" and any(a in HELP_ARGS for a in sys.argv[1:])


def _config_module_alone():
    """mtl_keras/config.py loaded on its own: the package's __init__ loads TensorFlow (seconds), --help needs none."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtl_keras", "config.py")
    spec = importlib.util.spec_from_file_location("_mtl_keras_config_for_help", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if HELP_REQUESTED:
    _config = _config_module_alone()
    TrainConfig = _config.TrainConfig

    def weighting_names():
        return list(_config.WEIGHTING_NAMES)  # the registry's names (tests/test_train_script.py compares them)
else:
    from mtl_keras import cli  # noqa: E402
    from mtl_keras.config import TrainConfig  # noqa: E402
    from mtl_keras.weighting import weighting_names  # noqa: E402

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
PRESETS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(PRESET_DIR, "*.json")))
DEFAULT_SYNTHETIC_STEPS = 800  # the default job: about 6 minutes of training on 2 CPU cores

_D = TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", None, PRESETS, "A paper's configuration from experiments/presets/.")
flags.DEFINE_string("model", _D.model, "Registered model name (mtl_keras.list_models()).")
flags.DEFINE_string("backbone_weights", _D.backbone_weights, "The encoder's starting weights: 'imagenet' "
                    "(keras.applications' download) or a local keras.applications ResNet50/101 .h5 file; empty: "
                    "random (dilated ResNet-50/101 models).")
flags.DEFINE_string("dataset", _D.dataset, "Dataset name: a key of mtl_keras.data.datasets.DATASETS (synthetic, "
                    "cityscapes, folder, ...; each has its card datasets/NAME.md).")
flags.DEFINE_string("data_dir", _D.data_dir, "Dataset root (default for synthetic: data/synthetic).")
flags.DEFINE_list("tasks", list(_D.tasks), "Comma-separated tasks: semantic,instance,depth.")
flags.DEFINE_integer("num_classes", _D.num_classes, "19 (trainIds) or 7 (categories) on CityScapes; 13 on NYUv2; "
                     "folder: the classes of its classes file.")
flags.DEFINE_enum("weighting", _D.weighting, weighting_names(), "Loss weighting: uncertainty, equal, fixed, dwa, "
                  "mtunet weight the losses; the others are gradient methods (mtl_keras.gradient_methods), which see "
                  "the per-task gradients of the shared parameters.")
flags.DEFINE_list("weighting_options", [], "A gradient method's options as key=value pairs (values in JSON), e.g. "
                  "c=0.4 for cagrad; default: the paper's values.")
flags.DEFINE_boolean("rep_grad", _D.rep_grad, "Gradient methods: use the gradients of the shared representation "
                     "(cheaper; LibMTL's rep_grad) instead of the shared parameters'.")
flags.DEFINE_enum("jacobian_mode", _D.jacobian_mode, ["loop", "batched"], "Gradient methods: K backward passes "
                  "sharing one forward pass (loop), or one vectorised Jacobian pass (batched; JAX only).")
flags.DEFINE_list("task_weights", [], "Weights for --weighting fixed, in task order, e.g. 0.89,0.01,0.1.")
flags.DEFINE_float("initial_log_variance", _D.initial_log_variance, "uncertainty: initial log sigma^2 of every task.")
flags.DEFINE_float("dwa_temperature", _D.dwa_temperature, "dwa: softmax temperature.")
flags.DEFINE_float("weight_learning_rate", _D.weight_learning_rate, "mtunet: learning rate of the weights W_i.")
flags.DEFINE_list("image_size", [str(v) for v in _D.image_size], "Training height,width.")
flags.DEFINE_list("scale_range", [str(v) for v in _D.scale_range], "Random scale range min,max (1,1: none).")
flags.DEFINE_list("crop_size", [], "Random crop height,width (padded with the ignore label); empty: none.")
flags.DEFINE_string("depth_target", _D.depth_target, "Depth target: inverse (1/m or disparity px, as the paper) or "
                    "metric (metres); empty: the dataset's default (CityScapes inverse, NYUv2 metric).")
flags.DEFINE_boolean("flip", _D.flip, "Random horizontal flips.")
flags.DEFINE_enum("cache", _D.cache, ["auto", "memory", "none"], "Keep the decoded training examples in memory: "
                  "auto does when they take under 2 GiB (the synthetic default job: 600 images at 128x256).")
flags.DEFINE_integer("batch_size", _D.batch_size, "GLOBAL batch size, split evenly over all replicas (the log "
                     "shows the per-replica size).")
flags.DEFINE_integer("steps", _D.steps, f"Total training steps (0: use --epochs; synthetic default "
                     f"{DEFAULT_SYNTHETIC_STEPS}).")
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the training split when --steps is 0 (0: 10).")
flags.DEFINE_enum("optimizer", _D.optimizer, ["adam", "sgd"], "sgd = the paper's (Nesterov, poly decay, wd); adam.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Initial learning rate (then --lr_schedule).")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, ["poly", "step"], "Learning-rate schedule: poly (polynomial "
                  "decay to 0, --lr_power) or step (x --lr_step_gamma every --lr_step_epochs epochs, torch's StepLR).")
flags.DEFINE_float("lr_power", _D.lr_power, "Power of the polynomial decay (0: constant).")
flags.DEFINE_integer("lr_step_epochs", _D.lr_step_epochs, "--lr_schedule step: epochs between the drops.")
flags.DEFINE_float("lr_step_gamma", _D.lr_step_gamma, "--lr_schedule step: factor at each drop.")
flags.DEFINE_float("momentum", _D.momentum, "sgd: Nesterov momentum.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "sgd: weight decay.")
flags.DEFINE_float("adam_l2", _D.adam_l2, "adam: torch.optim.Adam's coupled L2 weight decay (gradient + adam_l2 * "
                   "weight before the moments; LibMTL's --weight_decay); 0: plain Adam.")
flags.DEFINE_boolean("jit_compile", _D.jit_compile, "Compile the train step with XLA (default: on with "
                     "KERAS_BACKEND=jax, off with tensorflow and torch).")
flags.DEFINE_integer("seed", _D.seed, "Random seed.")
flags.DEFINE_enum("strategy", _D.strategy, ["auto", "one_device", "mirrored", "multi_worker"],
                  "auto: mirrored over all GPUs if any, else one device. multi_worker: several processes, from TF_CONFIG (on JAX "
                  "also KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID).")
flags.DEFINE_integer("cpu_replicas", _D.cpu_replicas, "mirrored without GPUs: logical CPU devices to mirror over.")
flags.DEFINE_boolean("deterministic", _D.deterministic, "Deterministic TF ops (reproducible resumes; slower).")
flags.DEFINE_boolean("sync_batchnorm", _D.sync_batchnorm, "Batch-norm statistics over all replicas (only matters "
                     "with several replicas; --nosync_batchnorm for per-replica statistics).")
flags.DEFINE_enum("precision", _D.precision, ["float32", "mixed_float16", "mixed_bfloat16"],
                  "Compute precision (loss weights and outputs stay float32).")
flags.DEFINE_string("output_dir", _D.output_dir, "Output folder. One holding an unfinished run resumes it; one "
                    "holding a finished run is refused unless --overwrite.")
flags.DEFINE_boolean("overwrite", _D.overwrite, "Replace a finished run in --output_dir (its outputs are removed "
                     "when the new run's training starts).")
flags.DEFINE_integer("val_batches", _D.val_batches, "Validation batches to evaluate (0: all).")
flags.DEFINE_boolean("export", _D.export, "Write a SavedModel to OUTPUT_DIR/export.")
flags.DEFINE_string("publish", None, "After training, publish the run as a named model (experiments/publish.py): "
                    "NAME.weights.h5 (+ sha256) in --publish_weights_dir and the preset NAME.json (architecture, "
                    "metrics, training config) in models/ of a checkout (else $KERAS_HOME/mtl_keras/presets); then "
                    "mtl_keras.load_model(NAME) loads it.")
flags.DEFINE_string("publish_weights_dir", None, "Folder for the published weights file (default: "
                    "$KERAS_HOME/mtl_keras/weights; models/ of a checkout to commit it beside its preset).")
flags.DEFINE_string("publish_presets_dir", None, "Folder for the published preset (default: models/ of a checkout, "
                    "else $KERAS_HOME/mtl_keras/presets; other folders are read through $MTL_KERAS_PRESETS).")
flags.DEFINE_string("publish_description", None, "One-line description for the published preset.")
flags.DEFINE_boolean("publish_overwrite", False, "Let --publish replace an existing preset and weights file.")

_TUPLE_FLAGS = {"tasks": str, "task_weights": float, "image_size": int, "scale_range": float, "crop_size": int}


def parse_options(pairs):
    """``["c=0.4", "mgda_gn=\"l2\""]`` -> ``{"c": 0.4, "mgda_gn": "l2"}`` (values JSON; bare words are strings)."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--weighting_options: expected key=value, got {pair!r}.")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return options


def load_preset(name):
    from mtl_keras.config import read_json

    path = os.path.join(PRESET_DIR, f"{name}.json")
    settings = read_json(path)  # its errors name the file
    try:
        return TrainConfig.from_dict(settings)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_flags():
    """The preset (or the defaults), overridden by every flag given on the command line."""
    config = load_preset(FLAGS.preset) if FLAGS.preset else TrainConfig()
    overrides = {}
    for name in flags.FLAGS:
        if name == "preset" or name not in {f for f in TrainConfig.__dataclass_fields__} or not FLAGS[name].present:
            continue
        value = FLAGS[name].value
        if name in _TUPLE_FLAGS:
            value = tuple(_TUPLE_FLAGS[name](v) for v in value)
        elif name == "weighting_options":
            value = parse_options(value)
        overrides[name] = value
    config = config.replace(**overrides)
    if config.dataset == "synthetic" and not config.steps and not config.epochs:
        config = config.replace(steps=DEFAULT_SYNTHETIC_STEPS)
    return config


def main(argv):
    del argv
    from mtl_keras.data.datasets import dataset_entry
    from mtl_keras.experiment import run_training

    config = config_from_flags()
    if FLAGS.publish:
        from publish import publish_targets  # experiments/publish.py

        publish_targets(FLAGS.publish, FLAGS.publish_weights_dir, FLAGS.publish_presets_dir,  # fail before training
                        overwrite=FLAGS.publish_overwrite)
    results = run_training(config)
    if not results["chief"]:
        print(f"\nWorker done; weights digest {results['weights_digest']}")
        return
    val, untrained = results["val"], results["val_untrained"]
    print(f"\nDone in {results['wall_seconds']:.0f} s ({results['train_images_per_s']:.1f} training images/s). "
          f"Outputs in {config.output_dir}")
    for key in ("semantic_miou", "instance_mean_error_px", "depth_mean_error_px"):
        if key in val:
            print(f"  {key:24s} trained {val[key]:.4f}   untrained {untrained[key]:.4f}")
    print("  final task weights: " + ", ".join(f"{k}={v:.3g}" for k, v in results["final_task_weights"].items()))
    print(f"  weights digest {results['weights_digest']}")
    if dataset_entry(config.dataset).cityscapes_layout and "semantic" in val:
        print(f"  instance AP and the official scores: python experiments/evaluate.py --model_path "
              f"{config.output_dir} --official")
    if FLAGS.publish:
        from publish import publish_run

        path = publish_run(config.output_dir, FLAGS.publish, weights_dir=FLAGS.publish_weights_dir,
                           presets_dir=FLAGS.publish_presets_dir,
                           description=FLAGS.publish_description, overwrite=FLAGS.publish_overwrite)
        print(f"  published as {FLAGS.publish!r}: {path}; load with mtl_keras.load_model({FLAGS.publish!r})")


def print_help(argv):
    """What absl's --help prints, on stdout, exit status 0 (absl's own --help exits 1)."""
    flags_help = FLAGS.get_help() if "--helpfull" in argv else FLAGS.main_module_help()
    print(f"{__doc__.strip()}\n\nFlags:\n{flags_help}")


if __name__ == "__main__":
    if HELP_REQUESTED:
        print_help(sys.argv)
        sys.exit(0)
    cli.run(main)
