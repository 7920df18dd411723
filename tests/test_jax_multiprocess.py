"""JAX on several processes: ``--strategy multi_worker`` with ``KERAS_BACKEND=jax`` joins the processes with
``keras.distribution.initialize`` and trains one ``DataParallel`` computation over all their devices; the cluster comes
from TF_CONFIG (as on TensorFlow) or from Keras' KERAS_DISTRIBUTION_* variables (mtl_keras/distribution.py)."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import keras
import pytest

from mtl_keras import checkpointing, distribution

pytest.importorskip("jax", reason="JAX is not installed: no multi-process JAX training to test")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERAS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                   "KERAS_DISTRIBUTION_PROCESS_ID")


@contextlib.contextmanager
def _reserved_port():
    """A free port, kept bound (SO_REUSEADDR, never listening) until the processes are done, so that no other process
    is handed it meanwhile; JAX's coordinator (gRPC, SO_REUSEADDR too) can still bind and listen on it (as in
    tests/test_distribution.py's ``_reserved_ports``)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", 0))
        yield s.getsockname()[1]
    finally:
        s.close()


def _wait_all(procs, log_files, timeout):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p, f in zip(procs, log_files):
            p.kill()
            p.wait()
            f.close()


@pytest.mark.slow  # 100 s on 2 shared cores: three processes, then the two preempted ones again
@pytest.mark.cluster
@pytest.mark.subprocess
def test_two_jax_processes_preempted_and_restarted_train_to_the_weights_of_one_process(tmp_path):
    """Two processes of one CPU device each end with the weights (sha256 of every weight, bit for bit) of one process
    that trains the same global batches over two CPU devices, also when a SIGTERM to one of them stops both and they
    are started again; only process 0 writes the output folder.

    The one-process run has two devices, not one: the two-process run sums each mean over the two halves of the
    global batch (then all-reduces), a one-device run over the four examples at once, and float32 rounds these
    differently; two steps of this small net (batch norm over 4 images; Adam's first updates ~ lr * sign(gradient))
    amplify that rounding from 1e-5 of the update to 1e-2 (measured by hand; 1e-14 in float64), so no tolerance
    would be both honest and tight. Over two devices in one process XLA runs the same partitioned step, so the digests are equal exactly when
    each process fed its own half of every global batch, in order, and the gradients were summed over both (a process
    reading the other's half, or the whole batch, or a batch of another step, changes them). That the data-parallel
    step is the one-device step, up to rounding, is tested in float64 in tests/test_backends.py."""
    from mtl_keras.data import generate_synthetic_cityscapes

    data = str(generate_synthetic_cityscapes(str(tmp_path / "d"), num_train=8, num_val=2, height=32, width=64))
    out, reference = tmp_path / "run", tmp_path / "one_process"
    # 2 epochs of 2 steps: the epoch-end callbacks (the backups of every process, the chief's checkpoint) run between
    # steps, where a chief-only collective would stall or garble the next step.
    command = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--data_dir={data}",
               "--image_size=32,64", "--batch_size=4", "--steps=4", "--tasks=semantic,depth", "--export=false",
               "--val_batches=1", "--deterministic"]
    # TMPDIR: the non-chief process keeps its backups in a folder of its own under it (experiment._worker_dir).
    # JAX_DISABLE_MOST_OPTIMIZATIONS: XLA compiles with fewer passes, a third less CPU time for the same comparison
    # (the three runs compile alike; with the default optimisations the digests are equal too, checked by hand).
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "TMPDIR": str(tmp_path / "tmp")}
    for name in ("TF_CONFIG", "XLA_FLAGS", *KERAS_VARIABLES):
        env.pop(name, None)
    os.makedirs(env["TMPDIR"])
    # Logs go to files: a full pipe would block one process while the other waits for it in a collective.
    names = ["process0", "process1", "one_process"]
    log_files = [open(tmp_path / f"{name}.log", "w") for name in names]
    with _reserved_port() as port:
        cluster = {"worker": [f"localhost:{port}", "localhost:0"]}  # JAX uses process 0's address only
        # Process 1 alone gets a real SIGTERM as step 2 begins (a test hook): JAX's preemption sync point stops both
        # processes at one step, each backs up, and both exit 75; started again, they resume and finish.
        procs = [subprocess.Popen(command + ["--strategy=multi_worker", f"--output_dir={out}"], cwd=str(tmp_path),
                                  stdout=log_files[i], stderr=subprocess.STDOUT,
                                  env={**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                       "task": {"type": "worker", "index": i}}),
                                       **({checkpointing.SIGNAL_AT_STEP_ENV: "2"} if i == 1 else {})})
                 for i in range(2)]
        # Started alongside (the machine's cores are shared anyway): one process over two CPU devices.
        procs.append(subprocess.Popen(command + ["--strategy=mirrored", "--cpu_replicas=2",
                                                 f"--output_dir={reference}"], cwd=str(tmp_path),
                                      stdout=log_files[2], stderr=subprocess.STDOUT,
                                      env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
        _wait_all(procs, log_files, timeout=600)
        preempted = [(tmp_path / f"{name}.log").read_text() for name in names]
        assert [p.returncode for p in procs] == [75, 75, 0], "\n\n".join(log[-3000:] for log in preempted)
        stops = [re.findall(r"Preempted \(SIGTERM to a process\) at (epoch \d+, step \d+/2)", log) for log in preempted[:2]]
        assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # the same step on both
        log_files = [open(tmp_path / f"{name}.log", "w") for name in names[:2]]
        procs[:2] = [subprocess.Popen(command + ["--strategy=multi_worker", f"--output_dir={out}"], cwd=str(tmp_path),
                                      stdout=log_files[i], stderr=subprocess.STDOUT,
                                      env={**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                           "task": {"type": "worker", "index": i}})})
                     for i in range(2)]
        _wait_all(procs[:2], log_files, timeout=600)
    logs = [(tmp_path / f"{name}.log").read_text() for name in names]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert all("Resuming from" in log for log in logs[:2])

    digests = [re.findall(r"weights digest ([0-9a-f]{64})", log)[-1] for log in logs]
    metrics = json.loads((out / "metrics.json").read_text())
    one = json.loads((reference / "metrics.json").read_text())
    assert digests[0] == digests[1] == metrics["weights_digest"]
    assert metrics["weights_digest"] == one["weights_digest"] == digests[2]
    assert "global batch 4 = 2 replica(s) x 2 over 2 workers" in logs[0]
    assert "global batch 4 = 2 replica(s) x 2;" in logs[2]
    assert metrics["strategy"] == one["strategy"] == "DataParallel" and metrics["backend"] == "jax"
    assert metrics["replicas"] == one["replicas"] == 2 and metrics["steps"] == 4
    # The same losses, epoch by epoch, and the run really trained (equal digests of untrained weights prove nothing).
    losses = metrics["train_history"]["loss"]
    assert len(losses) == 2 and losses == one["train_history"]["loss"] and losses[1] != losses[0]

    assert "Worker done" in logs[1] and "Worker done" not in logs[0]
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "logs", "metrics.json", "metrics_untrained.json",
                                       "model.keras", "preset", "samples", "task_weights.png"]
    # Process 1 kept its backups in its own folder (removed with them at the end), never in the output folder.
    worker_folders = [name for name in os.listdir(env["TMPDIR"]) if name.startswith("mtl_keras_")]
    assert len(worker_folders) == 1 and re.fullmatch(r"mtl_keras_[0-9a-f]{12}_worker1", worker_folders[0])


def _as_jax(monkeypatch, **variables):
    """The cluster variables ``variables`` alone, and the answers ``distribution`` gives on JAX (the backend is read
    per call; JAX itself is not started: before ``keras.distribution.initialize`` the answers come from them)."""
    for name in ("TF_CONFIG", *KERAS_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")


def test_the_jax_processes_are_tf_config_s_chief_then_its_workers(monkeypatch):
    cluster = {"chief": ["c:1"], "worker": ["a:2", "b:3"]}
    for task, process in ((("chief", 0), 0), (("worker", 0), 1), (("worker", 1), 2)):
        _as_jax(monkeypatch, TF_CONFIG=json.dumps({"cluster": cluster,
                                                   "task": {"type": task[0], "index": task[1]}}))
        assert distribution._jax_cluster() == ("c:1", 3, process)  # the chief coordinates
        assert distribution.task_info() == ("worker", process, 3)
        assert distribution.is_chief() == (process == 0)


def test_the_jax_cluster_from_keras_variables_and_its_errors(monkeypatch):
    _as_jax(monkeypatch, KERAS_DISTRIBUTION_JOB_ADDRESSES="h0:7000,h1:7000", KERAS_DISTRIBUTION_NUM_PROCESSES="2",
            KERAS_DISTRIBUTION_PROCESS_ID="1")
    assert distribution._jax_cluster() == ("h0:7000", 2, 1)
    assert distribution.task_info() == ("worker", 1, 2) and not distribution.is_chief()

    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"^KERAS_DISTRIBUTION_PROCESS_ID 2 is not in 0\.\.1"):
        distribution.is_chief()
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID environment variable must be an integer"):
        distribution.task_info()
    monkeypatch.delenv("KERAS_DISTRIBUTION_NUM_PROCESSES")
    with pytest.raises(ValueError, match="but not KERAS_DISTRIBUTION_NUM_PROCESSES"):
        distribution.is_chief()

    _as_jax(monkeypatch)  # no cluster: one process, the chief; multi_worker is refused before JAX starts
    assert distribution.task_info() == ("chief", 0, 1) and distribution.is_chief()
    with pytest.raises(ValueError, match="multi_worker on JAX needs the cluster in TF_CONFIG"):
        distribution.create_strategy("multi_worker")
    _as_jax(monkeypatch, TF_CONFIG=json.dumps({"cluster": {"worker": ["a:1"], "ps": ["p:2"]},
                                               "task": {"type": "ps", "index": 0}}))
    with pytest.raises(ValueError, match="TF_CONFIG task type 'ps'"):
        distribution.is_chief()
