import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import distribution
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
@pytest.mark.slow  # 1.5 to 2.5 min each
@pytest.mark.subprocess
@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_two_worker_processes_train_in_lockstep_and_only_the_chief_writes(tmp_path, weighting):
    from mtl_keras.data import generate_synthetic_cityscapes

    data = str(generate_synthetic_cityscapes(str(tmp_path / "d"), num_train=8, num_val=2, height=32, width=64))
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--strategy=multi_worker",
               f"--output_dir={out}", f"--data_dir={data}", "--image_size=32,64", "--batch_size=4", "--steps=4",
               "--tasks=semantic,depth", "--export=false", "--val_batches=1", f"--weighting={weighting}"]
    # Logs go to files: a full pipe would block one worker while the other waits for it in a collective.
    log_files = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    with _reserved_ports(2) as ports:
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        procs = [subprocess.Popen(command, cwd=str(tmp_path), stdout=log_files[i], stderr=subprocess.STDOUT,
                                  env={**ENV, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                       "task": {"type": "worker", "index": i}})})
                 for i in range(2)]
        try:
            for p in procs:
                p.wait(timeout=900)
        finally:
            for p, f in zip(procs, log_files):
                p.kill()
                p.wait()
                f.close()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    digests = [re.findall(r"weights digest ([0-9a-f]{64})", log)[-1] for log in logs]
    assert digests[0] == digests[1]
    assert "global batch 4 = 2 replica(s) x 2 over 2 workers" in logs[0]
    assert "Worker done" in logs[1] and "Worker done" not in logs[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_digest"] == digests[0] and metrics["replicas"] == 2
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
