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
        assert results[name]["num_variables"] >= 16
        for path, (one_device, mirrored) in results[name]["loss_weight_state"].items():
            # MT-UNet's alpha is a ratio of variances (E[x^2] - E[x]^2): cancellation leaves ~1e-8 relative noise.
            np.testing.assert_allclose(mirrored, one_device, rtol=1e-6, atol=1e-12, err_msg=path)


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


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# pcgrad: per-task gradients all-reduced across the workers, then a random projection order that must be the same
# on both: a divergence would show as different digests.
@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_two_worker_processes_train_in_lockstep_and_only_the_chief_writes(tmp_path, weighting):
    from mtl_keras.data import generate_synthetic_cityscapes

    data = str(generate_synthetic_cityscapes(str(tmp_path / "d"), num_train=8, num_val=2, height=32, width=64))
    out = tmp_path / "run"
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    command = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--strategy=multi_worker",
               f"--output_dir={out}", f"--data_dir={data}", "--image_size=32,64", "--batch_size=4", "--steps=4",
               "--tasks=semantic,depth", "--export=false", "--val_batches=1", f"--weighting={weighting}"]
    # Logs go to files: a full pipe would block one worker while the other waits for it in a collective.
    log_files = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
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
                                       "model.keras", "samples", "task_weights.png"]


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
        for path, (one_device, mirrored) in results[name]["loss_weight_state"].items():
            np.testing.assert_allclose(mirrored, one_device, rtol=1e-6, atol=1e-12, err_msg=f"{name} {path}")
        for task, losses in results[name]["history"].items():
            assert losses[-1] < losses[0], (name, task, losses)
