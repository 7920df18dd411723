"""Resumable training: per-epoch backups that survive SIGKILL. Unlike Keras' ``BackupAndRestore`` (weights, then
the epoch, as two plain files), each backup is renamed into place and then recorded with its sha256 in ``state.json``
(replaced atomically); ``restore`` falls back past a missing or corrupt backup to the one before."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading

import keras
import numpy as np

from mtl_keras.atomic_files import atomic_path
from mtl_keras.presets import file_sha256, save_weights_file, write_weights

log = logging.getLogger("mtl_keras")

STATE_FILE = "state.json"
# Test hook: the process exits abruptly right after the backup of this epoch (1-based) is recorded.
KILL_AFTER_EPOCH_ENV = "MTL_KERAS_TEST_KILL_AFTER_EPOCH"
# Test hook, "EPOCH:STAGE": the process exits abruptly in the middle of that epoch's backup, its temporary file cut
# to half as a write stopped short leaves it: "weights" (the new weights file, before it is renamed into place) or
# "state" (state.json's replacement, the new weights file already in place).
KILL_DURING_BACKUP_ENV = "MTL_KERAS_TEST_KILL_DURING_BACKUP"
KILL_DURING_BACKUP_STAGES = ("weights", "state")
KILLED_EXIT_CODE = 75
# A preempted run's exit status: EX_TEMPFAIL (sysexits.h, "try again later"), what a scheduler's requeue rule matches
# (SLURM: `scontrol requeue` on it in the batch script; Kubernetes: a podFailurePolicy rule onExitCodes [75]).
PREEMPTED_EXIT_CODE = 75
# Test hook, "STEP[:SIGNAL]": the process sends itself SIGNAL (default SIGTERM) as global step STEP (1-based) begins,
# so a test of preemption neither races the training nor passes without an interruption; the signal is real.
SIGNAL_AT_STEP_ENV = "MTL_KERAS_TEST_SIGNAL_AT_STEP"


class EpochBackup(keras.callbacks.Callback):
    """Backs the whole trainer up to ``backup_dir`` after every epoch, keeping the ``keep`` newest. ``state.json`` also
    keeps the run's record for :func:`read_history`: ``epoch_logs`` (``{name: [value per epoch]}``, seeded with the
    resumed epochs') and the points of ``weighting_history`` (a ``training.WeightingHistory``)."""

    def __init__(self, backup_dir, keep=2, epoch_logs=None, weighting_history=None):
        super().__init__()
        self.backup_dir = backup_dir
        self.keep = keep
        self.epoch_logs = {k: list(v) for k, v in (epoch_logs or {}).items()}
        self.weighting_history = weighting_history

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            try:
                self.epoch_logs.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                continue
        self.write(epoch + 1)
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(epoch + 1):
            # Tests of resuming: dies as under SIGKILL (no cleanup), at a known point instead of a racing signal.
            log.warning("%s=%d: exiting as if killed.", KILL_AFTER_EPOCH_ENV, epoch + 1)
            logging.shutdown()
            os._exit(KILLED_EXIT_CODE)

    def write(self, epochs_done, step=0, metric_states=None):
        """Backs the trainer up after ``epochs_done`` epochs and ``step`` steps of the next (a preempted run's
        mid-epoch backup, with its epoch's running ``metric_states`` so far); returns the backup's path."""
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{epochs_done:05d}" + (f"-step-{step:06d}" if step else "") + ".weights.h5"
        path = os.path.join(self.backup_dir, name)
        with atomic_path(path) as temporary:  # a failed write: DiskWriteError, the previous backups untouched
            write_weights(self.model, temporary)  # built in memory: HDF5 segfaults on a full disk
            self._test_kill_during_write(epochs_done, "weights", temporary)
        state = read_state(self.backup_dir)
        entry = {"epoch": epochs_done, "file": name, "sha256": file_sha256(path)}
        if step:
            entry.update(step=int(step), metric_states=metric_states or [])
        entries = [entry] + [e for e in state.get("backups", []) if e["file"] != name]
        history = {"epochs": epochs_done, "epoch_logs": self.epoch_logs,
                   "weighting": dict(self.weighting_history.history) if self.weighting_history is not None else {}}
        with atomic_path(os.path.join(self.backup_dir, STATE_FILE)) as temporary:
            with open(temporary, "w") as f:
                f.write(json.dumps({"backups": entries[:self.keep], "history": history}, indent=2))
            self._test_kill_during_write(epochs_done, "state", temporary)
        # Only now that state.json no longer lists them: a kill before this point keeps every listed file.
        for stale in entries[self.keep:]:
            stale_path = os.path.join(self.backup_dir, stale["file"])
            if os.path.exists(stale_path):
                os.remove(stale_path)
        return path

    @staticmethod
    def _test_kill_during_write(epoch, stage, partial_file):
        """KILL_DURING_BACKUP_ENV's hook: dies as under SIGKILL with ``partial_file`` half written (tests of resuming:
        a kill inside the backup's write, at a known point instead of a racing signal)."""
        if os.environ.get(KILL_DURING_BACKUP_ENV) != f"{epoch}:{stage}":
            return
        with open(partial_file, "r+b") as f:
            f.truncate(os.path.getsize(partial_file) // 2)
        log.warning("%s=%d:%s: exiting as if killed while writing %s.", KILL_DURING_BACKUP_ENV, epoch, stage,
                    partial_file)
        logging.shutdown()
        os._exit(KILLED_EXIT_CODE)


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_metric_states(value):
    return isinstance(value, list) and all(
        isinstance(state, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in state)
        for state in value)


def read_history(backup_dir, epochs_done, steps_per_epoch, step=0):
    """``{"epoch_logs": {name: [...]}, "weighting": {"step": [...], name: [...]}}`` recorded up to the end of epoch
    ``epochs_done`` and ``step`` steps into the next (the state is ahead of the restored backup when the newest one
    was unusable)."""
    history = read_state(backup_dir).get("history") or {}
    logs = {k: list(v)[:epochs_done] for k, v in (history.get("epoch_logs") or {}).items()}
    weighting = history.get("weighting") or {}
    steps = list(weighting.get("step", []))
    keep = sum(1 for s in steps if s <= epochs_done * steps_per_epoch + step)
    return {"epoch_logs": logs, "weighting": {k: list(v)[:keep] for k, v in weighting.items()}}


def read_state(backup_dir):
    path = os.path.join(backup_dir, STATE_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        log.warning("Ignoring unreadable backup state %s (%s).", path, " ".join(str(e).split())[:200])
        return {}
    # JSON of another shape (a corrupt or foreign file) is unreadable too: restore and read_history index it blindly
    backups = state.get("backups") if isinstance(state, dict) else None  # EpochBackup always writes the key
    if not isinstance(backups, list) or not all(
            isinstance(b, dict) and isinstance(b.get("epoch"), int) and not isinstance(b["epoch"], bool)
            and b["epoch"] >= 0 and isinstance(b.get("file"), str) and b["file"]
            and os.path.basename(b["file"]) == b["file"] and isinstance(b.get("sha256"), str)
            and _is_count(b.get("step", 0)) and _is_metric_states(b.get("metric_states", [])) for b in backups):
        log.warning("Ignoring unreadable backup state %s (expected {\"backups\": [{\"epoch\": int, \"file\": "
                    "name, \"sha256\": hex}, ...], \"history\": {...}}).", path)
        return {}
    history = state.get("history") or {}
    logs, weighting = (history.get("epoch_logs") or {}, history.get("weighting") or {}) \
        if isinstance(history, dict) else (None, None)
    if not (isinstance(logs, dict) and all(isinstance(v, list) for v in logs.values())
            and isinstance(weighting, dict) and all(isinstance(v, list) for v in weighting.values())
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in weighting.get("step", []))):
        log.warning("Ignoring the unreadable history in backup state %s (the backups are kept).", path)
        state = {k: v for k, v in state.items() if k != "history"}
    return state


def restore(trainer, backup_dir):
    """Loads the newest intact backup into ``trainer`` (a missing, corrupt or unloadable one is skipped with a
    warning); returns the number of epochs it completed (0: none). A mid-epoch backup's steps: :func:`restore_point`."""
    return restore_point(trainer, backup_dir).epoch


@dataclasses.dataclass(frozen=True)
class RestorePoint:
    """Where a resumed run goes on: after ``epoch`` epochs and ``step`` steps of the next, whose running metrics
    (the epoch's loss means so far) were ``metric_states`` (one list of values per metric variable)."""

    epoch: int = 0
    step: int = 0
    metric_states: tuple = ()


def restore_point(trainer, backup_dir):
    """Loads the newest intact backup into ``trainer`` (a missing, corrupt or unloadable one is skipped with a
    warning); returns its :class:`RestorePoint` (all zero: none)."""
    for entry in read_state(backup_dir).get("backups", []):
        path = os.path.join(backup_dir, entry["file"])
        problem = None
        if not os.path.isfile(path):
            problem = "the file is missing"
        elif file_sha256(path) != entry["sha256"].lower():
            problem = "its sha256 does not match (partial or corrupt write)"
        else:
            try:
                if trainer.optimizer is not None and not trainer.optimizer.built:
                    trainer.optimizer.build(trainer.trainable_variables)
                trainer.load_weights(path)
            except Exception as e:  # noqa: BLE001 - any load failure means: try the previous backup
                problem = f"it does not load ({type(e).__name__}: {e})"
        if problem is None:
            step = int(entry.get("step", 0))
            log.info("Resuming from %s (after epoch %d%s).", path, entry["epoch"],
                     f" and {step} step(s) of the next" if step else "")
            return RestorePoint(int(entry["epoch"]), step, tuple(tuple(v) for v in entry.get("metric_states", [])))
        log.warning("Backup %s is unusable: %s; trying the previous one.", path, problem)
    return RestorePoint()


class Preempted(SystemExit):
    """Raised by :class:`PreemptionGuard` once the backup is written: every entry point exits with
    ``PREEMPTED_EXIT_CODE`` and no traceback, and ``with`` blocks on the way (the run lock) are left cleanly."""

    def __init__(self, message):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self):
        return self.message


class PreemptionGuard(keras.callbacks.Callback):
    """Turns SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) into: finish the current step, write a backup
    (``backup``'s atomic, sha256-checked one; mid-epoch, with the epoch's running metrics), log one line and raise
    :class:`Preempted`. A second SIGINT stops at once (KeyboardInterrupt); a second SIGTERM changes nothing (a
    scheduler's hard stop is SIGKILL after its grace period).
    Handlers are installed by ``with guard:`` around ``fit`` (from the main thread only; elsewhere it does nothing).
    Put it last among the callbacks: at an epoch's last step it lets the epoch end (so the epoch-end callbacks,
    ``backup`` among them, run as in an uninterrupted run) and stops after them.

    ``steps_per_epoch``: the run's. ``initial_epoch`` / ``initial_step`` / ``metric_states``: a resumed mid-epoch
    point (:class:`RestorePoint`): the first epoch starts its step count there and gets its metrics back after Keras
    resets them, so that its logs (and DWA's epoch means) equal an uninterrupted run's."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, backup, steps_per_epoch, initial_epoch=0, initial_step=0, metric_states=()):
        super().__init__()
        self.backup = backup
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch = int(initial_epoch)
        self.step = int(initial_step)
        self._resume = (int(initial_epoch), int(initial_step), tuple(metric_states)) if initial_step else None
        self.received = None
        self._previous = {}
        self._signal_at = self._test_signal_at()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False

    def _on_signal(self, number, frame):
        name = signal.Signals(number).name
        if self.received is not None:
            if number == signal.SIGINT:  # Ctrl-C again: stop now
                signal.signal(number, self._previous.get(number, signal.SIG_DFL))
                raise KeyboardInterrupt
            return  # SIGTERM again (a scheduler, or a benchmark passing its own on): the backup is under way
        self.received = name
        log.warning("%s received: finishing the current step, then writing a backup and exiting with status %d%s.",
                    name, PREEMPTED_EXIT_CODE, " (Ctrl-C again to stop at once)" if number == signal.SIGINT else "")

    @staticmethod
    def _test_signal_at():
        value = os.environ.get(SIGNAL_AT_STEP_ENV, "")
        if not value:
            return None
        step, _, name = value.partition(":")
        return int(step), getattr(signal, name or "SIGTERM")

    def metric_variables(self):
        return [v for metric in self.model.metrics for v in metric.variables]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.step = epoch, 0
        if self._resume and self._resume[0] == epoch:
            _, self.step, states = self._resume
            variables = self.metric_variables()
            if len(states) == len(variables):
                for variable, value in zip(variables, states):
                    variable.assign(np.asarray(value, dtype=variable.dtype).reshape(variable.shape))
            else:
                log.warning("The backup's running metrics (%d) do not match the trainer's (%d): epoch %d's logged means "
                            "count only the steps after the resume.", len(states), len(variables), epoch + 1)
        self._resume = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._signal_at and self._signal_at[0] == self.epoch * self.steps_per_epoch + self.step + 1:
            os.kill(os.getpid(), self._signal_at[1])

    # Asked once per step, in the same order in every process (the multi-process agreements count the calls): after
    # each step but an epoch's last, and after the epoch's end for that one (the epoch ends first, its backup too).
    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step < self.steps_per_epoch and self._preempted():
            self._stop(self._back_up_here())

    def on_epoch_end(self, epoch, logs=None):
        if self._preempted():
            self._stop(self._back_up_here())

    def _preempted(self):
        """Whether to stop after this step; the multi-process guards ask their cluster here."""
        return self.received is not None

    def _back_up_here(self):
        """The backup to resume from: written now mid-epoch (with the epoch's running metrics); after an epoch's last
        step the epoch's own, which ``backup`` has just written."""
        if self.step >= self.steps_per_epoch:
            return os.path.join(self.backup.backup_dir, read_state(self.backup.backup_dir)["backups"][0]["file"])
        states = [np.asarray(keras.ops.convert_to_numpy(v)).reshape(-1).tolist() for v in self.metric_variables()]
        return self.backup.write(self.epoch, self.step, metric_states=states)

    def _stop(self, path):
        message = (f"Preempted ({self.received}) at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}: "
                   f"backed up to {path}; exiting with status {PREEMPTED_EXIT_CODE} (starting the same command "
                   f"resumes from this step).")
        log.warning("%s", message)
        raise Preempted(message)


class WorkerPreemptionGuard(PreemptionGuard):
    """:class:`PreemptionGuard` for the workers of a ``MultiWorkerMirroredStrategy``: TensorFlow's own
    ``tf.distribute.experimental.PreemptionCheckpointHandler`` takes SIGTERM on any worker, agrees with every worker
    (through the coordination service) on the step to stop after, and there calls our ``save_fn`` (each worker writes
    its backup: the chief to the output folder, the others to their own) and ``exit_fn`` (:class:`Preempted`). Its
    own tf.train checkpoint stays empty: the backups are ours, so a restart resumes as a single process does.
    SIGINT keeps its default under several workers."""

    SIGNALS = ()  # TF's handler installs its own SIGTERM handler

    def __init__(self, backup, steps_per_epoch, cluster_resolver, initial_epoch=0, initial_step=0, metric_states=()):
        super().__init__(backup, steps_per_epoch, initial_epoch, initial_step, metric_states)
        self.cluster_resolver = cluster_resolver
        self.handler = None
        self._path = None

    def __enter__(self):
        import tensorflow as tf

        self._previous = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        config = tf.distribute.experimental.TerminationConfig(exit_fn=self._exit, save_fn=self._save)
        self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            self.cluster_resolver, tf.train.Checkpoint(), checkpoint_dir=os.path.join(self.backup.backup_dir, "tf"),
            termination_config=config)
        return self

    def _preempted(self):
        self.handler.save_checkpoint_if_preempted()  # on the agreed step: _save, then _exit raises Preempted
        return False

    def _save(self, *args, **kwargs):
        self._path = self._back_up_here()

    def _exit(self):
        own = self.handler is not None and self.handler._received_own_sigterm.is_set()  # noqa: SLF001 - for the log
        self.received = "SIGTERM" if own else "SIGTERM on another worker"
        self._stop(self._path)


class JaxProcessPreemptionGuard(PreemptionGuard):
    """:class:`PreemptionGuard` for JAX's processes (``--strategy multi_worker`` on JAX): JAX's coordination service,
    started by ``keras.distribution.initialize``, takes SIGTERM on any process and agrees with every process on a
    step; ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` is then True on all of them at that
    step, where each writes its backup and stops with :class:`Preempted` (TensorFlow's handler's counterpart), asked
    with the global step number."""

    SIGNALS = ()  # JAX's preemption notifier takes SIGTERM

    def _preempted(self):
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(self.epoch * self.steps_per_epoch + self.step):
            self.received = "SIGTERM to a process"
        return self.received is not None


def remove_backups(backup_dir):
    if os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)


class LastWeights(keras.callbacks.Callback):
    """Keras' ``ModelCheckpoint(path, save_weights_only=True)`` written whole or not at all: the previous epoch's file
    stays when a write fails (one line: :class:`mtl_keras.atomic_files.DiskWriteError`), and HDF5 never meets the
    disk (it segfaults on a full one)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        save_weights_file(self.model, self.path)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss or weight with a clear error, before any checkpoint can store it
    (Keras' ``TerminateOnNaN`` lets the epoch end, and the epoch-end callbacks save the diverged weights)."""

    def __init__(self, backup_dir=None):
        super().__init__()
        self.where = f" The last good state is kept in {backup_dir}." if backup_dir else ""
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        # A finite loss does not prove finite weights: oneDNN's max-pooling (and ReLU fused into batch norm) maps NaN
        # to a number, so NaN images can leave the loss finite while batch-norm statistics turn NaN.
        bad = [v.path for v in self.model.weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]
        if bad:
            raise FloatingPointError(
                f"Training diverged in epoch {epoch + 1}: non-finite weights ({len(bad)} variable(s), e.g. "
                f"{', '.join(bad[:3])}) although the loss stayed finite.{self.where} Check the data for NaN/inf "
                f"images, or lower the learning rate.")

    def on_train_batch_end(self, batch, logs=None):
        bad = {k: v for k, v in (logs or {}).items() if k.endswith("loss") and not _finite(v)}
        if bad:
            raise FloatingPointError(
                f"Training diverged at epoch {self._epoch + 1}, step {batch + 1}: non-finite "
                f"{', '.join(f'{k}={v}' for k, v in bad.items())}.{self.where} Lower the learning rate, or check the "
                f"data for NaN/inf targets outside their masks.")


def _finite(value):
    try:
        return bool(abs(float(value)) < float("inf"))
    except (TypeError, ValueError):
        return True
