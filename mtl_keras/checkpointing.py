"""Resumable training: atomic per-epoch backups that survive SIGKILL, with fallback past a corrupt file.

Keras' ``BackupAndRestore`` writes the weights and then the epoch number as two plain files; a kill between the two
(or during the first) leaves them inconsistent. Here each backup is written to a temporary name, checksummed and
renamed into place, and only then recorded in ``state.json`` (itself replaced atomically). ``restore`` verifies the
newest backup's sha256 and falls back, with a warning, to the one before it. The two newest backups are kept.
"""

import json
import logging
import os
import shutil

import keras
import numpy as np

from mtl_keras.pretrained import file_sha256

log = logging.getLogger("mtl_keras")

STATE_FILE = "state.json"


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EpochBackup(keras.callbacks.Callback):
    """Backs the whole trainer (model, loss weights, optimizer state) up to ``backup_dir`` after every epoch."""

    def __init__(self, backup_dir, keep=2):
        super().__init__()
        self.backup_dir = backup_dir
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{epoch + 1:05d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        self.model.save_weights(f"{path}.tmp.weights.h5", overwrite=True)
        os.replace(f"{path}.tmp.weights.h5", path)
        state = read_state(self.backup_dir)
        entries = [{"epoch": epoch + 1, "file": name, "sha256": file_sha256(path)}] + state.get("backups", [])
        for stale in entries[self.keep:]:
            stale_path = os.path.join(self.backup_dir, stale["file"])
            if os.path.exists(stale_path):
                os.remove(stale_path)
        _atomic_write_text(os.path.join(self.backup_dir, STATE_FILE),
                           json.dumps({"backups": entries[:self.keep]}, indent=2))


def read_state(backup_dir):
    path = os.path.join(backup_dir, STATE_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log.warning("Ignoring unreadable backup state %s (%s).", path, e)
        return {}


def restore(trainer, backup_dir):
    """Loads the newest intact backup into ``trainer``; returns the number of epochs it completed (0: none).

    A backup whose file is missing, fails its sha256 or does not load is skipped with a warning.
    """
    for entry in read_state(backup_dir).get("backups", []):
        path = os.path.join(backup_dir, entry["file"])
        problem = None
        if not os.path.exists(path):
            problem = "the file is missing"
        elif file_sha256(path) != entry["sha256"]:
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
    """Stops training at the first non-finite loss with a clear error, before any checkpoint can store it.

    Keras' ``TerminateOnNaN`` lets the epoch end, so epoch-end callbacks would save the diverged weights; raising
    here keeps the last good backup and checkpoint untouched.
    """

    def __init__(self, backup_dir=None):
        super().__init__()
        self.backup_dir = backup_dir
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        # A finite loss does not prove finite weights: oneDNN's max-pooling (and ReLU fused into batch norm) maps NaN
        # to a number, so NaN images can leave the loss finite while they turn batch-norm statistics and scales into
        # NaN. This runs before the epoch's backup is written (the guard comes first in the callback list).
        bad = [v.path for v in self.model.weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]
        if bad:
            where = f" The last good state is kept in {self.backup_dir}." if self.backup_dir else ""
            raise FloatingPointError(
                f"Training diverged in epoch {epoch + 1}: non-finite weights ({len(bad)} variable(s), e.g. "
                f"{', '.join(bad[:3])}) although the loss stayed finite.{where} Check the data for NaN/inf images, or "
                f"lower the learning rate.")

    def on_train_batch_end(self, batch, logs=None):
        bad = {k: v for k, v in (logs or {}).items() if k.endswith("loss") and not _finite(v)}
        if bad:
            where = f" The last good state is kept in {self.backup_dir}." if self.backup_dir else ""
            raise FloatingPointError(
                f"Training diverged at epoch {self._epoch + 1}, step {batch + 1}: non-finite "
                f"{', '.join(f'{k}={v}' for k, v in bad.items())}.{where} Lower the learning rate, or check the "
                f"data for NaN/inf targets outside their masks.")


def _finite(value):
    try:
        return bool(abs(float(value)) < float("inf"))
    except (TypeError, ValueError):
        return True
