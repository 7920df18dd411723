"""Train a multi-task model. With no flags: the synthetic street scenes (generated on first use), a small Kendall et
al. model, uncertainty weighting, a few minutes on a CPU. Outputs go to --output_dir (see mtl_keras/experiment.py).

    python experiments/train.py
    python experiments/train.py --model kendall_deeplabv3_resnet101 --optimizer sgd --learning_rate 2.5e-3 \
        --dataset cityscapes --data_dir /data/cityscapes --steps 50000
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtl_keras.config import TrainConfig  # noqa: E402

_D = TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_string("model", _D.model, "Registered model name (mtl_keras.list_models()).")
flags.DEFINE_string("dataset", _D.dataset, "Dataset name (mtl_keras.data.datasets.DATASETS): synthetic, cityscapes, ...")
flags.DEFINE_string("data_dir", _D.data_dir, "Dataset root (default for synthetic: data/synthetic).")
flags.DEFINE_list("tasks", list(_D.tasks), "Comma-separated tasks: semantic,instance,depth.")
flags.DEFINE_integer("num_classes", _D.num_classes, "19 (trainIds) or 7 (categories).")
flags.DEFINE_enum("weighting", _D.weighting, ["uncertainty", "equal", "fixed"], "Loss weighting.")
flags.DEFINE_list("task_weights", [], "Weights for --weighting fixed, in task order, e.g. 0.89,0.01,0.1.")
flags.DEFINE_float("initial_log_variance", _D.initial_log_variance, "Initial log sigma^2 of every task.")
flags.DEFINE_list("image_size", [str(v) for v in _D.image_size], "Training height,width.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_integer("steps", _D.steps, "Total training steps (0: use --epochs).")
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the training split when --steps is 0 (0: 10).")
flags.DEFINE_enum("optimizer", _D.optimizer, ["adam", "sgd"], "adam, or sgd = seed 001 (Nesterov, poly, wd).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Initial learning rate (polynomial decay to 0).")
flags.DEFINE_float("weight_decay", _D.weight_decay, "Weight decay (sgd).")
flags.DEFINE_boolean("jit_compile", _D.jit_compile, "Compile the train step with XLA.")
flags.DEFINE_integer("seed", _D.seed, "Random seed.")
flags.DEFINE_string("output_dir", _D.output_dir, "Output folder.")
flags.DEFINE_integer("val_batches", _D.val_batches, "Validation batches to evaluate (0: all).")
flags.DEFINE_boolean("export", _D.export, "Write a SavedModel to OUTPUT_DIR/export.")


def config_from_flags():
    steps = FLAGS.steps
    epochs = FLAGS.epochs
    if FLAGS.dataset == "synthetic" and not steps and not epochs:
        steps = 200  # the default job: about 6 minutes of training on 2 CPU cores
    return TrainConfig(
        model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, tasks=tuple(FLAGS.tasks),
        num_classes=FLAGS.num_classes, weighting=FLAGS.weighting,
        task_weights=tuple(float(w) for w in FLAGS.task_weights), initial_log_variance=FLAGS.initial_log_variance,
        image_size=tuple(int(v) for v in FLAGS.image_size), batch_size=FLAGS.batch_size, steps=steps,
        epochs=epochs, optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
        weight_decay=FLAGS.weight_decay, jit_compile=FLAGS.jit_compile, seed=FLAGS.seed,
        output_dir=FLAGS.output_dir, val_batches=FLAGS.val_batches, export=FLAGS.export)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mtl_keras.experiment import run_training

    results = run_training(config_from_flags())
    val, untrained = results["val"], results["val_untrained"]
    print(f"\nDone in {results['wall_seconds']:.0f} s ({results['train_images_per_s']:.1f} training images/s). "
          f"Outputs in {FLAGS.output_dir}")
    for key in ("semantic_miou", "instance_mean_error_px", "depth_mean_error_px"):
        if key in val:
            print(f"  {key:24s} trained {val[key]:.4f}   untrained {untrained[key]:.4f}")
    print("  final task weights: " + ", ".join(f"{k}={v:.3g}" for k, v in results["final_task_weights"].items()))


if __name__ == "__main__":
    app.run(main)
