"""Training speed, peak memory and MFU of the zoo's models on one accelerator, Keras on JAX with jit (no TensorFlow).

    python benchmarks/gpu.py                                   # both models, 3 sizes, float32 and mixed_bfloat16
    python benchmarks/gpu.py --models mt_unet --sizes 256x512 --precisions mixed_bfloat16 --steps 20 --json g.json

Each row (model x size x precision) runs in its own child process (this script with ``--child``), so that a row
that runs out of memory or fails shows its error in its row, frees its memory, and the run goes on. A row trains
``MultiTaskTrainer`` + ``UncertaintyWeightingLayer`` + ``kendall_sgd`` with ``jit_compile=True`` through
``trainer.train_on_batch`` on one random batch: ``--warmup`` steps (the first compiles), then ``--steps`` timed
steps, each ended by converting the returned loss to a Python float (which waits for the device). Step time: the
median of the timed steps; images/s = batch / step time.

Columns:

- **peak memory**: ``device.memory_stats()["peak_bytes_in_use"]`` of JAX's allocator where the device reports it
  (GPUs, TPUs); elsewhere (JAX's CPU device reports nothing) the child process's maximum resident set size
  (``resource.getrusage``), which also counts Python, the libraries and the compiler. The column says which.
- **train GFLOP/img**: 3x the forward matmul FLOPs per image (``count_flops`` of ``benchmarks/flops.py``:
  convolutions and dense layers from the Keras layers' output shapes, a multiply-add = 2 FLOPs; no TensorFlow needed).
- **MFU** (model FLOPs utilisation) = train FLOPs per image x images/s / the device's peak. The peak: dense
  (non-sparse) tensor-core figures of the data sheet for known GPUs (``PEAK_TFLOPS``, chosen by
  ``jax.devices()[0].device_kind``): bf16 for ``mixed_bfloat16``; for ``float32``, TF32 when JAX's default matmul
  precision lets XLA use TF32 tensor cores for float32 convolutions and matmuls (its default on Ampere and later),
  plain fp32 under ``jax_default_matmul_precision=highest``. ``--peak_tflops`` overrides it. On a CPU the peak is
  the float32 matmul rate measured in the same run ("measured matmul").

TensorFlow is never imported: ``KERAS_BACKEND`` is set to ``jax`` when the environment does not name a backend,
and any other backend is refused.
"""

import json
import os
import shlex
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
    flags.DEFINE_list("models", ["kendall_deeplabv3_resnet101", "mt_unet"], "Registered models.")
    flags.DEFINE_string("model_overrides", "{}", "JSON {model: {keyword: value}} for the models' entry points, e.g. "
                        "'{\"mt_unet\": {\"base_filters\": 32}}'.")
    flags.DEFINE_list("sizes", ["128x256", "256x512", "512x1024"], "Input sizes, HEIGHTxWIDTH.")
    flags.DEFINE_integer("batch_size", 8, "Batch size.")
    flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies.")
    flags.DEFINE_integer("steps", 10, "Timed training steps per row.")
    flags.DEFINE_integer("warmup", 3, "Untimed training steps first (the first one compiles).")
    flags.DEFINE_float("peak_tflops", None, "Device peak in TFLOP/s for the MFU (default: PEAK_TFLOPS by device kind, "
                       "or the measured matmul rate on a CPU).")
    flags.DEFINE_integer("matmul_size", 2048, "N of the float32 N x N matmul that measures a CPU's peak.")
    flags.DEFINE_integer("timeout", 1800, "Seconds before a row's child process is killed.")
    flags.DEFINE_string("json", None, "Write the rows to this JSON file.")
    flags.DEFINE_string("child", None, "Internal: a JSON row specification (or \"probe\") to run in this process.")


RESULT_PREFIX = "GPU_BENCHMARK_RESULT "
# Dense tensor-core / vector peaks from NVIDIA's data sheets, TFLOP/s. The first entry whose name is in the device
# kind wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
FULL_FLOAT32_PRECISIONS = ("highest", "float32")  # jax_default_matmul_precision values that rule out TF32


def use_jax_backend():
    """Sets KERAS_BACKEND=jax unless the environment names a backend; refuses any other (before Keras loads)."""
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise app.UsageError(f"benchmarks/gpu.py measures Keras on JAX only, but KERAS_BACKEND={backend}. Unset "
                             f"it or set KERAS_BACKEND=jax (for TensorFlow, see benchmarks/run_all.py and "
                             f"benchmarks/backends.py).")


# ----------------------------------------------------------------------------------------------------------- FLOPs
def training_flops_per_image(model):
    """Training (forward + backward) FLOPs per image: 3x the forward matmul FLOPs of ``benchmarks/flops.py``."""
    from flops import count_flops

    return count_flops(model)["train_matmul"]


def peak_for(device_kind, precision, matmul_precision):
    """(peak FLOP/s, label) from ``PEAK_TFLOPS`` for a GPU kind and dtype policy; (None, reason) when unknown."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            if "bfloat16" in precision or "float16" in precision:
                kind = "bf16"  # float16's dense tensor-core peak is the same on these GPUs
            elif str(matmul_precision).lower() in FULL_FLOAT32_PRECISIONS:
                kind = "fp32"
            else:
                kind = "tf32"  # XLA's default precision for float32 convolutions and dots on tensor-core GPUs
            return peaks[kind] * 1e12, f"{name} {kind} (data sheet)"
    return None, f"unknown device kind {device_kind!r} (give --peak_tflops)"


# ------------------------------------------------------------------------------------------------------ child rows
def measure_matmul_flops(size, repeats=5):
    """float32 ``size x size`` matmul rate of JAX's default device, FLOP/s (2 N^3 per product), best of
    ``repeats`` after a compile and warm-up call."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def probe_device(matmul_size):
    """The device this run measures; on a CPU also its measured matmul rate (the MFU's peak there)."""
    import jax

    device = jax.devices()[0]
    info = {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "matmul_precision": jax.config.jax_default_matmul_precision}
    if device.platform == "cpu":
        info["matmul_flops"] = measure_matmul_flops(matmul_size)
        info["matmul_size"] = matmul_size
    return info


def peak_memory():
    """(bytes, what was measured): the allocator's peak of device 0 where reported, else the process's max RSS."""
    import resource

    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process max RSS"  # Linux reports KiB, macOS bytes


def measure_row(model_name, height, width, batch, precision="float32", steps=10, warmup=3, overrides=None,
                peak_flops=None, peak_label=None):
    """One row: trains ``model_name`` at ``height x width`` with ``precision`` on JAX (jit) and returns images/s,
    step ms, peak memory, training FLOPs per image and (given ``peak_flops``) the MFU. Needs the JAX backend."""
    import keras

    if keras.config.backend() != "jax":
        raise RuntimeError(f"measure_row needs Keras' JAX backend; this process runs {keras.config.backend()}.")
    import jax

    import mtl_keras
    from mtl_keras.training import MultiTaskTrainer, kendall_sgd
    from mtl_keras.weighting import UncertaintyWeightingLayer

    keras.mixed_precision.set_global_policy(precision)
    model = mtl_keras.build_model(model_name, input_shape=(height, width, 3), **(overrides or {}))
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.output.keys()))
    trainer.compile(optimizer=kendall_sgd(total_steps=1000), jit_compile=True)
    x, y = random_batch(batch, height, width, tuple(model.output.keys()), getattr(model, "num_classes", 19))

    def step():
        return float(trainer.train_on_batch(x, y, return_dict=True)["loss"])  # waits for the device

    timing = timed(step, steps, warmup)
    median_s, step_s, warmup_s = timing["median_s"], timing["times_s"], timing["warmup_s"]
    images_per_s = batch / median_s
    flops = training_flops_per_image(model)
    memory_bytes, memory_source = peak_memory()
    row = {"model": model_name, "height": height, "width": width, "batch": batch, "precision": precision,
           "parameters": model.count_params(), "device_kind": jax.devices()[0].device_kind,
           "images_per_s": images_per_s, "step_ms": 1e3 * median_s, "best_step_ms": 1e3 * min(step_s),
           "times_s": step_s, "warmup_s": warmup_s, "peak_memory_bytes": memory_bytes,
           "peak_memory_source": memory_source, "train_flops_per_image": flops,
           "achieved_flops": flops * images_per_s, "tensorflow_imported": "tensorflow" in sys.modules}
    if peak_flops:
        row.update(peak_flops=peak_flops, peak_label=peak_label, mfu=flops * images_per_s / peak_flops)
    return row


def run_child(spec_text, matmul_size):
    """Runs the probe or one row in this process; prints its result as one JSON line (``error`` on failure)."""
    result = {}
    try:
        if spec_text == "probe":
            result = probe_device(matmul_size)
        else:
            spec = json.loads(spec_text)
            result = dict(spec)
            result.update(measure_row(**spec))
    except Exception as e:  # noqa: BLE001  (reported in its row; the run goes on)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 1 if "error" in result else 0


# ---------------------------------------------------------------------------------------------------------- parent
def run_in_child(child_spec, timeout, matmul_size):
    """This script with ``--child child_spec`` in a fresh process; its result dict (``error`` when it failed).
    The environment is this process's, with KERAS_BACKEND=jax (``use_jax_backend``)."""
    command = [sys.executable, os.path.abspath(__file__), f"--child={child_spec}", f"--matmul_size={matmul_size}"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall_s": time.perf_counter() - start}
    result = None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if result is None:
        # No result line: killed (host memory), crashed, or failed before measuring; stderr's end says why.
        tail = [s for s in done.stderr.splitlines() if s.strip()]
        result = {"error": f"exit status {done.returncode}: {tail[-1] if tail else 'no output'}"}
    if "error" in result:
        # XLA's out-of-memory message starts "RESOURCE_EXHAUSTED: Out of memory ..."; its first line is enough.
        result["error"] = first_line(result["error"])
        result["stderr_tail"] = done.stderr[-4000:]
    result["wall_s"] = time.perf_counter() - start
    return result


def parse_size(text):
    height, width = text.lower().split("x")
    return int(height), int(width)


def format_bytes(value):
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 30 else f"{value / 2 ** 20:.0f} MiB"


def markdown(rows, command, device):
    lines = ["# Training speed on one device (Keras + JAX, jit)", "", f"Command: `{command}`", ""]
    if "error" in device:
        lines += [f"Device: probe failed: {device['error']}", ""]
    else:
        lines += [f"Device: {device['device_kind']} ({device['platform']}, {device['device_count']} device(s)); "
                  f"JAX {device['jax_version']}, default matmul precision {device['matmul_precision']}.", ""]
        if "matmul_flops" in device:
            lines += [f"Peak for the MFU: measured matmul, float32 {device['matmul_size']}x{device['matmul_size']}"
                      f" (jax.jit), best of 5: {device['matmul_flops'] / 1e12:.3f} TFLOP/s.", ""]
    lines += ["Step: median of the timed steps; img/s = batch / step; train FLOPs = 3x forward matmul FLOPs "
              "(multiply-add = 2); MFU = train FLOPs/img x img/s / peak.", "",
              "| model | input | batch | precision | img/s | step ms | peak memory | train GFLOP/img | MFU | peak |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = f"| {r['model_name']} | {r['height']}x{r['width']} | {r['batch']} | {r['precision']} |"
        if "error" in r:
            lines.append(f"{head} failed: {table_cell(r['error'])} | - | - | - | - | - |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        peak = (f"{r['peak_flops'] / 1e12:.3g} TFLOP/s, {r['peak_label']}" if r.get("peak_flops")
                else r.get("peak_label", "unknown"))
        lines.append(f"{head} {r['images_per_s']:.2f} | {r['step_ms']:.1f} | "
                     f"{format_bytes(r['peak_memory_bytes'])} ({r['peak_memory_source']}) | "
                     f"{r['train_flops_per_image'] / 1e9:.2f} | {mfu} | {table_cell(peak)} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    use_jax_backend()
    if FLAGS.child:
        return run_child(FLAGS.child, FLAGS.matmul_size)
    overrides = json.loads(FLAGS.model_overrides)
    sizes = [parse_size(s) for s in FLAGS.sizes]
    command = "python benchmarks/gpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # The probe runs in a child too: the parent never initialises JAX, so it holds none of the device's memory.
    device = run_in_child("probe", FLAGS.timeout, FLAGS.matmul_size)
    print(f"device: {device.get('device_kind', device.get('error'))}", file=sys.stderr, flush=True)
    rows = []
    for model_name in FLAGS.models:
        for height, width in sizes:
            for precision in FLAGS.precisions:
                spec = {"model_name": model_name, "height": height, "width": width, "batch": FLAGS.batch_size,
                        "precision": precision, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                        "overrides": overrides.get(model_name, {})}
                if FLAGS.peak_tflops:
                    spec.update(peak_flops=FLAGS.peak_tflops * 1e12, peak_label="given (--peak_tflops)")
                elif "matmul_flops" in device:
                    spec.update(peak_flops=device["matmul_flops"], peak_label="measured matmul")
                elif "device_kind" in device:
                    peak, label = peak_for(device["device_kind"], precision, device["matmul_precision"])
                    spec.update(peak_flops=peak, peak_label=label)
                row = {**spec, **run_in_child(json.dumps(spec), FLAGS.timeout, FLAGS.matmul_size)}
                rows.append(row)
                shown = row.get("error") or f"{row['images_per_s']:.2f} img/s"
                print(f"{model_name} {height}x{width} {precision}: {shown}", file=sys.stderr, flush=True)
    print(markdown(rows, command, device), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"command": command, "device": device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
