"""Pieces every benchmark script shares: random training batches, step timing, table cells. TensorFlow-free (the GPU
benchmark runs where TensorFlow is not installed); each script measures its own library's matmul rate."""

import os
import statistics
import time

TASKS = ("semantic", "instance", "depth")


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def random_batch(batch, height, width, tasks=TASKS, num_classes=19, seed=0):
    """Random images (0..255) and the trainer's target dict for ``tasks``, NHWC numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (batch, height, width, 3)).astype("float32")
    y = {}
    if "semantic" in tasks:
        y["semantic"] = rng.integers(0, num_classes, (batch, height, width)).astype("int32")
    if "instance" in tasks:
        y["instance"] = rng.normal(size=(batch, height, width, 2)).astype("float32")
        y["instance_mask"] = np.ones((batch, height, width, 1), "float32")
    if "depth" in tasks:
        y["depth"] = rng.uniform(size=(batch, height, width, 1)).astype("float32")
        y["depth_mask"] = np.ones((batch, height, width, 1), "float32")
    return x, y


def timed(fn, steps, warmup):
    """Runs ``fn`` ``warmup`` times, then ``steps`` timed times (``fn`` returns once its work is done). Wall and
    process-CPU seconds per call: best, median, every call (``times_s``), the warm-up's total and the load."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    warmup_s = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"best_s": min(walls), "median_s": statistics.median(walls), "cpu_best_s": min(cpus),
            "warmup_s": warmup_s, "times_s": walls, "load": load_average()}


def table_cell(text):
    return str(text).replace("|", "\\|")


def first_line(text, limit=300):
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."
