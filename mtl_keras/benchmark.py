"""The comparison table: every weighting x architecture of a protocol, over seeds, against single-task baselines.

A *protocol* (``benchmarks/protocols/NAME.json``) fixes the data, the tasks and their metrics with their direction,
the training settings, the architectures, the weightings, the seeds and the single-task baseline. Its *grid* is a list
of :class:`Cell` s: one multi-task run per (architecture, weighting, seed) and one single-task run per (task, seed) of
the baseline architecture. Each cell is a run folder of :mod:`mtl_keras.experiment` under ``ROOT/cells/``: a finished
cell (its ``metrics.json``) is read, never trained again; an interrupted one resumes from its backup; the table is
always rebuilt from the folders, so shards of the grid run anywhere (``shard(cells, i, n)``) and one call of
:func:`build_table` merges them.

Delta_m is LibMTL's ``count_improvement`` (Maninis et al. 2019): ``100 / T * sum_t mean_{m in t} s_m (N_m - B_m) /
B_m`` with ``s_m = +1`` where higher is better and ``-1`` where lower is better, so a POSITIVE Delta_m is better than
the single-task baselines (the Nash-MTL and FAMO papers print the opposite sign).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np

from mtl_keras import checkpointing, experiment
from mtl_keras.atomic_files import atomic_path, write_json_atomically, write_text_atomically
from mtl_keras.config import WEIGHTING_NAMES, TrainConfig, read_json
from mtl_keras.registry import is_model
from mtl_keras.tasks import TASKS, validate_tasks

log = logging.getLogger("mtl_keras")

PROTOCOL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "protocols")
PROTOCOL_KEYS = ("name", "description", "source", "tasks", "metric_labels", "training", "architectures", "weightings",
                 "baseline", "seeds", "notes")
DIRECTIONS = ("higher", "lower")
# Set by the cell, not by the protocol's "training".
CELL_FIELDS = ("model", "model_overrides", "weighting", "weighting_options", "seed", "output_dir", "tasks")
REFERENCE_WEIGHTING = "equal"  # the cost columns are relative to it; always trained
CELL_COST_FILE = "cost.json"  # the training cost of a cell: step times and peak memory
CELL_FILE = "cell.json"  # what a cell folder is: protocol, cell, planned config


# ------------------------------------------------------------------------------------------------------------ Protocol

@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    source: str
    tasks: dict  # {task: {metric: "higher" | "lower"}}, in the order of the table
    metric_labels: dict
    training: dict  # TrainConfig fields shared by every cell
    architectures: dict  # {name: {"model": ..., "model_overrides": {...}}}
    weightings: dict  # {name: TrainConfig overrides, e.g. {"weighting_options": {"c": 0.4}}}
    baseline: dict  # {"architecture": ..., "weighting": ...}
    seeds: tuple
    notes: tuple
    path: str = ""

    @property
    def task_names(self):
        return validate_tasks(list(self.tasks))

    def label(self, metric):
        return self.metric_labels.get(metric, metric)


def protocol_names():
    return sorted(os.path.splitext(n)[0] for n in os.listdir(PROTOCOL_DIR) if n.endswith(".json"))


def load_protocol(name_or_path):
    """The protocol of ``benchmarks/protocols/NAME.json`` or of a JSON file; any problem is a ValueError naming the
    file and what was expected."""
    path = name_or_path
    if not (os.path.isfile(path) or path.endswith(".json")):
        path = os.path.join(PROTOCOL_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            raise ValueError(f"--protocol {name_or_path!r}: no such protocol; expected a JSON file or one of "
                             f"{', '.join(protocol_names())} (benchmarks/protocols/).")
    if not os.path.isfile(path):
        raise ValueError(f"--protocol {path}: no such file.")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with the keys {', '.join(PROTOCOL_KEYS)}.")
    missing = [k for k in PROTOCOL_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; a protocol has {', '.join(PROTOCOL_KEYS)}.")
    protocol = Protocol(**{k: data[k] for k in PROTOCOL_KEYS if k not in ("seeds", "notes")},
                        seeds=tuple(int(s) for s in data["seeds"]), notes=tuple(data["notes"]), path=path)
    check_protocol(protocol)
    return protocol


def check_protocol(protocol):
    """Raises a ValueError naming the protocol file at the first inconsistent setting."""
    where = protocol.path or protocol.name

    def fail(message):
        raise ValueError(f"{where}: {message}")

    if not isinstance(protocol.tasks, dict) or not protocol.tasks:
        fail("'tasks' must map each task to {metric: 'higher' | 'lower'}.")
    for task, metrics in protocol.tasks.items():
        if task not in TASKS:
            fail(f"unknown task {task!r}; valid: {', '.join(TASKS)}.")
        if not isinstance(metrics, dict) or not metrics:
            fail(f"task {task!r} needs at least one metric with its direction.")
        for metric, direction in metrics.items():
            if metric not in TASKS[task].metrics:
                fail(f"task {task!r} has no metric {metric!r}; valid: {', '.join(TASKS[task].metrics)}.")
            if direction not in DIRECTIONS:
                fail(f"metric {metric!r}: direction must be 'higher' or 'lower', got {direction!r}.")
    misplaced = [k for k in protocol.training if k in CELL_FIELDS]
    if misplaced:
        fail(f"'training' sets {misplaced}, which each cell sets (architectures, weightings, seeds).")
    if not protocol.architectures or not protocol.weightings or not protocol.seeds:
        fail("'architectures', 'weightings' and 'seeds' must each name at least one.")
    for name, arch in protocol.architectures.items():
        if not isinstance(arch, dict) or not is_model(arch.get("model", "")):
            fail(f"architecture {name!r}: 'model' must be a registered model (mtl_keras.list_models()).")
    for name in protocol.weightings:
        if name not in WEIGHTING_NAMES:
            fail(f"unknown weighting {name!r}; valid: {', '.join(WEIGHTING_NAMES)}.")
    if protocol.baseline.get("architecture") not in protocol.architectures:
        fail(f"baseline architecture {protocol.baseline.get('architecture')!r} is not one of 'architectures'.")
    if protocol.baseline.get("weighting", REFERENCE_WEIGHTING) not in WEIGHTING_NAMES:
        fail(f"baseline weighting {protocol.baseline.get('weighting')!r} is not a weighting.")
    try:
        for cell in grid(protocol):
            cell_config(protocol, cell, "runs")
    except (TypeError, ValueError) as e:
        fail(f"a cell's training settings are invalid: {e}")


# ---------------------------------------------------------------------------------------------------------------- Grid

@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    """One run of the grid: a multi-task cell (``task`` empty) or the single-task baseline of ``task``."""

    architecture: str
    weighting: str
    seed: int
    task: str = ""

    @property
    def is_baseline(self):
        return bool(self.task)

    @property
    def name(self):
        if self.is_baseline:
            return f"single_{self.task}__{self.architecture}__{self.weighting}__seed{self.seed}"
        return f"{self.architecture}__{self.weighting}__seed{self.seed}"


def grid(protocol, weightings=None, architectures=None, seeds=None):
    """Every cell of ``protocol`` (or of the named subset), in a fixed order: the single-task baselines first, then
    architecture by architecture, weighting by weighting, seed by seed. The reference weighting (EW) is always in.
    ``seeds``: a number (the protocol's first seeds, continued 0, 1, ... past its list) or a list."""
    weightings = list(protocol.weightings) if not weightings else list(weightings)
    architectures = list(protocol.architectures) if not architectures else list(architectures)
    for name in weightings:
        if name not in protocol.weightings:
            raise ValueError(f"--weightings: {name!r} is not in protocol {protocol.name!r} "
                             f"({', '.join(protocol.weightings)}).")
    for name in architectures:
        if name not in protocol.architectures:
            raise ValueError(f"--architectures: {name!r} is not in protocol {protocol.name!r} "
                             f"({', '.join(protocol.architectures)}).")
    if REFERENCE_WEIGHTING not in weightings and REFERENCE_WEIGHTING in protocol.weightings:
        weightings.insert(0, REFERENCE_WEIGHTING)
    seeds = select_seeds(protocol, seeds)
    baseline = protocol.baseline
    cells = [Cell(baseline["architecture"], baseline.get("weighting", REFERENCE_WEIGHTING), seed, task)
             for task in protocol.task_names for seed in seeds]
    cells += [Cell(a, w, seed) for a in architectures for w in weightings for seed in seeds]
    return cells


def select_seeds(protocol, seeds):
    if seeds is None:
        return list(protocol.seeds)
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}.")
        chosen = list(protocol.seeds[:seeds])
        extra = (s for s in range(10 ** 6) if s not in chosen)
        return chosen + [next(extra) for _ in range(seeds - len(chosen))]
    return [int(s) for s in seeds]


def parse_shard(text):
    """``"I/N"`` -> (I, N), 0 <= I < N (0-based, as SLURM_ARRAY_TASK_ID from 0 and JOB_COMPLETION_INDEX)."""
    try:
        index, count = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers (e.g. 0/4), got {text!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: expected 0 <= I < N.")
    return index, count


def shard(cells, index, count):
    """The cells of shard ``index`` of ``count``: every count-th cell, so that each shard mixes cheap and costly."""
    return list(cells[index::count])


def cell_config(protocol, cell, root):
    """The TrainConfig of ``cell`` under the grid folder ``root``."""
    arch = protocol.architectures[cell.architecture]
    settings = dict(protocol.training)
    settings.update(protocol.weightings.get(cell.weighting, {}))
    settings.update(model=arch["model"], model_overrides=dict(arch.get("model_overrides", {})),
                    weighting=cell.weighting, seed=int(cell.seed),
                    tasks=(cell.task,) if cell.is_baseline else protocol.task_names,
                    output_dir=os.path.join(root, "cells", cell.name))
    settings.setdefault("export", False)
    settings.setdefault("num_sample_images", 0)
    return TrainConfig.from_dict(settings)


# ---------------------------------------------------------------------------------------------------------- Run cells

def cell_state(config):
    """``"done"`` (metrics.json), ``"partial"`` (backups to resume) or ``"new"``; a cell folder made with other
    settings is a ValueError naming it, so that a changed protocol never mixes with (or touches) earlier runs."""
    out = config.output_dir
    saved_path = os.path.join(out, "config.json")
    if os.path.isfile(saved_path):
        saved = read_json(saved_path)
        differing = config.differences(saved, ignore=experiment.RESUME_MAY_CHANGE)
        if differing:
            raise ValueError(f"{out} holds a run made with other settings ({', '.join(differing)}): the protocol "
                             f"changed since. Use another --output_dir, or remove that folder to rerun the cell.")
    if os.path.isfile(os.path.join(out, "metrics.json")) and os.path.isfile(os.path.join(out, CELL_COST_FILE)):
        return "done"
    if checkpointing.read_state(os.path.join(out, "backup")).get("backups"):
        return "partial"
    return "new"


class StepTimer(keras.callbacks.Callback):
    """Records the seconds between consecutive training steps, the first ``skip`` of the run left out (tracing) and
    the epoch-end work (backups) between epochs not counted."""

    def __init__(self, skip=2):
        super().__init__()
        self.skip = skip
        self.seconds, self._last, self._seen = [], None, 0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None and self._seen >= self.skip:
            self.seconds.append(now - self._last)
        self._last, self._seen = now, self._seen + 1

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None


def peak_memory():
    """``(bytes, kind)``: the accelerator's peak allocation where the backend reports one, else the process's peak
    resident set (``ru_maxrss``; includes the framework's own memory)."""
    backend = keras.config.backend()
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform != "cpu":
                return int(device.memory_stats()["peak_bytes_in_use"]), f"{device.platform} peak"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated()), "cuda peak"
        else:
            import tensorflow as tf

            if tf.config.list_logical_devices("GPU"):
                return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]), "gpu peak"
    except Exception as e:  # noqa: BLE001 - a backend without memory statistics: the process peak instead
        log.warning("No accelerator memory statistics (%s); reporting the process's peak resident set.", e)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def run_cell(config):
    """Trains (or resumes) one cell in this process; writes ``cost.json`` after training and the run's
    ``metrics.json`` after evaluation (the cell is done when both are there). Returns the run's results."""
    keras.utils.clear_session()  # cells in one process: each starts from a fresh graph and name scope
    with experiment.output_lock(config):  # two processes never train the same cell at once
        run = experiment.prepare(config)
        experiment.build(run)
        experiment.start(run)
        timer = StepTimer()
        experiment.fit(run, callbacks=[timer])
        memory, kind = peak_memory()
        cost = {"median_step_seconds": float(np.median(timer.seconds)) if timer.seconds else None,
                "mean_step_seconds": float(np.mean(timer.seconds)) if timer.seconds else None,
                "steps_timed": len(timer.seconds), "peak_memory_bytes": memory, "memory_kind": kind,
                "backend": keras.config.backend(), "resumed_from_epoch": int(run.initial_epoch)}
        write_json_atomically(os.path.join(config.output_dir, CELL_COST_FILE), cost, indent=2, sort_keys=True)
        return experiment.finish(run)


def prepare_cell_folder(protocol, cell, config):
    os.makedirs(config.output_dir, exist_ok=True)
    write_json_atomically(os.path.join(config.output_dir, CELL_FILE),
                          {"protocol": protocol.name, "cell": dataclasses.asdict(cell),
                           "config": json.loads(config.to_json())}, indent=2, sort_keys=True)


def cell_command(folder):
    """The child process that runs the cell of ``folder`` (its ``cell.json``)."""
    return [sys.executable, "-m", "mtl_keras.benchmark", "--cell", folder]


def run_grid(protocol, cells, root, jobs=1, on_event=print):
    """Runs every cell of ``cells`` that is not done: ``jobs == 0`` in this process, else in up to ``jobs`` child
    processes at once (on a CPU each pinned to its share of the cores; set CUDA_VISIBLE_DEVICES per shard on GPUs).
    A cell that fails is reported and left to resume; the others go on. Returns the names of the failed cells."""
    configs = {cell: cell_config(protocol, cell, root) for cell in cells}
    states = {cell: cell_state(config) for cell, config in configs.items()}  # refuses a changed protocol up front
    todo = [cell for cell in cells if states[cell] != "done"]
    if todo:  # a generated dataset (synthetic) is made here once, not by several cells at the same time
        experiment.resolve_data_dir(configs[todo[0]])
    on_event(f"{protocol.name}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run "
             f"({sum(states[c] == 'partial' for c in todo)} resuming) in {root}")
    failed = []
    if jobs == 0:
        for number, cell in enumerate(todo, 1):
            started = time.time()
            prepare_cell_folder(protocol, cell, configs[cell])
            try:
                run_cell(configs[cell])
                on_event(f"[{number}/{len(todo)}] {cell.name}: done in {time.time() - started:.0f} s")
            except Exception as e:  # noqa: BLE001 - one failed cell must not stop the grid
                failed.append(cell.name)
                on_event(f"[{number}/{len(todo)}] {cell.name}: FAILED ({type(e).__name__}: {e})")
        return failed
    return _run_children(protocol, todo, configs, jobs, on_event)


def _core_sets(jobs):
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < jobs:
        return [None] * jobs
    share = len(cores) // jobs
    return [set(cores[i * share:(i + 1) * share]) for i in range(jobs)]


@contextlib.contextmanager
def _passing_signals_on(running, on_event):
    """SIGTERM / SIGINT to the grid (a scheduler's preemption, Ctrl-C): the running cells get SIGTERM (each finishes
    its step, backs up and exits 75), no cell starts, and the grid exits 75 once they are done. Yields the list of
    signals received. (A cell also reached by the scheduler itself takes a second SIGTERM as the same request.)"""
    received = []

    def on_signal(number, frame):
        if not received:
            on_event(f"{signal.Signals(number).name}: the {len(running)} running cell(s) back up and stop; no cell "
                     f"starts; exiting with status {checkpointing.PREEMPTED_EXIT_CODE} (run the same command again "
                     f"to resume)")
        received.append(number)
        for process in list(running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _run_children(protocol, todo, configs, jobs, on_event):
    core_sets = _core_sets(jobs)
    free = list(range(jobs))
    running, failed, number = {}, [], 0
    queue = list(todo)
    with _passing_signals_on(running, on_event) as received:
        while (queue and not received) or running:
            while queue and free and not received:
                cell, slot = queue.pop(0), free.pop(0)
                number += 1
                prepare_cell_folder(protocol, cell, configs[cell])
                folder = configs[cell].output_dir
                cores = core_sets[slot]
                with open(os.path.join(folder, "train.log"), "a") as log_file:
                    process = subprocess.Popen(
                        cell_command(folder), stdout=log_file, stderr=subprocess.STDOUT,
                        preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None)
                running[process] = (cell, slot, time.time(), number)
            time.sleep(0.5)
            for process in [p for p in running if p.poll() is not None]:
                cell, slot, started, num = running.pop(process)
                free.append(slot)
                where = os.path.join(configs[cell].output_dir, "train.log")
                if process.returncode == 0:
                    on_event(f"[{num}/{len(todo)}] {cell.name}: done in {time.time() - started:.0f} s")
                elif received and process.returncode in (checkpointing.PREEMPTED_EXIT_CODE, -signal.SIGTERM):
                    on_event(f"[{num}/{len(todo)}] {cell.name}: backed up and stopped (resumes next time)")
                else:
                    failed.append(cell.name)
                    on_event(f"[{num}/{len(todo)}] {cell.name}: FAILED with exit status {process.returncode}: "
                             f"{_last_line(where)} (log: {where})")
    if received:
        raise checkpointing.Preempted(f"benchmark preempted ({signal.Signals(received[0]).name}): the cells back "
                                      f"up and stop; run the same command again to resume")
    return failed


def _last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1][:300] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def cell_main(argv=None):
    """``python -m mtl_keras.benchmark --cell FOLDER``: runs the cell described by ``FOLDER/cell.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--cell":
        raise SystemExit("usage: python -m mtl_keras.benchmark --cell FOLDER")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    description = read_json(os.path.join(argv[1], CELL_FILE))
    run_cell(TrainConfig.from_dict(description["config"]))


# --------------------------------------------------------------------------------------------------------- The table

def delta_m(metrics, baseline, directions):
    """Delta_m in percent (module docstring; LibMTL's ``count_improvement``): ``directions`` is ``{task: {metric:
    "higher" | "lower"}}``; ``metrics`` and ``baseline`` map metric names to values. Positive = better than the
    baseline. NaN when a value is missing or not finite; a zero baseline is a ValueError."""
    per_task = []
    for task, metric_directions in directions.items():
        changes = []
        for metric, direction in metric_directions.items():
            new, base = metrics.get(metric), baseline.get(metric)
            if new is None or base is None or not (math.isfinite(new) and math.isfinite(base)):
                return math.nan
            if base == 0:
                raise ValueError(f"Delta_m: the baseline of {metric!r} is 0 (relative change undefined).")
            sign = 1.0 if direction == "higher" else -1.0
            changes.append(sign * (new - base) / base)
        per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task)


def mean_std(values):
    """(mean, sample standard deviation with ddof=1; 0 for one value) of the finite ``values``; (nan, nan) if none."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def read_cell(folder):
    """``{"metrics": {...}, "cost": {...}}`` of a finished cell folder; None when it is not finished."""
    metrics_path, cost_path = os.path.join(folder, "metrics.json"), os.path.join(folder, CELL_COST_FILE)
    if not (os.path.isfile(metrics_path) and os.path.isfile(cost_path)):
        return None
    return {"metrics": read_json(metrics_path).get("val", {}), "cost": read_json(cost_path)}


def collect(protocol, root):
    """``{Cell: read_cell(...)}`` of every finished cell folder under ``root/cells`` made by ``protocol``."""
    cells_dir = os.path.join(root, "cells")
    found = {}
    for name in sorted(os.listdir(cells_dir)) if os.path.isdir(cells_dir) else []:
        folder = os.path.join(cells_dir, name)
        description_path = os.path.join(folder, CELL_FILE)
        if not os.path.isfile(description_path):
            continue
        description = read_json(description_path)
        if description.get("protocol") != protocol.name:
            continue
        result = read_cell(folder)
        if result is not None:
            found[Cell(**description["cell"])] = result
    return found


def build_rows(protocol, results):
    """The table's rows from ``{Cell: read_cell(...)}``: first the single-task baselines ("STL"), then each
    (architecture, weighting) in protocol order. Each row: per metric (mean, std) over seeds, Delta_m (mean, std)
    over seeds against the baselines' mean over seeds, and step time and peak memory relative to EW (the mean over
    seeds of the ratio to the EW cell of the same architecture and seed)."""
    directions = protocol.tasks
    metric_names = [m for task in directions.values() for m in task]
    baseline_runs = {}  # seed -> {metric: value} of the single-task runs of that seed
    for cell, result in results.items():
        if cell.is_baseline:
            own = {m: result["metrics"].get(m) for m in directions[cell.task]}
            baseline_runs.setdefault(cell.seed, {}).update(own)
    baseline = {m: mean_std([run.get(m) for run in baseline_runs.values()])[0] for m in metric_names}
    rows = []
    if baseline_runs:
        rows.append(_row("STL", protocol.baseline.get("weighting", REFERENCE_WEIGHTING), sorted(baseline_runs),
                         [baseline_runs[s] for s in sorted(baseline_runs)], baseline, directions, costs=None))
    for arch in protocol.architectures:
        for weighting in protocol.weightings:
            cells = sorted(c for c in results if not c.is_baseline and c.architecture == arch
                           and c.weighting == weighting)
            if not cells:
                continue
            reference = {c.seed: results[c]["cost"] for c in results
                         if not c.is_baseline and c.architecture == arch and c.weighting == REFERENCE_WEIGHTING}
            costs = [(results[c]["cost"], reference.get(c.seed)) for c in cells]
            rows.append(_row(arch, weighting, [c.seed for c in cells], [results[c]["metrics"] for c in cells],
                             baseline, directions, costs))
    return rows


def _row(architecture, weighting, seeds, runs, baseline, directions, costs):
    metric_names = [m for task in directions.values() for m in task]
    row = {"architecture": architecture, "weighting": weighting, "seeds": len(seeds),
           "metrics": {m: mean_std([run.get(m) for run in runs]) for m in metric_names},
           "delta_m": mean_std([delta_m(run, baseline, directions) for run in runs])}
    step_ratio, memory_ratio, step_seconds, memory_mb = [], [], [], []
    for cost, reference in costs or []:
        step_seconds.append(cost.get("median_step_seconds"))
        memory_mb.append(cost.get("peak_memory_bytes", 0) / 2 ** 20)
        if reference and reference.get("median_step_seconds") and cost.get("median_step_seconds"):
            step_ratio.append(cost["median_step_seconds"] / reference["median_step_seconds"])
        if reference and reference.get("peak_memory_bytes") and cost.get("peak_memory_bytes"):
            memory_ratio.append(cost["peak_memory_bytes"] / reference["peak_memory_bytes"])
    row.update(step_seconds=mean_std(step_seconds)[0], step_time_vs_ew=mean_std(step_ratio)[0],
               peak_memory_mb=mean_std(memory_mb)[0], peak_memory_vs_ew=mean_std(memory_ratio)[0])
    return row


def _number(value, digits):
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(pair, digits):
    mean, std = pair
    return "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(protocol, rows):
    metric_names = [m for task in protocol.tasks.values() for m in task]
    arrows = {"higher": "↑", "lower": "↓"}
    directions = {m: d for task in protocol.tasks.values() for m, d in task.items()}
    header = (["architecture", "weighting", "seeds"] + [f"{protocol.label(m)} {arrows[directions[m]]}"
                                                       for m in metric_names]
              + ["Δm % ↑", "step time × EW", "peak memory × EW", "s / step", "peak MB"])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = [row["architecture"], row["weighting"], str(row["seeds"])]
        cells += [_pm(row["metrics"][m], 4) for m in metric_names]
        cells += [_pm(row["delta_m"], 2), _number(row["step_time_vs_ew"], 2), _number(row["peak_memory_vs_ew"], 2),
                  _number(row["step_seconds"], 3), _number(row["peak_memory_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(protocol, rows, path):
    metric_names = [m for task in protocol.tasks.values() for m in task]
    header = (["architecture", "weighting", "seeds"] + [f"{m}_{s}" for m in metric_names for s in ("mean", "std")]
              + ["delta_m_mean", "delta_m_std", "step_time_vs_ew", "peak_memory_vs_ew", "step_seconds",
                 "peak_memory_mb"])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = [row["architecture"], row["weighting"], row["seeds"]]
            values += [v for m in metric_names for v in row["metrics"][m]]
            values += [*row["delta_m"], row["step_time_vs_ew"], row["peak_memory_vs_ew"], row["step_seconds"],
                       row["peak_memory_mb"]]
            writer.writerow([v if isinstance(v, str) else _csv_value(v) for v in values])


def _csv_value(value):
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(value)


def plot_delta_m(protocol, rows, path):
    """Delta_m (mean +- std over seeds) against step time relative to EW: one marker per architecture, one colour
    per weighting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["architecture"] != "STL" and math.isfinite(r["delta_m"][0])]
    markers = dict(zip(protocol.architectures, "osD^vP*Xph<>"))
    colours = dict(zip(protocol.weightings, plt.get_cmap("tab20").colors))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        x = row["step_time_vs_ew"] if math.isfinite(row["step_time_vs_ew"]) else 1.0
        ax.errorbar(x, row["delta_m"][0], yerr=row["delta_m"][1], marker=markers.get(row["architecture"], "o"),
                    color=colours.get(row["weighting"], "k"), capsize=3, linestyle="none")
        ax.annotate(f"{row['weighting']}", (x, row["delta_m"][0]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for arch, marker in markers.items():
        ax.plot([], [], marker=marker, color="gray", linestyle="none", label=arch)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("step time relative to EW (same architecture)")
    ax.set_ylabel("Δm % vs single-task (higher is better)")
    ax.set_title(f"protocol {protocol.name}: Δm (mean ± std over seeds) against cost")
    ax.legend(title="architecture", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # ends with .png: savefig picks the format from it
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def build_table(protocol, root, expected=None):
    """Rebuilds ``table.md``, ``table.csv`` and ``delta_m_vs_cost.png`` in ``root`` from every finished cell folder;
    returns (rows, names of the ``expected`` cells that are not finished)."""
    results = collect(protocol, root)
    rows = build_rows(protocol, results)
    missing = [c.name for c in expected or [] if c not in results]
    os.makedirs(root, exist_ok=True)
    text = (f"# Protocol `{protocol.name}`\n\n{protocol.description}\n\n"
            f"Δm: LibMTL's count_improvement against the single-task ({protocol.baseline['architecture']}) "
            f"baselines' mean over seeds, in %, positive = better; mean ± sample std over seeds. Cost: median "
            f"step time and peak memory relative to EW of the same architecture and seed.\n\n"
            + markdown_table(protocol, rows))
    if missing:
        text += f"\n{len(missing)} cell(s) of the grid not finished: {', '.join(missing)}\n"
    write_text_atomically(os.path.join(root, "table.md"), text)
    write_csv(protocol, rows, os.path.join(root, "table.csv"))
    if any(r["architecture"] != "STL" for r in rows):
        plot_delta_m(protocol, rows, os.path.join(root, "delta_m_vs_cost.png"))
    return rows, missing


if __name__ == "__main__":
    cell_main()
