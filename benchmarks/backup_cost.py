"""What a run pays for being resumable (issue 26): the time of one backup of the whole trainer, written as the run
writes it, next to Keras' own ``save_weights`` and a plain write of the same bytes (the disk's reference), and the
cost per step of the preemption guard's check. Prints a Markdown table.

    python benchmarks/backup_cost.py                                    # the default job's trainer, 5 repeats
    python benchmarks/backup_cost.py --model kendall_deeplabv3_resnet101 --image_size 256,512 --repeats 3

Rows (median of ``--repeats`` after one warm-up each, in a temporary folder on ``--folder``'s disk):
- ``keras save_weights``: ``trainer.save_weights(path)``, HDF5 writing the file itself (what the backups did before;
  it segfaults on a full disk, see mtl_keras/presets.py ``save_weights_file``).
- ``save_weights_file``: the same file built in memory, then written whole (temporary name, fsync, rename, fsync of
  the folder): ``checkpoints/last.weights.h5``.
- ``EpochBackup.write``: the backup as a run writes it: the above, its sha256 and ``state.json`` (atomic too).
- ``plain write + fsync``: the same number of bytes with ``open().write`` and ``os.fsync``: what the disk costs.
- ``PreemptionGuard`` check: one ``on_train_batch_end`` of the guard (no signal), in microseconds per step.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import mtl_keras  # noqa: E402
from mtl_keras import checkpointing  # noqa: E402
from mtl_keras.presets import save_weights_file  # noqa: E402
from mtl_keras.training import MultiTaskTrainer  # noqa: E402
from mtl_keras.weighting import UncertaintyWeightingLayer  # noqa: E402

TASKS = ("semantic", "instance", "depth")


def trainer_with_state(model_name, image_size):
    """The trainer of a run (model, uncertainty weighting, Adam with its moments built): what a backup holds."""
    height, width = image_size
    model = mtl_keras.build_model(model_name, tasks=TASKS, num_classes=19, input_shape=(height, width, 3))
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(TASKS))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    trainer.optimizer.build(trainer.trainable_variables)
    return trainer


def median_seconds(write, repeats):
    write()  # warm-up (first HDF5 / file-system use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def guard_check_microseconds(trainer, folder, calls=20000):
    guard = checkpointing.PreemptionGuard(checkpointing.EpochBackup(folder), steps_per_epoch=calls + 1)
    guard.set_model(trainer)
    start = time.perf_counter()
    for step in range(calls):
        guard.on_train_batch_end(step)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kendall_deeplabv3_resnet26_cpu")
    parser.add_argument("--image_size", default="128,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to write (default: the system's temporary folder)")
    args = parser.parse_args(argv)
    image_size = tuple(int(v) for v in args.image_size.split(","))
    trainer = trainer_with_state(args.model, image_size)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        keras_path = os.path.join(folder, "keras.weights.h5")
        ours = os.path.join(folder, "ours.weights.h5")
        backup = checkpointing.EpochBackup(os.path.join(folder, "backup"))
        backup.set_model(trainer)
        rows = [("keras save_weights", median_seconds(lambda: trainer.save_weights(keras_path), args.repeats))]
        rows.append(("save_weights_file", median_seconds(lambda: save_weights_file(trainer, ours), args.repeats)))
        rows.append(("EpochBackup.write", median_seconds(lambda: backup.write(1), args.repeats)))
        size = os.path.getsize(ours)
        data = os.urandom(size)

        def plain():
            with open(os.path.join(folder, "plain.bin"), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        rows.append(("plain write + fsync (reference)", median_seconds(plain, args.repeats)))
        guard_us = guard_check_microseconds(trainer, folder)
    print(f"{args.model} at {image_size[0]}x{image_size[1]}: {trainer.count_params():,} parameters; backup file "
          f"{size / 2 ** 20:.1f} MiB (weights, Adam moments, loss weights)\n")
    print("| write | seconds (median) | MB/s |")
    print("| --- | --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {size / 1e6 / seconds:.0f} |")
    print(f"\nPreemptionGuard check per step (no signal): {guard_us:.2f} us")


if __name__ == "__main__":
    main()
