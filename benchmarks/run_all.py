"""Every speed figure of the zoo in one command: a Markdown table per topic, written to docs/results/benchmarks.md.

    python benchmarks/run_all.py                                    # every registered model, 128x256 and 256x512
    python benchmarks/run_all.py --models kendall_deeplabv3_resnet26_slim --sizes 128x256 --steps 3
    python benchmarks/run_all.py --quick --output /tmp/b.md          # a tiny run (the test)

What one run measures (each row is printed as soon as it is measured):

1. **Matmul rate**: ``tf.linalg.matmul`` of float32 ``N x N`` matrices (``--matmul_sizes``), best of
   ``--matmul_repeats`` after a warm-up, at the start and at the end of the run; the best is the machine's
   reference float32 rate ("peak" below).
2. **FLOPs per image** of each model (``count_flops`` of ``benchmarks/flops.py``): forward, multiply-add = 2
   FLOPs, convs and dense layers only (``nominal``: ``2*kh*kw*cin*cout*Hout*Wout`` as everyone counts;
   ``effective``: without the kernel taps that fall on "same" padding, which oneDNN skips - much lower for the
   ASPP's dilation rates 12/24/36 on a 16x32 feature map). Training = 3x forward. One model is cross-checked
   against TensorFlow's graph profiler.
3. **Training** (``MultiTaskTrainer`` + uncertainty weighting + ``kendall_sgd``, random data, one batch reused):
   ``train_on_batch`` steps with and without XLA (``jit_compile``); seconds per step best (median) of ``--steps``
   timed steps after ``--warmup`` steps; images/s from the best step.
4. **Inference**: ``model(x, training=False)`` in a ``tf.function`` with and without XLA, and the exported SavedModel
   (``mtl_keras.export.export_saved_model``, loaded with ``tf.saved_model.load``, ``serving_default`` signature);
   milliseconds per batch, best (median).
5. **Input pipeline** (a short variant of ``benchmarks/input_pipeline.py``) and **instance clustering** (a short
   variant of ``benchmarks/clustering.py``).
6. With ``--profile DIR``: a ``tf.profiler`` trace of two more training steps per row, op time grouped (conv
   forward / input gradient / filter gradient by kind of conv, batch norm, other layers, optimizer, rest).

``--isolate`` measures each model and size in a child process (a child killed for memory costs only its rows);
``--render_json`` rewrites the Markdown of an earlier run's ``--json`` without measuring.

Fraction of peak = FLOPs per image x images/s / matmul FLOP/s (nominal and effective FLOPs). The machine may be
shared: every row records the 1-minute load average, the timings keep the best step (least disturbed), and the
"CPU" fraction divides FLOPs per process-CPU-second by the matmul's FLOPs per process-CPU-second, which depends much
less on other processes (it counts the threads' busy time; spinning threads make it a lower bound).
"""

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import load_average, random_batch, timed  # noqa: E402

TASKS = ("semantic", "instance", "depth")
FRAGMENT_TITLE = "# Speed benchmarks"
QUICK_OVERRIDES = {"backbone_width": 8, "aspp_channels": 16, "decoder_channels": 16}  # --quick: a tiny slim model


# ------------------------------------------------------------------------------------------------------ helpers
def failure(exc):
    """``{"error": "failed: Type: reason"}``; for TensorFlow's graph errors the reason, not the trace location."""
    text = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("File ", "[[", "Detected at node", "Graph execution"))]
    msg = " ".join((reasons[-1] if reasons else " ".join(lines)).split()).replace("|", "/")
    return {"error": f"failed: {type(exc).__name__}: {msg[:160]}"}


def matmul_rate(sizes, repeats):
    """Float32 matmul GFLOP/s per size: best wall time and best process-CPU time of ``repeats`` after a warm-up."""
    import tensorflow as tf

    rows = []
    for n in sizes:
        a = tf.random.normal((n, n), seed=1)
        b = tf.random.normal((n, n), seed=2)
        fn = tf.function(lambda a, b: tf.linalg.matmul(a, b), autograph=False)
        fn(a, b).numpy()
        t = timed(lambda: fn(a, b).numpy(), repeats, 1)
        flops = 2.0 * n ** 3
        rows.append({"n": n, "gflops": flops / t["best_s"] / 1e9, "gflops_median": flops / t["median_s"] / 1e9,
                     "gflops_per_cpu_s": flops / max(t["cpu_best_s"], 1e-9) / 1e9, "load": t["load"]})
    return rows


def use_keras_batchnorm():
    """``--keras_batchnorm`` (for comparison): the zoo's ``BatchNormalization`` runs Keras 3's own batch norm
    (``ops.moments`` + elementwise ops) instead of TensorFlow's fused kernel, as before it existed."""
    from mtl_keras.layers import BatchNormalization

    BatchNormalization.use_fused_kernel = False


# ------------------------------------------------------------------------------------------------- measurements
def measure_training(model, x, y, steps, warmup, jit_compile, profile_dir=""):
    from mtl_keras.training import MultiTaskTrainer, kendall_sgd
    from mtl_keras.weighting import UncertaintyWeightingLayer

    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.output.keys()))
    trainer.compile(optimizer=kendall_sgd(total_steps=1000), jit_compile=jit_compile)
    result = timed(lambda: trainer.train_on_batch(x, y), steps, warmup)
    if profile_dir:
        import tensorflow as tf

        tf.profiler.experimental.start(profile_dir)
        for _ in range(2):
            trainer.train_on_batch(x, y)
        tf.profiler.experimental.stop()
        result["profile"] = op_groups(profile_dir, model)
    del trainer
    return result


def op_groups(trace_dir, model):
    """Op time of a profiler trace (``tf.profiler.experimental``) grouped by kind: conv forward / input gradient /
    filter gradient (ASPP dilated, backbone dilated, other), batch norm, other layer ops, optimizer, rest.

    Sums each op's duration on TensorFlow's executor threads (ops that run concurrently both count)."""
    import glob
    import re

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from mtl_keras.layers import AtrousConv2D

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    dilated = {layer.name for layer in model.layers if isinstance(layer, AtrousConv2D)
               and max(layer.dilation_rate) > 1}
    layer_pattern = re.compile(re.escape(model.name) + r"(?:_\d+)?/([^/]+?)(?:_\d+)?/")
    groups = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "").strip()
                if ":" not in name or "__inference" in name or name.startswith(("Iterator", "ExecutorState")):
                    continue
                op, kind = name.rsplit(":", 1)
                match = layer_pattern.search(op)
                layer = match.group(1) if match else None
                where = ("ASPP dilated" if layer and layer.startswith("aspp_atrous") and layer in dilated else
                         "backbone dilated" if layer in dilated else "other")
                if "Conv2DBackpropFilter" in kind:
                    group = f"conv filter gradient, {where}"
                elif "Conv2DBackpropInput" in kind:
                    group = f"conv input gradient, {where}"
                elif "Conv2D" in kind:
                    group = f"conv forward, {where}"
                elif layer and layer.endswith("_bn"):
                    group = "batch norm (forward + backward)"
                elif layer:
                    group = "other layer ops (ReLU, add, pool, resize, concat; fwd + bwd)"
                elif re.search(r"(?i)sgd|optimizer|AssignSub|AssignAdd", name):
                    group = "optimizer + metric updates"
                else:
                    group = "loss, weighting, gradient sums, rest"
                groups[group] = groups.get(group, 0.0) + event.duration_ps * 1e-12
    total = sum(groups.values()) or 1.0
    return [{"group": g, "seconds": v, "share": v / total} for g, v in sorted(groups.items(), key=lambda kv: -kv[1])]


def measure_inference(model, x, steps, warmup, jit_compile):
    import tensorflow as tf

    fn = tf.function(lambda images: model(images, training=False), jit_compile=jit_compile, autograph=False)
    return timed(lambda: {k: v.numpy() for k, v in fn(x).items()}, steps, warmup)


def measure_savedmodel(model, x, steps, warmup):
    import tensorflow as tf

    from mtl_keras.export import export_saved_model

    folder = tempfile.mkdtemp(prefix="mtl_keras_run_all_")
    try:
        t0 = time.perf_counter()
        export_saved_model(model, os.path.join(folder, "export"))
        export_s = time.perf_counter() - t0
        served = tf.saved_model.load(os.path.join(folder, "export"))
        signature = served.signatures["serving_default"]
        result = timed(lambda: {k: v.numpy() for k, v in signature(images=x).items()}, steps, warmup)
        result["export_s"] = export_s
        del served, signature
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def flop_crosscheck(name, height, width, overrides):
    import mtl_keras
    from flops import count_flops, profiler_flops

    model = mtl_keras.build_model(name, input_shape=(height, width, 3), **overrides)
    ours = count_flops(model)
    prof = profiler_flops(model)
    run = profiler_flops(model, full_kernels=False)

    def convs(p):
        return sum(v for k, v in p["by_op"].items() if k in ("Conv2D", "Conv2DBackpropInput", "MatMul",
                                                             "DepthwiseConv2dNative"))

    return {"model": name, "size": f"{height}x{width}", "count_flops_matmul": ours["matmul"],
            "count_flops_effective": ours["effective"], "count_flops_other": ours["other"],
            "profiler_conv": convs(prof), "profiler_total": prof["total"], "profiler_by_op": prof["by_op"],
            "profiler_conv_as_run": convs(run)}


def pipeline_rows(work_dir, quick, log):
    import input_pipeline  # benchmarks/input_pipeline.py

    if quick:
        raw, prepared, npy, nyu = input_pipeline.make_data(work_dir, 2, log, height=128, width=256, others=False)
        only, batches = ["prepared cache 128x256"], 2
    else:
        raw, prepared, npy, nyu = input_pipeline.make_data(work_dir, 8, log)
        raw_size = os.path.basename(os.path.normpath(raw)).replace("cityscapes_", "")
        only = [f"raw CityScapes PNGs {raw_size} -> 128x256", f"raw CityScapes PNGs {raw_size} -> 128x256 + scale/crop",
                "prepared cache 128x256", "prepared cache 128x256 + scale/crop",
                ".npy release 128x256 (semantic, depth)"]
        batches = 6
    rows = input_pipeline.bench_pipelines(raw, prepared, npy, nyu, batches, log, only=only)
    return [{"what": title, "images_per_s": rate, "load": load_average()} for _, title, rate in rows]


def clustering_rows(data_dir, quick, work_dir):
    import clustering  # benchmarks/clustering.py

    if quick:
        from mtl_keras.data import generate_synthetic_cityscapes

        data_dir = generate_synthetic_cityscapes(os.path.join(work_dir, "clustering_set"), num_train=0, num_val=2,
                                                 height=64, width=128, seed=0)
        argv = ["--data_dir", data_dir, "--num_images", "2", "--size", "64x128", "--large_images", "0",
                "--noofficial", "--methods", "histogram"]
    else:
        argv = ["--num_images", "20", "--large_images", "1", "--noofficial"] + (["--data_dir", data_dir]
                                                                                 if data_dir else [])
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        report = clustering.main(argv)
    rows = []
    for r in report["rows"] + report["large_rows"]:
        rows.append({"method": r["method"], "size": r["size"], "images": r["images"], "ms_median": r["ms_median"],
                     "ms_p90": r["ms_p90"], "cpu_ms_median": r["cpu_ms_median"], "ari_mean": r["ari_mean"],
                     "load": load_average()})
    return rows, "python benchmarks/clustering.py " + " ".join(argv)


def add_fractions(row, peak_gflops, peak_gflops_per_cpu_s):
    """Images/s and fractions of the matmul rate of a measured row (``factor``: 3 for training, 1 for inference)."""
    if "best_s" not in row:
        return row
    factor, batch = row["factor"], row["batch"]
    ips = batch / row["best_s"]
    row.update(images_per_s=ips,
               peak_nominal=factor * row["gflops_nominal"] * ips / peak_gflops,
               peak_effective=factor * row["gflops_effective"] * ips / peak_gflops,
               peak_cpu=factor * row["gflops_nominal"] * batch / max(row["cpu_best_s"], 1e-9) / peak_gflops_per_cpu_s)
    return row


def measure_in_child(args, name, height, width, batch, steps, train_variants, infer_paths, add_row, log, peak,
                     peak_cpu):
    """``--isolate``: one model and size measured by a child process (its memory is returned afterwards, and a
    child killed, e.g. for running out of memory, costs its own rows only: they are reported as failed)."""
    import subprocess

    fd, path = tempfile.mkstemp(suffix=".json", prefix="run_all_child_")
    os.close(fd)
    os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--models", name, "--sizes", f"{height}x{width}",
           "--batch_size", str(batch), "--steps", str(steps), "--warmup", str(args.warmup),
           "--model_overrides", args.model_overrides, "--reference_peak", f"{peak},{peak_cpu}",
           "--skip_pipeline", "--skip_clustering", "--skip_crosscheck", "--output", "", "--json", path]
    for flag in ("skip_xla", "skip_training", "skip_inference", "skip_savedmodel", "keras_batchnorm"):
        if getattr(args, flag):
            cmd.append("--" + flag)
    for flag in ("threads", "precision", "profile"):
        if getattr(args, flag):
            cmd += ["--" + flag, getattr(args, flag)]
    code = subprocess.call(cmd)
    child = {"training": [], "inference": []}
    if os.path.isfile(path):
        with open(path) as f:
            child = json.load(f)
        os.remove(path)
    for row in child["training"]:
        add_row(row, "training")
    for row in child["inference"]:
        add_row(row, "inference")
    if code != 0:
        why = {-9: " (killed: out of memory?)"}.get(code, "")
        error = {"error": f"failed: the measuring process died, exit code {code}{why}", "load": load_average(),
                 "model": name, "size": f"{height}x{width}", "batch": batch, "gflops_nominal": float("nan"),
                 "gflops_effective": float("nan")}
        done = {row.get("xla") for row in child["training"]}
        for xla in [v for v in train_variants if v not in done]:
            add_row(dict(error, xla=xla), "training")
        for p in infer_paths[len(child["inference"]):]:
            add_row(dict(error, path=p), "inference")
        log(f"{name} {height}x{width}: child process exit code {code}")


# ----------------------------------------------------------------------------------------------------- formatting
def fmt(value, digits=2):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_g(value):
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def fmt_time(value, digits=3):
    """A duration to ``digits`` significant digits, in plain notation: 3.41, 0.853, 0.00123, 1234. Fixed decimals
    would print a fast step (a GPU, a tiny model) as 0.00, a measurement lost in the table."""
    if value is None or not math.isfinite(value):
        return "-"
    value = float(f"{value:.{digits}g}")  # rounded first: 99.96 -> 100, not 100.0
    if value == 0:
        return "0"
    return f"{value:.{max(digits - 1 - math.floor(math.log10(abs(value))), 0)}f}"


def pct(value):
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.2g}%"


TRAIN_HEADER = ("| model | input | batch | XLA | fwd GFLOP/img (nominal / effective) | s/step best (median) | "
                "train img/s | % of matmul peak (nominal) | % (effective) | % by CPU time (nominal / effective) | "
                "first steps s | load |")
INFER_HEADER = ("| model | input | batch | path | ms/batch best (median) | img/s | % of matmul peak (nominal) | "
                "% (effective) | % by CPU time (nominal / effective) | load |")


def cpu_pct(r):
    """The CPU-time fraction, nominal / effective."""
    if r.get("peak_cpu") is None:
        return "-"
    effective = r["peak_cpu"] * r["gflops_effective"] / r["gflops_nominal"] if r["gflops_nominal"] else None
    return f"{pct(r['peak_cpu'])} / {pct(effective)}"


def _row(head, r, time_cell, extra_cells=()):
    """A table row: ``head`` cells, then the time, img/s, the three fractions, ``extra_cells`` and the load (an
    error message and dashes for a failed measurement)."""
    if "error" in r:
        cells = [r["error"]] + ["-"] * (4 + len(extra_cells))
    else:
        cells = [time_cell, f"{r['images_per_s']:.2f}", pct(r["peak_nominal"]), pct(r["peak_effective"]), cpu_pct(r),
                 *extra_cells]
    return "| " + " | ".join([*head, *cells, fmt(r.get("load"), 1)]) + " |"


def train_row(r):
    head = [r["model"], r["size"], str(r["batch"]), "yes" if r["xla"] else "no",
            f"{fmt_g(r['gflops_nominal'])} / {fmt_g(r['gflops_effective'])}"]
    if "error" in r:
        return _row(head, r, None, ["-"])
    return _row(head, r, f"{fmt_time(r['best_s'])} ({fmt_time(r['median_s'])})", [f"{r['warmup_s']:.1f}"])


def infer_row(r):
    head = [r["model"], r["size"], str(r["batch"]), r["path"]]
    return _row(head, r, "" if "error" in r else f"{fmt_time(1000 * r['best_s'])} ({fmt_time(1000 * r['median_s'])})")


def separator(header):
    return "|" + "|".join(" --- " for _ in range(header.count("|") - 1)) + "|"


def machine_description():
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    return (f"{cpu}, {os.cpu_count()} CPU core(s); TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"Python {platform.python_version()}; TF_ENABLE_ONEDNN_OPTS={onednn}; "
            f"GPUs: {len(tf.config.list_physical_devices('GPU'))}")


def render(report):
    peak = report["peak_gflops"]
    lines = [FRAGMENT_TITLE, "", f"Generated by `{report['command']}` on {report['date']} "
             f"({report['wall_minutes']:.0f} min).", "", f"Machine: {report['machine']}.", "",
             f"Load average (1 min) {fmt(report['load_start'], 1)} at the start, {fmt(report['load_end'], 1)} at "
             "the end; each row gives its own. Other processes share the cores when the load is above the core "
             "count: the best step is kept, and the CPU-time fraction depends much less on them.", "",
             "## Float32 matmul rate (the reference \"peak\")", "",
             "| when | N | GFLOP/s best | GFLOP/s median | GFLOP per CPU-second | load |",
             "| --- | --- | --- | --- | --- | --- |"]
    for when, rows in report["matmul"].items():
        for m in rows:
            lines.append(f"| {when} | {m['n']} | {m['gflops']:.1f} | {m['gflops_median']:.1f} | "
                         f"{m['gflops_per_cpu_s']:.1f} | {m['load']:.1f} |")
    lines += ["", f"Peak used below: **{peak:.1f} GFLOP/s** (best of the run), "
              f"{report['peak_gflops_per_cpu_s']:.1f} GFLOP per CPU-second.", "",
              "## FLOP convention", "",
              "Forward FLOPs per image from the Keras layers (`count_flops` of `benchmarks/flops.py`): a multiply-add "
              "is 2 "
              "FLOPs; convolutions (dilated ones included) and dense layers count `2*kh*kw*cin*cout*Hout*Wout` "
              "(*nominal*); *effective* leaves out the kernel taps that fall on \"same\" padding (oneDNN skips "
              "them; the ASPP's rates 12/24/36 on a 16x32 map make most taps padding). Batch norm, activations, "
              "adds and resizes are counted separately (`other`, under 1% here) and left out. Training = 3x the "
              "forward FLOPs (forward, gradient w.r.t. inputs, gradient w.r.t. weights). "
              "Fraction of peak = FLOPs/image x images/s / matmul FLOP/s; \"by CPU time\" = FLOPs per process "
              "CPU-second / the matmul's FLOPs per CPU-second.", ""]
    if report.get("crosscheck"):
        c = report["crosscheck"]
        if "error" in c:
            lines += [f"Cross-check with TensorFlow's profiler: {c['error']}", ""]
        else:
            lines += [f"Cross-check, {c['model']} at {c['size']} (forward, per image): `count_flops` "
                      f"{c['count_flops_matmul'] / 1e9:.4f} GFLOP in convs/dense layers, TensorFlow's profiler "
                      f"(`tf.compat.v1.profiler`, `float_ops`, frozen graph) {c['profiler_conv'] / 1e9:.4f} GFLOP in "
                      f"its conv ops ({'identical' if c['count_flops_matmul'] == c['profiler_conv'] else 'differs'}"
                      f"); profiler total {c['profiler_total'] / 1e9:.4f} GFLOP with the elementwise ops (ours: "
                      f"{c['count_flops_other'] / 1e9:.4f} GFLOP other). The graph as it runs (`AtrousConv2D` "
                      f"drops the kernel taps that only see padding at static sizes) has "
                      f"{c['profiler_conv_as_run'] / 1e9:.4f} GFLOP in convs by the profiler's count; the taps that "
                      f"touch the image (*effective*): {c['count_flops_effective'] / 1e9:.4f} GFLOP.", ""]
    lines += ["## Training", ""]
    if report.get("keras_batchnorm"):
        lines += ["With `--keras_batchnorm`: batch norm by Keras 3's own ops instead of TensorFlow's fused kernel "
                  "(for comparison; see benchmarks/README.md).", ""]
    if report.get("threads") or report.get("precision"):
        lines += [f"Threads (intra,inter): {report.get('threads') or 'default'}; dtype policy: "
                  f"{report.get('precision') or 'float32'}.", ""]
    lines += [TRAIN_HEADER, separator(TRAIN_HEADER)]
    lines += [train_row(r) for r in report["training"]]
    profiled = [r for r in report["training"] if r.get("profile")]
    if profiled:
        lines += ["", "### Where a training step's time goes (`--profile`)", ""]
        for r in profiled:
            lines += [f"{r['model']}, {r['size']}, batch {r['batch']} (op time on TensorFlow's executor threads, "
                      "two steps):", "", "| op group | seconds | share |", "| --- | ---: | ---: |"]
            lines += [f"| {g['group']} | {g['seconds']:.3f} | {100 * g['share']:.1f}% |" for g in r["profile"]]
            lines.append("")
    lines += ["", "## Inference", "", INFER_HEADER, separator(INFER_HEADER)]
    lines += [infer_row(r) for r in report["inference"]]
    if report.get("pipeline") is not None:
        lines += ["", "## Input pipeline", ""]
        if isinstance(report["pipeline"], dict):
            lines.append(report["pipeline"]["error"])
        else:
            lines += ["| pipeline (batches of 8, shuffle + flips) | images/s | load |", "| --- | --- | --- |"]
            lines += [f"| {p['what']} | {p['images_per_s']:.1f} | {p['load']:.1f} |" for p in report["pipeline"]]
            lines += ["", "A short variant of `benchmarks/input_pipeline.py` (its full table: "
                      "`benchmarks/input_pipeline.md`)."]
    if report.get("clustering") is not None:
        lines += ["", "## Instance clustering", ""]
        if isinstance(report["clustering"], dict):
            lines.append(report["clustering"]["error"])
        else:
            lines += ["| method | image | images | wall ms / image (median) | p90 | CPU ms (median) | ARI/img | load |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {c['method']} | {c['size']} | {c['images']} | {c['ms_median']:.1f} | {c['ms_p90']:.1f} | "
                      f"{c['cpu_ms_median']:.1f} | {fmt(c['ari_mean'], 3)} | {c['load']:.1f} |"
                      for c in report["clustering"]]
            lines += ["", f"`{report['clustering_command']}` (realistic votes on the synthetic validation split)."]
    if report.get("notes"):
        lines += ["", report["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated registered names (default: all)")
    parser.add_argument("--sizes", default=None, help="comma-separated HxW (default 128x256,256x512)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 8")
    parser.add_argument("--large_models", default="",
                        help="models to run at sizes with more pixels than 128x256 (default: --models)")
    parser.add_argument("--large_batch_size", type=int, default=0,
                        help="batch for sizes with more pixels than 128x256 (0: --batch_size)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps / calls per row (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps / calls first (tracing, compiling)")
    parser.add_argument("--large_steps", type=int, default=0,
                        help="timed training steps for sizes above 128x256 (0: --steps)")
    parser.add_argument("--model_overrides", default=None, help="JSON of architecture overrides for every model")
    parser.add_argument("--matmul_sizes", default=None, help="default 1024,2048,4096")
    parser.add_argument("--matmul_repeats", type=int, default=None, help="default 5")
    parser.add_argument("--keras_batchnorm", action="store_true",
                        help="for comparison: batch norm by Keras 3's ops, not TensorFlow's fused kernel")
    parser.add_argument("--threads", default="", help="intra,inter op threads (default: TensorFlow's choice)")
    parser.add_argument("--precision", default="", help="Keras dtype policy, e.g. mixed_bfloat16 (default float32)")
    parser.add_argument("--profile", default="",
                        help="trace 2 more training steps (no XLA) per row into this folder; op time by group")
    parser.add_argument("--reference_peak", default="",
                        help="GFLOP/s,GFLOP per CPU-second: the peak to use instead of measuring the matmul rate "
                             "(what --isolate passes to its child processes)")
    parser.add_argument("--isolate", action="store_true",
                        help="measure each model and size in a child process (memory returned after each; a child "
                             "that dies, e.g. out of memory, costs only its rows)")
    parser.add_argument("--skip_xla", action="store_true")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--skip_savedmodel", action="store_true")
    parser.add_argument("--skip_pipeline", action="store_true")
    parser.add_argument("--skip_clustering", action="store_true")
    parser.add_argument("--skip_crosscheck", action="store_true")
    parser.add_argument("--crosscheck_model", default="", help="model for the FLOP cross-check (default: the first)")
    parser.add_argument("--work_dir", default=None,
                        help="data for the pipeline benchmark, generated once (default data/benchmark_run_all; "
                             "--quick: a temporary folder, removed at the end)")
    parser.add_argument("--clustering_data_dir", default="", help="default: data/synthetic")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run (the test): the slim model at 1/4 width, 32x64, batch 2, 1 step, small "
                             "matmuls, tiny pipeline / clustering data (flags given explicitly win)")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results", "benchmarks.md"))
    parser.add_argument("--json", default="", help="also write the raw measurements here")
    parser.add_argument("--notes", default="", help="text appended to the Markdown")
    parser.add_argument("--render_json", default="",
                        help="measure nothing: write --output from the --json file of an earlier run (and --notes)")
    args = parser.parse_args(argv)
    defaults = dict(models="", sizes="128x256,256x512", batch_size=8, steps=3, matmul_sizes="1024,2048,4096",
                    matmul_repeats=5, model_overrides="{}")
    if args.quick:
        defaults.update(models="kendall_deeplabv3_resnet26_slim", sizes="32x64", batch_size=2, steps=1,
                        matmul_sizes="256,512", matmul_repeats=2, model_overrides=json.dumps(QUICK_OVERRIDES))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.render_json:
        with open(args.render_json) as f:
            report = json.load(f)
        if args.notes:
            report["notes"] = args.notes
        text = render(report)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        return report
    import keras
    import tensorflow as tf

    import mtl_keras
    from flops import count_flops

    started = time.time()
    if args.threads:
        intra, inter = (int(v) for v in args.threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    if args.precision:
        keras.mixed_precision.set_global_policy(args.precision)
    if args.keras_batchnorm:
        use_keras_batchnorm()
    command = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    models = [m for m in args.models.split(",") if m] or mtl_keras.list_models()
    large_models = [m for m in args.large_models.split(",") if m] or models
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    overrides = json.loads(args.model_overrides)
    matmul_sizes = [int(n) for n in args.matmul_sizes.split(",")]

    def log(msg):
        print(f"[{time.time() - started:6.1f} s] {msg}", flush=True)

    report = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_description(),
              "load_start": load_average(), "matmul": {}, "training": [], "inference": [],
              "keras_batchnorm": args.keras_batchnorm, "threads": args.threads, "precision": args.precision}
    log(report["machine"])
    log(f"load average {report['load_start']:.1f}")
    # Peak for the rows printed during the run; the final table uses the best of the start and end measurements.
    if args.reference_peak:  # an --isolate child: its parent's matmul rate, not a measurement of its own
        peak, peak_cpu = (float(v) for v in args.reference_peak.split(","))
        report["matmul"]["start"] = []
    else:
        report["matmul"]["start"] = matmul_rate(matmul_sizes, args.matmul_repeats)
        for m in report["matmul"]["start"]:
            log(f"matmul {m['n']}: {m['gflops']:.1f} GFLOP/s best, {m['gflops_per_cpu_s']:.1f} GFLOP/CPU-s "
                f"(load {m['load']:.1f})")
        peak = max(m["gflops"] for m in report["matmul"]["start"])
        peak_cpu = max(m["gflops_per_cpu_s"] for m in report["matmul"]["start"])

    if not args.skip_crosscheck:
        name = args.crosscheck_model or models[0]
        try:
            report["crosscheck"] = flop_crosscheck(name, *sizes[0], overrides)
            c = report["crosscheck"]
            log(f"FLOP cross-check {name} {c['size']}: count_flops {c['count_flops_matmul'] / 1e9:.4f} G, "
                f"profiler convs {c['profiler_conv'] / 1e9:.4f} G, profiler total {c['profiler_total'] / 1e9:.4f} G, "
                f"as run {c['profiler_conv_as_run'] / 1e9:.4f} G")
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            report["crosscheck"] = failure(e)
        keras.backend.clear_session()

    def save_partial():
        """The Markdown (and JSON) so far: a long run that dies still leaves its rows, marked as partial."""
        partial = dict(report, peak_gflops=peak, peak_gflops_per_cpu_s=peak_cpu, load_end=load_average(),
                       wall_minutes=(time.time() - started) / 60,
                       notes="**Partial: the run was still going (or died) when this was written.**")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(partial, f, indent=1, default=float)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.write(render(partial))

    train_variants = [] if args.skip_training else ([False] if args.skip_xla else [False, True])
    infer_paths = ([] if args.skip_inference else
                   ["Keras tf.function"] + ([] if args.skip_xla else ["Keras tf.function + XLA"]))
    infer_paths += [] if args.skip_savedmodel else ["SavedModel serving_default"]

    def add_row(row, kind):
        add_fractions(row, peak, peak_cpu)
        report[kind].append(row)
        log(train_row(row) if kind == "training" else "inference " + infer_row(row))
        save_partial()

    log("\n" + TRAIN_HEADER + "\n" + separator(TRAIN_HEADER))
    for height, width in sizes:
        large = height * width > 128 * 256
        batch = args.large_batch_size if large and args.large_batch_size else args.batch_size
        steps = args.large_steps if large and args.large_steps else args.steps
        for name in (large_models if large else models):
            if args.isolate:
                measure_in_child(args, name, height, width, batch, steps, train_variants, infer_paths, add_row, log,
                                 peak, peak_cpu)
                continue
            model = mtl_keras.build_model(name, input_shape=(height, width, 3), **overrides)
            flops = count_flops(model)
            x, y = random_batch(batch, height, width, tasks=tuple(model.output.keys()))
            x, y = tf.constant(x), {k: tf.constant(v) for k, v in y.items()}
            label = name + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
            base = {"model": label, "size": f"{height}x{width}", "batch": batch,
                    "gflops_nominal": flops["matmul"] / 1e9, "gflops_effective": flops["effective"] / 1e9}
            def train(xla, model=model, x=x, y=y, base=base, steps=steps, name=name, height=height, width=width):
                try:
                    profile = os.path.join(args.profile, f"{name}_{height}x{width}") if args.profile and not xla \
                        else ""
                    row = dict(base, **measure_training(model, x, y, steps, args.warmup, xla, profile))
                    for g in row.get("profile", []):
                        log(f"    {g['group']}: {g['seconds']:.3f} s ({100 * g['share']:.1f}%)")
                except Exception as e:  # noqa: BLE001 - XLA on CPU may fail: reported in the row
                    row = dict(base, **failure(e), load=load_average())
                    traceback.print_exc(limit=2)
                add_row(dict(row, xla=xla, factor=3), "training")
                gc.collect()

            runs = {"Keras tf.function": lambda m=model: measure_inference(m, x, args.steps, args.warmup, False),
                    "Keras tf.function + XLA": lambda m=model: measure_inference(m, x, args.steps, args.warmup, True),
                    "SavedModel serving_default": lambda m=model: measure_savedmodel(m, x, args.steps, args.warmup)}
            # Order: training, inference, then XLA training (its compile needs the most memory: if that kills the
            # process, as it did for ResNet-50 at 256x512 batch 8 on 23 GB, the other rows are already measured).
            if False in train_variants:
                train(False)
            for path in infer_paths:
                try:
                    row = dict(base, **runs[path]())
                except Exception as e:  # noqa: BLE001
                    row = dict(base, **failure(e), load=load_average())
                    traceback.print_exc(limit=2)
                add_row(dict(row, path=path, factor=1), "inference")
            if True in train_variants:
                train(True)
            del model, x, y, runs
            keras.backend.clear_session()
            gc.collect()

    temporary = None
    work_dir = args.work_dir or os.path.join(ROOT, "data", "benchmark_run_all")
    if args.quick and not args.work_dir:
        work_dir = temporary = tempfile.mkdtemp(prefix="mtl_keras_run_all_")
    if not args.skip_pipeline:
        os.makedirs(work_dir, exist_ok=True)
        try:
            report["pipeline"] = pipeline_rows(work_dir, args.quick, log)
        except Exception as e:  # noqa: BLE001
            report["pipeline"] = failure(e)
            traceback.print_exc(limit=3)
        log(f"pipeline: {report['pipeline']}")
    if not args.skip_clustering:
        try:
            report["clustering"], report["clustering_command"] = clustering_rows(args.clustering_data_dir,
                                                                                 args.quick, work_dir)
        except Exception as e:  # noqa: BLE001
            report["clustering"] = failure(e)
            traceback.print_exc(limit=3)
        log(f"clustering: {report['clustering']}")

    if temporary:
        shutil.rmtree(temporary, ignore_errors=True)
    report["matmul"]["end"] = [] if args.reference_peak else matmul_rate(matmul_sizes, args.matmul_repeats)
    all_mm = report["matmul"]["start"] + report["matmul"]["end"]
    report["peak_gflops"] = max((m["gflops"] for m in all_mm), default=peak)
    report["peak_gflops_per_cpu_s"] = max((m["gflops_per_cpu_s"] for m in all_mm), default=peak_cpu)
    for row in report["training"] + report["inference"]:  # against the best matmul of the whole run
        add_fractions(row, report["peak_gflops"], report["peak_gflops_per_cpu_s"])
    report["load_end"] = load_average()
    report["wall_minutes"] = (time.time() - started) / 60
    report["notes"] = args.notes
    text = render(report)
    print("\n" + text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    del tf
    return report


if __name__ == "__main__":
    main()
