"""A run's log when stdout is not a terminal (a scheduler's log file): one line per epoch (``EpochLogLine``: losses,
metrics, the weighting's values, images/s, elapsed, ETA) and no progress bar; on a terminal Keras' progress bar."""

import logging
import os
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

from mtl_keras import experiment, training
from mtl_keras.layers import image_normalization
from mtl_keras.models.heads import task_output
from mtl_keras.training import EpochLogLine, MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("semantic", "depth")
CLOCK = r"\d+:\d\d:\d\d"


def tiny_trainer():
    """Two 1x1 heads on one strided conv: the smallest model the trainer takes (the log, not the net, is tested)."""
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="stem")(image_normalization()(image))
    model = keras.Model(image, {t: task_output(x, t, 3, image, name=f"{t}_head") for t in TASKS})
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(TASKS))
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    return trainer


def batches():
    """Endless batches of 4 images: 16x16 noise, 3 classes, depth in [0, 2)."""
    rng = np.random.default_rng(0)
    while True:
        yield (rng.uniform(0, 255, (4, 16, 16, 3)).astype("float32"),
               {"semantic": rng.integers(0, 3, (4, 16, 16)).astype("int32"),
                "depth": rng.uniform(0, 2, (4, 16, 16, 1)).astype("float32")})


def epoch_lines(text):
    return [line for line in text.splitlines() if re.search(r"epoch \d+/\d+, step", line)]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_line_reports_the_epoch_the_step_rate_elapsed_and_eta_by_hand(monkeypatch, caplog):
    """Driven by hand with a fake clock: 10 epochs of 5 steps of 4 images; this fit starts at epoch 3 (a resumed
    run), its first epoch takes 100 s (tracing), the next two 10 s and 20 s."""
    clock = FakeClock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    weighting = UncertaintyWeightingLayer(TASKS, initial_log_variance={"semantic": 0.0, "depth": np.log(4.0)})
    callback = EpochLogLine(batch_size=4, weighting=weighting)
    callback.set_params({"epochs": 10, "steps": 5, "verbose": 0})
    callback.on_train_begin()
    lines = []
    for epoch, seconds in ((2, 100.0), (3, 10.0), (4, 20.0)):
        callback.on_epoch_begin(epoch)
        for _ in range(5):
            clock.now += seconds / 10  # the steps take half the epoch ...
            callback.on_train_batch_end(0)
        clock.now += seconds / 2  # ... the epoch-end work (backups) the other half
        with caplog.at_level(logging.INFO, logger="mtl_keras"):
            caplog.clear()
            callback.on_epoch_end(epoch, {"loss": 1.23456, "semantic_loss": 0.5, "depth_loss": np.float32(0.25),
                                          "semantic_sigma2": 7.0, "note": "not a number"})
        assert [r.name for r in caplog.records] == ["mtl_keras"]
        lines.append(caplog.records[0].getMessage())
    # Epoch 5 (index 4) of 10: 5 epochs left at the mean of this fit's epochs after the first, (10 + 20) / 2 s.
    assert lines[2] == ("epoch 5/10, step 25/50: loss=1.235 semantic_loss=0.5 depth_loss=0.25; "
                        "semantic_weight=1 depth_weight=0.125 semantic_sigma2=1 depth_sigma2=4; "
                        "2.0 images/s; elapsed 0:02:10, ETA 0:01:15")
    # 20 images in the 50 s of the first epoch's steps; 7 epochs left at its 100 s (no later epoch yet).
    assert lines[0].startswith("epoch 3/10, step 15/50: ")
    assert lines[0].endswith("; 0.4 images/s; elapsed 0:01:40, ETA 0:11:40")
    assert lines[1].endswith("; 4.0 images/s; elapsed 0:01:50, ETA 0:01:00")


def test_the_line_is_printed_where_no_handler_would_show_it(monkeypatch, capsys):
    logger = logging.getLogger("mtl_keras")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [])
    callback = EpochLogLine(batch_size=2, weighting=UncertaintyWeightingLayer(TASKS))
    callback.set_params({"epochs": 1, "steps": 1, "verbose": 0})
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    callback.on_train_batch_end(0)
    callback.on_epoch_end(0, {"loss": 2.0})
    out = capsys.readouterr().out
    assert re.fullmatch(rf"epoch 1/1, step 1/1: loss=2; semantic_weight=1 depth_weight=0.5 semantic_sigma2=1 "
                        rf"depth_sigma2=1; [0-9.]+ images/s; elapsed {CLOCK}, ETA 0:00:00\n", out), out


@pytest.mark.parametrize("stdout_type, bar", [("terminal", True), ("ipykernel", True), ("file", False)])
def test_interactive_means_a_terminal_or_a_notebook(monkeypatch, stdout_type, bar):
    stream = types.SimpleNamespace(isatty=lambda: stdout_type == "terminal")
    monkeypatch.setattr(sys, "stdout", stream)
    if stdout_type == "ipykernel":
        monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    else:
        monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert EpochLogLine.interactive() is bar


class FakeStdout:
    """sys.stdout as a terminal or as a file, keeping what is written."""

    encoding = "utf-8"

    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text
        return len(text)

    def flush(self):
        pass


def _run(trainer, epochs=2, steps=2):
    """What experiment.fit reads of a Run."""
    return types.SimpleNamespace(strategy=None, trainer=trainer, train_ds=batches(), epochs=epochs, initial_epoch=0,
                                 initial_step=0, preemption=None, num_workers=1,
                                 steps_per_epoch=steps, callbacks=[], config=types.SimpleNamespace(batch_size=4),
                                 weighting=trainer.loss_weighting)


@pytest.mark.parametrize("tty", [False, True])
def test_fit_logs_one_line_per_epoch_to_a_file_and_keeps_the_progress_bar_on_a_terminal(monkeypatch, caplog, tty):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    stdout = FakeStdout(tty)
    monkeypatch.setattr(sys, "stdout", stdout)
    trainer = tiny_trainer()
    history = keras.callbacks.History()
    with caplog.at_level(logging.INFO, logger="mtl_keras"):
        experiment.fit(_run(trainer), callbacks=[history])
    lines = epoch_lines("\n".join(caplog.messages))
    if tty:
        assert lines == [] and "Epoch 1/2" in stdout.text and "\r" in stdout.text  # Keras' bar, redrawn
        return
    assert stdout.text == ""  # no bar, no redraws
    assert [line.split(":", 1)[0] for line in lines] == ["epoch 1/2, step 2/4", "epoch 2/2, step 4/4"]
    for epoch, line in enumerate(lines):
        # The epoch's means as Keras recorded them (History), each once.
        for name in ("loss", "semantic_loss", "depth_loss"):
            assert f" {name}={history.history[name][epoch]:.4g}" in line, (name, line)
        assert all(line.count(f"{name}=") == 1 for name in ("semantic_sigma2", "depth_sigma2", "semantic_weight"))
        assert float(re.search(r"; ([0-9.]+) images/s; ", line).group(1)) > 0
        assert re.search(rf"; elapsed {CLOCK}, ETA {CLOCK}$", line), line
    # The weighting's values at the end of the run, from its variables (sigma^2 = exp(log sigma^2)).
    for task in TASKS:
        sigma2 = float(np.exp(keras.ops.convert_to_numpy(trainer.loss_weighting.log_variances[task])))
        assert f"{task}_sigma2={sigma2:.4g}" in lines[-1], (task, sigma2, lines[-1])
    assert lines[-1].endswith(", ETA 0:00:00")


def test_an_explicit_verbose_is_keras_own(monkeypatch, caplog):
    stdout = FakeStdout(tty=False)
    monkeypatch.setattr(sys, "stdout", stdout)
    with caplog.at_level(logging.INFO, logger="mtl_keras"):
        experiment.fit(_run(tiny_trainer()), verbose=2)
    assert epoch_lines("\n".join(caplog.messages)) == []
    assert "Epoch 2/2" in stdout.text and "\r" not in stdout.text  # Keras' line per epoch


@pytest.mark.slow  # about 40 s: one train.py process
@pytest.mark.subprocess
def test_train_py_with_stdout_to_a_file_writes_one_line_per_epoch_and_no_progress_bar(tmp_path):
    from mtl_keras.data import generate_synthetic_cityscapes

    data = generate_synthetic_cityscapes(str(tmp_path / "data"), num_train=6, num_val=2, height=64, width=128, seed=0)
    command = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--output_dir={tmp_path / 'run'}",
               f"--data_dir={data}", "--image_size=32,64", "--batch_size=2", "--epochs=3", "--tasks=semantic,depth",
               "--export=false", "--val_batches=1", "--model=kendall_deeplabv3_resnet26_slim"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as f:  # as a scheduler keeps a job's output: stdout and stderr in one file
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              cwd=str(tmp_path), timeout=900)
    text = log_file.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\x1b" not in text and "\r" not in text and "\b" not in text  # no escape codes, no redraws
    assert "Epoch 1/3" not in text and "━" not in text  # no Keras progress bar
    lines = epoch_lines(text)
    # 6 images at batch 2: 3 steps per epoch. Each line is the run's log format, HH:MM:SS first.
    assert [re.search(r"epoch \d+/\d+, step \d+/\d+", line).group(0) for line in lines] == [
        "epoch 1/3, step 3/9", "epoch 2/3, step 6/9", "epoch 3/3, step 9/9"], text[-3000:]
    for line in lines:
        assert re.match(r"\d\d:\d\d:\d\d epoch ", line), line
        for key in ("loss=", "semantic_loss=", "depth_loss=", "semantic_sigma2=", "depth_sigma2=", "semantic_weight=",
                    "depth_weight=", " images/s", "elapsed ", "ETA "):
            assert key in line, (key, line)
    assert len(text) < 10_000, text  # a few lines per epoch and the run's summary, not a redraw per step
