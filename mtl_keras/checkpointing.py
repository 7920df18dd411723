"""Resumable training: per-epoch backups that survive SIGKILL. Unlike Keras' ``BackupAndRestore`` (weights, then
the epoch, as two plain files), each backup is renamed into place and then recorded with its sha256 in ``state.json``
(replaced atomically); ``restore`` falls back past a missing or corrupt backup to the one before."""

import json
import logging
import os
import shutil

import keras
import numpy as np

from mtl_keras.presets import file_sha256

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
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{epoch + 1:05d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        self.model.save_weights(f"{path}.tmp.weights.h5", overwrite=True)
        self._test_kill_during_write(epoch + 1, "weights", f"{path}.tmp.weights.h5")
        os.replace(f"{path}.tmp.weights.h5", path)
        state = read_state(self.backup_dir)
        entries = [{"epoch": epoch + 1, "file": name, "sha256": file_sha256(path)}] + state.get("backups", [])
        history = {"epochs": epoch + 1, "epoch_logs": self.epoch_logs,
                   "weighting": dict(self.weighting_history.history) if self.weighting_history is not None else {}}
        state_path = os.path.join(self.backup_dir, STATE_FILE)
        with open(f"{state_path}.tmp", "w") as f:
            f.write(json.dumps({"backups": entries[:self.keep], "history": history}, indent=2))
            f.flush()
            os.fsync(f.fileno())
        self._test_kill_during_write(epoch + 1, "state", f"{state_path}.tmp")
        os.replace(f"{state_path}.tmp", state_path)
        # Only now that state.json no longer lists them: a kill before this point keeps every listed file.
        for stale in entries[self.keep:]:
            stale_path = os.path.join(self.backup_dir, stale["file"])
            if os.path.exists(stale_path):
                os.remove(stale_path)
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(epoch + 1):
            # Tests of resuming: dies as under SIGKILL (no cleanup), at a known point instead of a racing signal.
            log.warning("%s=%d: exiting as if killed.", KILL_AFTER_EPOCH_ENV, epoch + 1)
            logging.shutdown()
            os._exit(KILLED_EXIT_CODE)

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


def read_history(backup_dir, epochs_done, steps_per_epoch):
    """``{"epoch_logs": {name: [...]}, "weighting": {"step": [...], name: [...]}}`` recorded up to the end of epoch
    ``epochs_done`` (the state is ahead of the restored backup when the newest one was unusable)."""
    history = read_state(backup_dir).get("history") or {}
    logs = {k: list(v)[:epochs_done] for k, v in (history.get("epoch_logs") or {}).items()}
    weighting = history.get("weighting") or {}
    steps = list(weighting.get("step", []))
    keep = sum(1 for step in steps if step <= epochs_done * steps_per_epoch)
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
            and os.path.basename(b["file"]) == b["file"] and isinstance(b.get("sha256"), str) for b in backups):
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
    warning); returns the number of epochs it completed (0: none)."""
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
            log.info("Resuming from %s (after epoch %d).", path, entry["epoch"])
            return int(entry["epoch"])
        log.warning("Backup %s is unusable: %s; trying the previous one.", path, problem)
    return 0


def remove_backups(backup_dir):
    if os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)


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
