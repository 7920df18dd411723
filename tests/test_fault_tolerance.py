import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl_keras
from mtl_keras import checkpointing
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer
from tests.helpers import tiny_kendall_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("semantic", "depth")


def tiny_trainer():
    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=TASKS, num_classes=3, input_shape=(32, 32, 3),
                                  output_stride=16, **tiny_kendall_kwargs())
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(TASKS))
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return trainer


def dataset(nan_from_batch=None):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    if nan_from_batch is not None:
        images[nan_from_batch * 4:] = np.nan
    targets = {"semantic": rng.integers(0, 3, (16, 32, 32)).astype("int32"),
               "depth": rng.uniform(0, 2, (16, 32, 32, 1)).astype("float32")}
    return tf.data.Dataset.from_tensor_slices((images, targets)).batch(4)


def test_corrupt_newest_backup_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    backup = str(tmp_path / "backup")
    trainer = tiny_trainer()
    trainer.fit(dataset(), epochs=2, steps_per_epoch=2, verbose=0, callbacks=[checkpointing.EpochBackup(backup)])
    state = checkpointing.read_state(backup)
    assert [b["epoch"] for b in state["backups"]] == [2, 1]
    newest = os.path.join(backup, state["backups"][0]["file"])
    with open(newest, "r+b") as f:  # a write cut short
        f.truncate(os.path.getsize(newest) // 2)
    fresh = tiny_trainer()
    with caplog.at_level(logging.WARNING, logger="mtl_keras"):
        assert checkpointing.restore(fresh, backup) == 1
    assert "unusable" in caplog.text and "sha256" in caplog.text
    reference = tiny_trainer()
    reference.load_weights(os.path.join(backup, state["backups"][1]["file"]))
    for a, b in zip(fresh.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_no_backup_means_a_fresh_start(tmp_path):
    assert checkpointing.restore(tiny_trainer(), str(tmp_path / "none")) == 0


@pytest.mark.slow
def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_backup(tmp_path):
    backup = str(tmp_path / "backup")
    trainer = tiny_trainer()
    # NaN images from epoch 2 on: either the loss turns NaN at once, or (oneDNN's max-pooling maps NaN to a number)
    # the loss stays finite while batch-norm statistics turn NaN, caught at the end of the epoch. Both stop the run
    # before epoch 2's backup.
    with pytest.raises(FloatingPointError, match=r"diverged (at epoch 2, step 1: non-finite .*loss=nan|in epoch 2: "
                                                 r"non-finite weights .*conv1_bn)"):
        trainer.fit(dataset(nan_from_batch=2), epochs=3, steps_per_epoch=2, verbose=0,
                    callbacks=[checkpointing.DivergenceGuard(backup), checkpointing.EpochBackup(backup)])
    state = checkpointing.read_state(backup)
    assert [b["epoch"] for b in state["backups"]] == [1]
    restored = tiny_trainer()
    assert checkpointing.restore(restored, backup) == 1
    assert all(np.all(np.isfinite(w)) for w in restored.get_weights())


def _train_command(out, data, weighting="uncertainty", epochs=6):
    return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--output_dir={out}",
            f"--data_dir={data}", "--image_size=32,64", "--batch_size=2", f"--epochs={epochs}", "--deterministic",
            "--tasks=semantic,depth", "--export=false", "--val_batches=1", "--model=kendall_deeplabv3_resnet26_slim",
            f"--weighting={weighting}"]


def _tensorboard_steps(folder, tag):
    """The steps of every ``tag`` scalar in the TensorBoard event files of ``folder`` (read with tf.compat.v1)."""
    steps = []
    for name in sorted(os.listdir(folder)):
        for event in tf.compat.v1.train.summary_iterator(str(folder / name)):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def sha256_of(path):
    """By hashlib: mtl_keras.presets.file_sha256 is what the backups use."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate(data):
    from mtl_keras.data import generate_synthetic_cityscapes

    generate_synthetic_cityscapes(str(data), num_train=6, num_val=2, height=64, width=128, seed=0)


# gradvac: a gradient method with state (its cosine targets) and a random task order per step: both must resume.
# (Uncertainty weighting resumes in the SIGTERM test below, mid-epoch.)
@pytest.mark.parametrize("weighting", ["gradvac"])
@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_mid_training_resumes_from_the_last_completed_epoch_and_ends_as_an_uninterrupted_run(tmp_path,
                                                                                                     weighting):
    data = tmp_path / "synthetic"
    _generate(data)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # Small model overrides through the preset-free flags are not exposed, so use the slim model at 32x64.
    reference = subprocess.run(_train_command(tmp_path / "reference", data, weighting), env=env, capture_output=True,
                               text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    # The run dies as under SIGKILL right after epoch 3's backup is recorded (a test hook in EpochBackup): a known
    # point, so the test neither races the training nor passes without an interruption.
    killed = subprocess.run(_train_command(out, data, weighting), capture_output=True, text=True, timeout=900,
                            env={**env, checkpointing.KILL_AFTER_EPOCH_ENV: "3"})
    assert killed.returncode == checkpointing.KILLED_EXIT_CODE, killed.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "backup" / "state.json").read_text())["backups"][0]["epoch"] == 3

    resumed = subprocess.run(_train_command(out, data, weighting), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    reference_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 3  # not from zero
    assert metrics["steps"] == reference_metrics["steps"] == 18
    assert not (out / "backup").exists()  # removed once the run completed
    # --deterministic: the resumed run ends with exactly the uninterrupted run's weights (the digest covers the
    # model and the loss-weighting variables).
    assert metrics["weights_digest"] == reference_metrics["weights_digest"]
    assert metrics["final_task_weights"] == reference_metrics["final_task_weights"]
    # The whole history survives the interruption: all 6 epochs' logs and the weight record from step 1 (the points
    # of task_weights.png), equal to the uninterrupted run's.
    assert len(metrics["train_history"]["loss"]) == 6
    assert metrics["train_history"] == reference_metrics["train_history"]
    assert metrics["weighting_history"]["step"] == list(range(1, 19))
    assert metrics["weighting_history"] == reference_metrics["weighting_history"]
    # TensorBoard: the resumed run writes steps 10 to 18, after the interrupted run's (Keras alone restarts its
    # batch count at each fit: the resumed run would write steps 1 to 9 again). The killed process may lose its last
    # unflushed events, as under a real SIGKILL, so its steps are some of 1 to 9, none twice.
    steps = sorted(_tensorboard_steps(out / "logs" / "train", "batch_loss"))
    assert len(steps) == len(set(steps)) and set(steps) <= set(range(1, 19))
    assert [s for s in steps if s > 9] == list(range(10, 19)) and len(steps) >= 12


# A kill inside the write of epoch 3's backup (the previous ones: epochs 2 and 1), at each of its two steps.
@pytest.mark.parametrize("stage", checkpointing.KILL_DURING_BACKUP_STAGES)
@pytest.mark.slow  # 40 to 60 s each: two train.py processes
@pytest.mark.subprocess
def test_sigkill_during_a_backup_write_resumes_from_the_previous_backup_and_finishes(tmp_path, stage):
    data = tmp_path / "synthetic"
    _generate(data)  # 6 training images at batch 2: 3 steps per epoch
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = tmp_path / "run"
    backup = out / "backup"
    killed = subprocess.run(_train_command(out, data, epochs=4), capture_output=True, text=True, timeout=900,
                            env={**env, checkpointing.KILL_DURING_BACKUP_ENV: f"3:{stage}"})
    assert killed.returncode == checkpointing.KILLED_EXIT_CODE, killed.stderr[-3000:]
    assert "exiting as if killed while writing" in killed.stderr, killed.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    # What the kill left: the half-written file, and a state.json still naming epoch 2's backup, intact.
    if stage == "weights":
        assert len(list(backup.glob(".tmp-*-epoch-00003.weights.h5"))) == 1  # the temporary, beside the backups
        assert not (backup / "epoch-00003.weights.h5").exists()
    else:
        assert (backup / "epoch-00003.weights.h5").exists()
        [partial] = backup.glob(".tmp-*-state.json")
        with pytest.raises(ValueError):
            json.loads(partial.read_text())  # cut in half: not JSON
    state = json.loads((backup / "state.json").read_text())
    assert [entry["epoch"] for entry in state["backups"]] == [2, 1]
    newest = backup / state["backups"][0]["file"]
    assert newest.name == "epoch-00002.weights.h5" and sha256_of(newest) == state["backups"][0]["sha256"]
    # Every backup state.json lists is still there (stale ones are removed only after state.json is replaced).
    assert all(sha256_of(backup / entry["file"]) == entry["sha256"] for entry in state["backups"])

    resumed = subprocess.run(_train_command(out, data, epochs=4), env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {newest}" in resumed.stderr, resumed.stderr[-3000:]
    assert "unusable" not in resumed.stderr  # state.json never named the half-written file
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 2 and metrics["steps"] == 12
    # The record is whole: 4 epochs' logs, the weights from step 1 to 12, none twice.
    assert len(metrics["train_history"]["loss"]) == 4
    assert metrics["weighting_history"]["step"] == list(range(1, 13))
    assert not backup.exists()  # removed once the run completed, leftovers included


# DWA: its weights come from the epochs' mean losses, so the preempted epoch's running means must resume too.
@pytest.mark.slow  # three train.py processes, 50 to 70 s
@pytest.mark.subprocess
def test_sigterm_at_a_random_step_backs_up_that_step_and_resumes_to_the_uninterrupted_weights(tmp_path):
    data = tmp_path / "synthetic"
    _generate(data)  # 6 training images at batch 2: 3 steps per epoch, 12 in all
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # The property holds at every step: any one may be drawn (MTL_KERAS_TEST_SIGTERM_STEP=K replays a failure).
    step = int(os.environ.get("MTL_KERAS_TEST_SIGTERM_STEP") or random.randint(1, 12))
    where = f"(SIGTERM as step {step} began)"
    reference = subprocess.run(_train_command(tmp_path / "reference", data, "dwa", epochs=4), env=env,
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "preempted"
    # The process sends itself a real SIGTERM as that step begins (a test hook: no race with the training).
    preempted = subprocess.run(_train_command(out, data, "dwa", epochs=4), capture_output=True, text=True,
                               timeout=900, env={**env, checkpointing.SIGNAL_AT_STEP_ENV: str(step)})
    assert preempted.returncode == 75, (where, preempted.stderr[-3000:])  # EX_TEMPFAIL: requeue
    epoch, in_epoch = divmod(step, 3)  # the step it was in is finished and backed up
    lines = [line for line in preempted.stderr.splitlines() if "Preempted (SIGTERM)" in line]
    assert len(lines) == 1 and "exiting with status 75" in lines[0], (where, preempted.stderr[-3000:])
    assert "Traceback" not in preempted.stderr
    assert not (out / "metrics.json").exists()
    newest = json.loads((out / "backup" / "state.json").read_text())["backups"][0]
    assert (newest["epoch"], newest.get("step", 0)) == (epoch, in_epoch), where
    assert sha256_of(out / "backup" / newest["file"]) == newest["sha256"]
    assert not (out / "run.lock").exists()  # released on the way out

    resumed = subprocess.run(_train_command(out, data, "dwa", epochs=4), env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, (where, resumed.stderr[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    reference_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert (metrics["resumed_from_epoch"], metrics["resumed_from_step"]) == (epoch, step), where
    # --deterministic: the uninterrupted run's weights, epoch logs (the preempted epoch's means included) and
    # weight record, from the step the run was preempted at.
    assert metrics["weights_digest"] == reference_metrics["weights_digest"], where
    assert metrics["train_history"] == reference_metrics["train_history"], where
    assert metrics["weighting_history"] == reference_metrics["weighting_history"], where
    assert metrics["weighting_history"]["step"] == list(range(1, 13))
    assert not (out / "backup").exists()


def _tiny_fit(trainer, data, epochs, initial_epoch=0, steps_per_epoch=2, callbacks=()):
    return trainer.fit(data, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch, verbose=0,
                       shuffle=False, callbacks=list(callbacks))


def test_sigint_finishes_the_step_backs_it_up_with_the_running_means_and_resumes_there(tmp_path, monkeypatch):
    backup_dir = str(tmp_path / "backup")
    keras.utils.set_random_seed(1)
    reference = tiny_trainer()
    initial = reference.get_weights()
    logged = _tiny_fit(reference, dataset().repeat(), epochs=2).history

    # A real SIGINT (Ctrl-C) as step 3 (epoch 2, step 1) begins: the step is finished, then backed up.
    monkeypatch.setenv(checkpointing.SIGNAL_AT_STEP_ENV, "3:SIGINT")
    keras.utils.set_random_seed(1)
    preempted = tiny_trainer()
    preempted.set_weights(initial)
    backup = checkpointing.EpochBackup(backup_dir)
    guard = checkpointing.PreemptionGuard(backup, steps_per_epoch=2)
    with pytest.raises(SystemExit) as stop, guard:
        _tiny_fit(preempted, dataset().repeat(), epochs=2, callbacks=[backup, guard])
    assert stop.value.code == 75 and "Preempted (SIGINT) at epoch 2, step 1/2" in str(stop.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back

    monkeypatch.delenv(checkpointing.SIGNAL_AT_STEP_ENV)
    resumed = tiny_trainer()
    point = checkpointing.restore_point(resumed, backup_dir)
    assert (point.epoch, point.step) == (1, 1)
    # The first trainer metric is Keras' loss mean (total, count): one step of epoch 2, counted in images (batch 4).
    assert point.metric_states[1] == (4.0,)
    guard = checkpointing.PreemptionGuard(checkpointing.EpochBackup(backup_dir), 2, point.epoch, point.step,
                                          point.metric_states)
    with guard:
        tail = _tiny_fit(resumed, dataset().repeat().skip(3), epochs=2, initial_epoch=1, steps_per_epoch=1,
                         callbacks=[guard]).history
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Epoch 2's logged mean loss covers both of its steps, the one before the interruption included.
    assert tail["loss"][-1] == logged["loss"][-1]


def test_a_second_ctrl_c_stops_at_once_and_a_second_sigterm_changes_nothing():
    guard = checkpointing.PreemptionGuard(checkpointing.EpochBackup("unused"), steps_per_epoch=2)
    with pytest.raises(KeyboardInterrupt), guard:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, the run would finish its step
        assert guard.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # the second: now
        time.sleep(5)  # not reached: the handler raises at the next bytecode
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.getsignal(signal.SIGTERM)
    guard = checkpointing.PreemptionGuard(checkpointing.EpochBackup("unused"), steps_per_epoch=2)
    with guard:
        for _ in range(2):  # a scheduler may repeat it; a benchmark passes its own on to its cells
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert guard.received == "SIGTERM"  # still here, still finishing the step
    assert signal.getsignal(signal.SIGTERM) is previous


def test_resuming_with_other_training_settings_is_refused_with_the_differences(tmp_path):
    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import check_resumable, run_training

    out, backup = tmp_path / "run", tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    saved = TrainConfig(output_dir=str(out), learning_rate=0.01, steps=8)
    (out / "config.json").write_text(saved.to_json())
    # Same training settings, other output options and strategy: resumable.
    check_resumable(saved.replace(val_batches=2, strategy="one_device", export=False), str(out), str(backup))
    (backup / checkpointing.STATE_FILE).write_text(json.dumps(
        {"backups": [{"file": "epoch_1.weights.h5", "epoch": 1, "sha256": "0" * 64}]}))
    with pytest.raises(ValueError, match=r"learning_rate: 0\.01 then, 0\.02 now.*weighting: 'uncertainty' then, "
                                         r"'equal' now") as error:
        run_training(saved.replace(learning_rate=0.02, weighting="equal"), verbose=0)
    assert str(backup) in str(error.value)
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 0.01  # nothing overwritten
    # Without backups there is nothing to resume: any settings start afresh.
    checkpointing.remove_backups(str(backup))
    check_resumable(saved.replace(learning_rate=0.02), str(out), str(backup))


def test_a_mid_epoch_resume_without_tensorflow_skips_the_epoch_s_first_batches():
    """The TensorFlow-free loaders (PyDataset) resume mid-epoch through experiment.SkipBatches: the rest of the
    epoch's batches, then the dataset's next epoch as it would have come."""
    from mtl_keras.experiment import SkipBatches

    class Numbered(keras.utils.PyDataset):  # batch i of epoch e is (e, i), as CityscapesPyDataset's are functions
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def __len__(self):
            return 5

        def __getitem__(self, index):
            return self.epoch, index

        def on_epoch_end(self):
            self.epoch += 1

    dataset = Numbered()
    rest = SkipBatches(dataset, 3)
    assert len(rest) == 2 and [rest[i] for i in range(len(rest))] == [(0, 3), (0, 4)]
    rest.on_epoch_end()
    assert dataset.epoch == 1 and dataset[0] == (1, 0)
