import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import checkpointing, distribution
from mtl_keras.data.datasets import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
# Every weight of tests/scripts/replica_equivalence.py's small model, in its order, counted from its definition: two
# 3x3 convs without bias, each followed by a batch norm, and a 1x1 head with bias per task (outputs in sorted order).
SMALL_MODEL_VARIABLES = [
    "c1_conv/kernel", "c1_bn/gamma", "c1_bn/beta", "c1_bn/moving_mean", "c1_bn/moving_variance",
    "c2_conv/kernel", "c2_bn/gamma", "c2_bn/beta", "c2_bn/moving_mean", "c2_bn/moving_variance",
    "depth_head_logits/kernel", "depth_head_logits/bias", "instance_head_logits/kernel", "instance_head_logits/bias",
    "semantic_head_logits/kernel", "semantic_head_logits/bias"]
SHARED_TRUNK_VARIABLES = ["c1_conv/kernel", "c2_conv/kernel"]


def _assert_a_trained_model_compared_in_full(name, result, moved):
    """The replica comparison covered every weight of the model, the one-device run moved each of ``moved`` (two
    runs that both leave a weight where it started agree for no merit), and the two runs differ by less than a
    millionth of the largest distance training moved a weight (float64: ~1e-12 against ~0.1)."""
    paths = result["paths"]
    assert paths[:len(SMALL_MODEL_VARIABLES)] == SMALL_MODEL_VARIABLES, (name, paths)
    assert all("weighting" in p.split("/")[0] for p in paths[len(SMALL_MODEL_VARIABLES):]), (name, paths)
    assert result["num_variables"] == len(paths)
    unmoved = {p: result["updates"][p] for p in moved if not result["updates"][p] > 1e-3}
    assert not unmoved, (name, unmoved)
    largest_update = max(result["updates"][p] for p in SMALL_MODEL_VARIABLES)
    assert result["max_abs_difference"] <= 1e-6 * largest_update, (name, result["max_abs_difference"], largest_update)


@pytest.mark.slow  # 45 to 70 s
@pytest.mark.subprocess
def test_mirrored_over_two_replicas_gives_the_one_device_weights_for_every_weighting():
    """Same seed, data and steps: same weights (log variances included) under 2 replicas as on one device."""
    weightings = ["uncertainty", "equal", "fixed", "dwa", "mtunet"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "replica_equivalence.py"),
                          *weightings], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULT ", 1)[1])
    for name in weightings:
        # float64 run: reduction-order noise is ~1e-12; a loss scaled by the wrong replica factor, per-replica
        # masked means or unsynchronised adaptive state differ by orders of magnitude more.
        assert results[name]["mismatched"] == [], (name, results[name])
        _assert_a_trained_model_compared_in_full(name, results[name], SMALL_MODEL_VARIABLES)
        weighting_paths = results[name]["paths"][len(SMALL_MODEL_VARIABLES):]
        if name == "uncertainty":  # the paper's three learned log variances, trained and compared too
            assert [p.split("/")[1] for p in weighting_paths] == [f"{t}_log_variance" for t in
                                                                  ("semantic", "instance", "depth")]
            assert all(results[name]["updates"][p] > 1e-3 for p in weighting_paths), results[name]["updates"]
        if name in ("equal", "fixed"):  # constant weights: nothing to learn or keep
            assert weighting_paths == []
        for path, (one_device, mirrored) in results[name]["loss_weight_state"].items():
            # MT-UNet's alpha is a ratio of variances (E[x^2] - E[x]^2): cancellation leaves ~1e-8 relative noise.
            np.testing.assert_allclose(mirrored, one_device, rtol=1e-6, atol=1e-12, err_msg=path)


@pytest.mark.subprocess
def test_per_replica_losses_use_the_global_pixel_count():
    """Two replicas with 1 and 3 labelled pixels: each returns R * local_sum / global_count."""
    script = """
from mtl_keras import distribution
distribution.configure_cpu_replicas(2)
import tensorflow as tf
from mtl_keras.losses import masked_mean
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
def step(values, mask):
    return masked_mean(values, mask)
values = tf.constant([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
masks = tf.constant([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
dist = strategy.experimental_distribute_values_from_function(lambda ctx: (values[ctx.replica_id_in_sync_group],
                                                                          masks[ctx.replica_id_in_sync_group]))
out = strategy.run(step, args=dist)
print("OUT", [float(v) for v in strategy.experimental_local_results(out)])
"""
    out = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    values = json.loads(out.stdout.split("OUT ", 1)[1].replace("'", '"'))
    # global mean = (1 + 2 * 3) / 4 = 1.75; replicas: 2 * 1 / 4 = 0.5 and 2 * 6 / 4 = 3.0 (mean 1.75)
    assert values == pytest.approx([0.5, 3.0])


def test_input_pipelines_are_sharded_without_overlap(tmp_path):
    from mtl_keras.data import generate_synthetic_cityscapes

    data = str(generate_synthetic_cityscapes(str(tmp_path / "d"), num_train=6, num_val=1, height=32, width=64))

    def images(pipeline_id):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        ds = load_dataset("synthetic", data, "train", image_size=(16, 32), batch_size=1, shuffle=False, flip=False,
                          tasks=("semantic",), input_context=context)
        return {np.asarray(x).tobytes() for x, _ in ds}

    first, second = images(0), images(1)
    assert len(first) == len(second) == 3 and not first & second


@contextlib.contextmanager
def _reserved_ports(n):
    """``n`` ports kept reserved while the workers use them, with no window in which another process can take one.

    Picking a free port and closing it before the workers bind it races with every other process that asks the
    kernel for a free port in between. Here each port stays held by a socket bound with SO_REUSEADDR that never
    listens, until the workers have finished: the kernel hands no held port to another bind(port 0) (it picks ports
    in no use at all), while the workers' gRPC servers, which bind with SO_REUSEADDR too and listen, can still bind it
    (a bound, non-listening SO_REUSEADDR socket does not conflict with them; checked with tf.distribute.Server).
    """
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))
            sockets.append(s)
        yield [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# pcgrad: per-task gradients all-reduced across the workers, then a random projection order that must be the same
# on both: a divergence would show as different digests.
def _run_workers(tmp_path, command, name, envs, timeout=600):
    """Starts one process per entry of ``envs`` (TF_CONFIG worker i each), waits for all; returns (return codes, logs,
    seconds from the first exit to the last)."""
    log_paths = [tmp_path / f"{name}{i}.log" for i in range(len(envs))]
    log_files = [open(path, "w") for path in log_paths]  # a full pipe would block a worker inside a collective
    exits = {}
    with _reserved_ports(len(envs)) as ports:
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        procs = [subprocess.Popen(command, cwd=str(tmp_path), stdout=log_files[i], stderr=subprocess.STDOUT,
                                  env={**ENV, **env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                              "task": {"type": "worker", "index": i}})})
                 for i, env in enumerate(envs)]
        try:
            deadline = time.monotonic() + timeout
            while len(exits) < len(procs) and time.monotonic() < deadline:
                for i, p in enumerate(procs):
                    if i not in exits and p.poll() is not None:
                        exits[i] = time.monotonic()
                time.sleep(0.2)
        finally:
            for p, f in zip(procs, log_files):
                p.kill()
                p.wait()
                f.close()
    logs = [path.read_text() for path in log_paths]
    spread = max(exits.values()) - min(exits.values()) if len(exits) == len(procs) else float("inf")
    return [p.returncode for p in procs], logs, spread


@pytest.mark.slow  # three rounds of two worker processes: 2 to 3 min
@pytest.mark.cluster
@pytest.mark.subprocess
def test_workers_stop_together_on_sigterm_a_dead_worker_stops_the_other_and_a_restart_finishes(tmp_path):
    from mtl_keras.data import generate_synthetic_cityscapes

    data = str(generate_synthetic_cityscapes(str(tmp_path / "d"), num_train=8, num_val=2, height=32, width=64))
    out = tmp_path / "run"
    # 8 images at global batch 4: 2 steps per epoch, 4 epochs. PCGrad: per-task gradients across workers.
    command = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--strategy=multi_worker",
               f"--output_dir={out}", f"--data_dir={data}", "--image_size=32,64", "--batch_size=4", "--steps=8",
               "--tasks=semantic,depth", "--export=false", "--val_batches=1", "--weighting=pcgrad", "--deterministic"]
    # 1. A real SIGTERM reaches worker 1 alone as step 2 begins: TF's PreemptionCheckpointHandler has both workers
    #    agree on the step after the one it arrived in (its protocol: the signalled worker cannot know that the
    #    others have not begun the next), back up after it (epoch 2, step 1) and exit 75.
    codes, logs, _ = _run_workers(tmp_path, command, "preempted", [{}, {checkpointing.SIGNAL_AT_STEP_ENV: "2"}])
    assert codes == [75, 75], "\n\n".join(log[-3000:] for log in logs)
    assert "Preempted (SIGTERM on another worker) at epoch 2, step 1/2" in logs[0], logs[0][-3000:]
    assert "Preempted (SIGTERM) at epoch 2, step 1/2" in logs[1], logs[1][-3000:]
    newest = json.loads((out / "backup" / "state.json").read_text())["backups"][0]
    assert (newest["epoch"], newest["step"]) == (1, 1)

    # 2. Restarted, both resume mid-epoch 2; worker 1 dies as under SIGKILL right after its epoch-3 backup: the
    #    chief, waiting for it in epoch 4's first collective, stops with one error line within a bounded time.
    codes, logs, spread = _run_workers(tmp_path, command, "killed", [{}, {checkpointing.KILL_AFTER_EPOCH_ENV: "3"}])
    assert codes[1] == checkpointing.KILLED_EXIT_CODE, logs[1][-3000:]
    assert "Resuming from" in logs[0] and "after epoch 1 and 1 step(s) of the next" in logs[0], logs[0][-3000:]
    assert codes[0] == 75, logs[0][-3000:]
    assert "lost contact with the other workers" in logs[0], logs[0][-3000:]
    print(f"the chief stopped {spread:.1f} s after the worker died")  # for the record (-rP)
    assert spread < 120, f"the chief stopped {spread:.0f} s after the worker died"
    assert not (out / "metrics.json").exists()

    # 3. Both restarted: they resume after epoch 3 and finish in lockstep; only the chief writes the output folder.
    codes, logs, _ = _run_workers(tmp_path, command, "restarted", [{}, {}])
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    digests = [re.findall(r"weights digest ([0-9a-f]{64})", log)[-1] for log in logs]
    assert digests[0] == digests[1]
    assert "global batch 4 = 2 replica(s) x 2 over 2 workers" in logs[0]
    assert "Worker done" in logs[1] and "Worker done" not in logs[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 3 and metrics["steps"] == 8 and metrics["weights_digest"] == digests[0]
    assert metrics["replicas"] == 2 and len(metrics["train_history"]["loss"]) == 4
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "logs", "metrics.json", "metrics_untrained.json",
                                       "model.keras", "preset", "samples", "task_weights.png"]


def test_chief_detection_from_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert not distribution.is_chief() and distribution.task_info() == ("worker", 1, 2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["c:0"], "worker": ["a:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert not distribution.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert distribution.is_chief()


def _gradient_methods():
    from mtl_keras.gradient_methods import GRADIENT_METHODS

    return sorted(n for n in GRADIENT_METHODS if not n.startswith("_"))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("part", [0, 1])
def test_every_gradient_method_takes_the_one_device_step_on_two_replicas_and_lowers_every_task_loss(part):
    """Per-task gradients all-reduced before the method: the same weights (and method state) on 2 replicas as on
    one device, float64, for every gradient method; with representation gradients (gathered over the replicas)
    for the ones that support them. The one-device run of 6 steps lowers every task's training loss."""
    from mtl_keras.gradient_methods import GRADIENT_METHODS

    names = _gradient_methods()[part::2]
    names += [f"{n}:rep" for n in ("pcgrad", "graddrop", "mgda")[part::2] if GRADIENT_METHODS[n].supports_rep_grad]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "replica_equivalence.py"), *names],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULT ", 1)[1])
    for name in names:
        assert results[name]["mismatched"] == [], (name, results[name]["mismatched"])
        # The shared trunk (the weights the method combines the task gradients for) moved on every method.
        _assert_a_trained_model_compared_in_full(name, results[name], SHARED_TRUNK_VARIABLES)
        for path, (one_device, mirrored) in results[name]["loss_weight_state"].items():
            np.testing.assert_allclose(mirrored, one_device, rtol=1e-6, atol=1e-12, err_msg=f"{name} {path}")
        for task, losses in results[name]["history"].items():
            assert losses[-1] < losses[0], (name, task, losses)
