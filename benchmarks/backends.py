"""Training images/s of one model on every Keras backend and in plain PyTorch, in one run on one machine.

    python benchmarks/backends.py --model kendall_deeplabv3_resnet50 --image_size 128,256 --batch_size 8 --steps 5

Rows (``--rows`` picks some), each measured in its own child process (this script with ``--child ROW``, the
environment set for that row before Python starts, killed after ``--timeout`` seconds):

- ``tf_onednn``: Keras on TensorFlow with oneDNN (``TF_ENABLE_ONEDNN_OPTS=1``), ``tf.function`` without XLA;
- ``tf_eigen``: the same with oneDNN off (``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow's Eigen CPU kernels);
- ``jax``: Keras on JAX, ``jit_compile=True``;
- ``torch``: Keras on PyTorch (eager: Keras' "auto" jit is off on this backend);
- ``pytorch``: the same architecture, losses and optimiser in plain PyTorch (``benchmarks/torch_reference.py``),
  built from the Keras model's config; the row checks that both have the same parameter count;
- ``matmul``: float32 ``N x N`` matrix product with numpy (``--matmul_size``), best of a few, in GFLOP/s: the
  machine reference, measured in the same run so that the figures can be compared across machines and loads.

The Keras rows train ``MultiTaskTrainer`` + ``UncertaintyWeightingLayer`` + ``kendall_sgd`` with
``trainer.train_on_batch`` on one random numpy batch (works on every backend; it returns numpy values, so each
step has finished when it returns): ``--warmup`` steps, then ``--steps`` timed steps. A row's seconds per step is
the median of its timed steps (one disturbed step on a shared machine does not move it); images/s = batch / that.
With ``--rounds R`` every row is measured R times, the rows interleaved (round 1: every row, round 2: every row,
...), so that a change of the machine's load hits all rows alike; the table shows the median over rounds.

A row that fails (an exception, a crash, a timeout) shows its error in the table; the run goes on. ``--json PATH``
writes the rows, every round included.
"""

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from absl import app, flags  # noqa: E402

from common import first_line, random_batch, table_cell, timed  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defined when run as a script only, so that tests can import this module next to other absl scripts."""
    flags.DEFINE_string("model", "kendall_deeplabv3_resnet50", "Registered model (mtl_keras.list_models()).")
    flags.DEFINE_string("model_overrides", "{}", "JSON dict of keyword arguments for the model's entry point, e.g. "
                        "'{\"backbone_width\": 8}' for a tiny model.")
    flags.DEFINE_list("image_size", ["128", "256"], "height,width")
    flags.DEFINE_integer("batch_size", 8, "Batch size.")
    flags.DEFINE_integer("steps", 5, "Timed training steps per row and round.")
    flags.DEFINE_integer("warmup", 2, "Untimed training steps first (tracing, compilation, allocation).")
    flags.DEFINE_integer("rounds", 1, "Measure every row this many times, rows interleaved.")
    flags.DEFINE_list("rows", None, "Rows to measure (default: all): tf_onednn, tf_eigen, jax, torch, pytorch, matmul.")
    flags.DEFINE_integer("timeout", 1800, "Seconds before a row's child process is killed.")
    flags.DEFINE_integer("threads", None, "Intra-op threads for the TensorFlow and PyTorch rows (default: each "
                         "library's own choice). JAX/XLA has no such setting and keeps its default.")
    flags.DEFINE_boolean("torch_channels_last", False, "Plain PyTorch row: channels-last memory format.")
    flags.DEFINE_integer("matmul_size", 2048, "N of the float32 N x N matmul row.")
    flags.DEFINE_string("json", None, "Write the rows (every round) to this JSON file.")
    flags.DEFINE_string("child", None, "Internal: measure this one row in this process and print it as JSON.")


RESULT_PREFIX = "BACKENDS_ROW_RESULT "
CPU_FLAGS_COMMAND = "grep -o -w -E 'avx2|avx512f' /proc/cpuinfo | sort -u"
REFERENCE_ROW = "pytorch"
# name: (label, environment of the child). KERAS_BACKEND and TF_ENABLE_ONEDNN_OPTS are removed from the parent's
# environment first, so that each row gets exactly its own settings.
ROWS = {
    "tf_onednn": ("Keras + TensorFlow, oneDNN on", {"KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": "1"}),
    "tf_eigen": ("Keras + TensorFlow, oneDNN off", {"KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": "0"}),
    "jax": ("Keras + JAX (jit)", {"KERAS_BACKEND": "jax"}),
    "torch": ("Keras + PyTorch", {"KERAS_BACKEND": "torch"}),
    # Keras (on its PyTorch backend: no TensorFlow in the process) only reads the Keras model's config and size.
    "pytorch": ("plain PyTorch", {"KERAS_BACKEND": "torch"}),
    "matmul": ("float32 matmul (numpy)", {}),
}
KERAS_ROWS = ("tf_onednn", "tf_eigen", "jax", "torch")
JIT_COMPILE = {"tf_onednn": False, "tf_eigen": False, "jax": True, "torch": False}


# --------------------------------------------------------------------------------------------------- child rows
def measure_keras(row, model_name, overrides, height, width, batch, steps, warmup, threads):
    import mtl_keras  # before Keras: mtl_keras sets up TensorFlow's environment before TensorFlow loads

    import keras

    from mtl_keras.training import MultiTaskTrainer, kendall_sgd
    from mtl_keras.weighting import UncertaintyWeightingLayer

    info = {"backend": keras.config.backend(), "jit_compile": JIT_COMPILE[row]}
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.util import _pywrap_util_port

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        info["onednn_active"] = bool(_pywrap_util_port.IsMklEnabled())
        info["intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    elif keras.config.backend() == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        info["intra_op_threads"] = torch.get_num_threads()
    model = mtl_keras.build_model(model_name, input_shape=(height, width, 3), **overrides)
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.output.keys()))
    trainer.compile(optimizer=kendall_sgd(total_steps=1000), jit_compile=JIT_COMPILE[row])
    x, y = random_batch(batch, height, width, tuple(model.output.keys()), getattr(model, "num_classes", 19))

    def step():
        return float(trainer.train_on_batch(x, y, return_dict=True)["loss"])  # numpy: the step has finished

    return {**info, "parameters": model.count_params(), **timed(step, steps, warmup)}


def measure_plain_pytorch(model_name, overrides, height, width, batch, steps, warmup, threads, channels_last):
    import gc

    import mtl_keras
    import torch_reference

    keras_model = mtl_keras.build_model(model_name, input_shape=(height, width, 3), **overrides)
    if not hasattr(keras_model, "backbone_depth"):
        raise ValueError(f"{model_name} is not a Kendall DeepLabV3 model: benchmarks/torch_reference.py has no "
                         f"plain-PyTorch version of it.")
    keras_parameters = keras_model.count_params()
    model = torch_reference.KendallDeepLabV3.from_keras_config(keras_model.get_config())
    del keras_model
    gc.collect()
    counts = torch_reference.parameter_counts(model)
    if counts["total"] != keras_parameters:
        raise AssertionError(f"Not the same architecture: {counts['total']:,} parameters in PyTorch, "
                             f"{keras_parameters:,} in Keras.")
    result = torch_reference.time_training(model, height, width, batch, steps, warmup, threads, channels_last)
    return {"parameters": counts["total"], "channels_last": channels_last, "intra_op_threads": result["threads"],
            **{k: result[k] for k in ("times_s", "median_s", "best_s", "warmup_s")}}


def measure_matmul(size, repeats=5):
    """float32 ``size x size`` matmul rate in GFLOP/s (2 N^3 FLOPs), best of ``repeats`` after one warm-up."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return {"matmul_size": size, "gflops": 2 * size ** 3 / min(seconds) / 1e9, "matmul_s": seconds}


def run_child(row, options):
    """Measures ``row`` with the parsed flags ``options`` in this process and prints the result as one JSON line
    (with an ``error`` on failure)."""
    height, width = (int(v) for v in options.image_size)
    result = {"row": row}
    try:
        overrides = json.loads(options.model_overrides)
        size = dict(height=height, width=width, batch=options.batch_size, steps=options.steps, warmup=options.warmup,
                    threads=options.threads)
        if row in KERAS_ROWS:
            result.update(measure_keras(row, options.model, overrides, **size))
        elif row == "pytorch":
            result.update(measure_plain_pytorch(options.model, overrides, channels_last=options.torch_channels_last,
                                                **size))
        elif row == "matmul":
            result.update(measure_matmul(options.matmul_size))
        else:
            raise ValueError(f"Unknown row {row!r}; rows: {', '.join(ROWS)}.")
    except Exception as e:  # noqa: BLE001  (reported in the row, not raised: the table goes on)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    if "median_s" in result:
        result["images_per_s"] = options.batch_size / result["median_s"]
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 1 if "error" in result else 0


# ------------------------------------------------------------------------------------------------------- parent
def row_environment(row, threads=None):
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(ROWS[row][1])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def child_arguments(argv, row):
    """The parent's own arguments without --child/--json/--rows/--rounds, plus ``--child row``."""
    dropped = ("--child", "--json", "--rows", "--rounds")
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in dropped:
            skip_next = "=" not in arg
            continue
        kept.append(arg)
    return kept + ["--child", row]


def measure_row(row, argv, timeout, threads):
    """Runs one row's child process; returns its result dict (with ``error`` when it failed)."""
    command = [sys.executable, os.path.abspath(__file__)] + child_arguments(argv, row)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=row_environment(row, threads), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"row": row, "error": f"timed out after {timeout} s", "wall_s": time.perf_counter() - start}
    result = None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if result is None:
        # Crashed without a result line (killed for memory, a segfault, an import error): the end of stderr says why.
        tail = [s for s in done.stderr.splitlines() if s.strip()]
        why = tail[-1] if tail else f"no output, exit status {done.returncode}"
        result = {"row": row, "error": f"exit status {done.returncode}: {why}"}
    if "error" in result:
        result["error"] = first_line(result["error"])
        result["stderr_tail"] = done.stderr[-4000:]
    result["wall_s"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def summarise(rounds_by_row, batch):
    """One table row per row name: the median over rounds that succeeded, and the errors of the others."""
    summary = {}
    for row, results in rounds_by_row.items():
        ok = [r for r in results if "error" not in r]
        errors = [r["error"] for r in results if "error" in r]
        entry = {"row": row, "label": ROWS[row][0], "rounds": results, "errors": errors}
        if row == "matmul" and ok:
            entry["gflops"] = statistics.median(r["gflops"] for r in ok)
        elif ok:
            entry["median_s"] = statistics.median(r["median_s"] for r in ok)
            entry["images_per_s"] = batch / entry["median_s"]
        summary[row] = entry
    reference = summary.get(REFERENCE_ROW, {}).get("images_per_s")
    for entry in summary.values():
        if reference and "images_per_s" in entry:
            entry["relative_to_plain_pytorch"] = entry["images_per_s"] / reference
    return summary


def cpu_description():
    """CPU flags (the grep of the header, run as is), model name and logical CPU count."""
    try:
        flags_text = subprocess.run(CPU_FLAGS_COMMAND, shell=True, capture_output=True, text=True,
                                    timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        flags_text = []
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_flags": " ".join(flags_text) or "unavailable", "cpu_model": model, "logical_cpus": os.cpu_count()}


def library_versions():
    from importlib import metadata

    versions = {}
    for name in ("tensorflow-cpu", "tensorflow", "keras", "jax", "jaxlib", "torch", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def markdown(summary, command, machine, settings):
    lines = ["# Training speed by backend", "",
             f"Command: `{command}`", "",
             f"CPU flags (`{CPU_FLAGS_COMMAND}`): {machine['cpu_flags']}; {machine['cpu_model']}, "
             f"{machine['logical_cpus']} logical CPUs; load average (1 min) {machine['load_start']:.2f} at the "
             f"start, {machine['load_end']:.2f} at the end.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".", ""]
    matmul = summary.get("matmul")
    if matmul is not None:
        rate = f"{matmul['gflops']:.1f} GFLOP/s" if "gflops" in matmul else f"failed: {matmul['errors'][0]}"
        lines += [f"Machine reference: float32 {settings['matmul_size']}x{settings['matmul_size']} matmul "
                  f"(numpy), best of 5, median over rounds: {rate}.", ""]
    lines += [f"{settings['model']} {settings['height']}x{settings['width']}, batch {settings['batch_size']}, "
              f"{settings['steps']} timed steps after {settings['warmup']} warm-up steps, {settings['rounds']} "
              f"round(s); s/step: median of the timed steps (median over rounds); img/s = batch / s/step.", "",
              "| path | img/s | s/step | relative to plain PyTorch |", "| --- | --- | --- | --- |"]
    for row, entry in summary.items():
        if row == "matmul":
            continue
        if "images_per_s" not in entry:
            error = entry["errors"][0] if entry["errors"] else "no result"
            lines.append(f"| {entry['label']} | failed: {table_cell(error)} | - | - |")
            continue
        relative = entry.get("relative_to_plain_pytorch")
        note = f" ({len(entry['errors'])} round(s) failed: {entry['errors'][0]})" if entry["errors"] else ""
        lines.append(f"| {entry['label']} | {entry['images_per_s']:.2f}{table_cell(note)} | "
                     f"{entry['median_s']:.3f} | {f'{relative:.2f}x' if relative else '-'} |")
    details = [f"- {entry['label']}: {row_details(entry)}" for row, entry in summary.items()
               if row != "matmul" and row_details(entry)]
    if details:
        lines += ["", "Per row (as each child process saw it):", ""] + details
    return "\n".join(lines) + "\n"


def row_details(entry):
    """Settings a row's child reported: threads, oneDNN really active, XLA, memory format, parameter count."""
    result = next((r for r in entry["rounds"] if "error" not in r), None)
    if result is None:
        return ""
    parts = []
    if "onednn_active" in result:
        parts.append(f"oneDNN active: {'yes' if result['onednn_active'] else 'no'}")
    if "jit_compile" in result:
        parts.append(f"jit_compile={result['jit_compile']}")
    if "channels_last" in result:
        parts.append(f"channels_last={result['channels_last']}")
    threads = result.get("intra_op_threads")
    parts.append(f"intra-op threads: {threads if threads is not None else 'library default'}")
    if "parameters" in result:
        parts.append(f"{result['parameters']:,} parameters")
    return "; ".join(parts)


def main(argv):
    if FLAGS.child:
        return run_child(FLAGS.child, FLAGS)
    rows = FLAGS.rows or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"Unknown row(s) {unknown}; rows: {', '.join(ROWS)}.")
    json.loads(FLAGS.model_overrides)  # fail here, not in every child
    height, width = (int(v) for v in FLAGS.image_size)
    parent_args = sys.argv[1:]
    command = "python benchmarks/backends.py " + " ".join(shlex.quote(a) for a in parent_args)
    machine = {**cpu_description(), "versions": library_versions(), "load_start": os.getloadavg()[0]}
    rounds_by_row = {row: [] for row in rows}
    for round_index in range(FLAGS.rounds):
        for row in rows:
            result = measure_row(row, parent_args, FLAGS.timeout, FLAGS.threads)
            result["round"] = round_index
            rounds_by_row[row].append(result)
            shown = result.get("error") or (f"{result['gflops']:.1f} GFLOP/s" if "gflops" in result
                                            else f"{result['images_per_s']:.2f} img/s")
            print(f"round {round_index + 1}/{FLAGS.rounds} {ROWS[row][0]}: {shown}", file=sys.stderr, flush=True)
    machine["load_end"] = os.getloadavg()[0]
    settings = {"model": FLAGS.model, "model_overrides": json.loads(FLAGS.model_overrides), "height": height,
                "width": width, "batch_size": FLAGS.batch_size, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                "rounds": FLAGS.rounds, "threads": FLAGS.threads, "torch_channels_last": FLAGS.torch_channels_last,
                "matmul_size": FLAGS.matmul_size}
    summary = summarise(rounds_by_row, FLAGS.batch_size)
    print(markdown(summary, command, machine, settings), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"command": command, "machine": machine, "settings": settings, "rows": list(summary.values())},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
