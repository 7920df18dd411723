"""What each loss weighting costs per training step: time and peak memory relative to equal weighting (EW).

    python benchmarks/weighting_cost.py --model kendall_deeplabv3_resnet26_slim --image_size 128,256 --batch_size 8
    python benchmarks/weighting_cost.py --model kendall_deeplabv3_resnet50 --image_size 128,256 --batch_size 8 \\
        --methods equal,pcgrad,mgda,nash_mtl --rep_grad both
    KERAS_BACKEND=jax python benchmarks/weighting_cost.py --jacobian_modes loop,batched --methods equal,pcgrad

Each row runs in its own child process (this script with ``--child``), so that its peak memory is its own and not
what earlier rows left in the allocator; on one random batch (``benchmarks/common.random_batch``):
``MultiTaskTrainer`` + the weighting + SGD, ``train_on_batch`` (which returns once the step has finished),
``--warmup`` untimed steps (tracing and compilation), then ``--steps`` timed steps; the row's time is their median.

Rows: ``uncertainty`` (the loss weighting: one backward pass; the reference of the zoo's default), ``equal`` as a
gradient method (``GradientWeighting``: the trainer's per-task-gradient path with equal weights, one backward pass),
then every method asked for, with parameter gradients and (``--rep_grad both``) representation gradients. Relative
columns divide by the ``equal`` row of the same gradient kind.

Peak memory: Linux's peak resident set size of the child (``VmHWM``) minus its resident size after the imports and
the batch, i.e. the model, optimiser slots, method state, activations and per-task gradients of that row. Elsewhere
the column shows "-".
"""

import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from absl import app, flags  # noqa: E402

from common import first_line, load_average, random_batch, table_cell, timed  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "kendall_deeplabv3_resnet26_slim", "Registered model.")
flags.DEFINE_list("image_size", ["128", "256"], "height,width.")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_list("methods", [], "Gradient methods to measure (default: every registered one).")
flags.DEFINE_enum("rep_grad", "both", ["no", "yes", "both"], "Parameter gradients, representation gradients, both.")
flags.DEFINE_list("jacobian_modes", ["loop"], "loop and/or batched (batched: JAX only).")
flags.DEFINE_integer("warmup", 1, "Untimed steps per row (the first one traces / compiles).")
flags.DEFINE_integer("steps", 2, "Timed steps per row.")
flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
flags.DEFINE_string("child", None, "Internal: measure one row METHOD,REP_GRAD,JACOBIAN_MODE and print it as JSON.")
flags.DEFINE_integer("timeout", 1800, "Seconds before a row's child process is killed.")


def _rss_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(name, rep_grad, jacobian_mode, x, y):
    import keras

    import mtl_keras
    from mtl_keras.gradient_methods import GRADIENT_METHODS
    from mtl_keras.training import MultiTaskTrainer
    from mtl_keras.weighting import GradientWeighting, build_weighting

    tasks = ("semantic", "instance", "depth")
    start_rss = _rss_kib("VmRSS")
    model = mtl_keras.build_model(FLAGS.model, tasks=tasks, input_shape=x.shape[1:])
    if name in GRADIENT_METHODS:  # "equal" too: its row measures the gradient path, the baseline of the others
        weighting = GradientWeighting(tasks, method=name, rep_grad=rep_grad)
    else:
        weighting = build_weighting(name, tasks, **({"rep_grad": True} if rep_grad else {}))
    trainer = MultiTaskTrainer(model, weighting, jacobian_mode=jacobian_mode)
    trainer.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
                    jit_compile=keras.config.backend() == "jax")
    timing = timed(lambda: trainer.train_on_batch(x, y), FLAGS.steps, FLAGS.warmup)
    peak = _rss_kib("VmHWM")
    row = {"method": name, "rep_grad": rep_grad, "jacobian_mode": jacobian_mode, **timing,
           "peak_growth_mib": None if peak is None or start_rss is None else (peak - start_rss) / 1024.0,
           "shared_parameters": trainer.partition.num_shared if trainer.partition is not None else None}
    return row


def run_child(name, rep_grad, jacobian_mode):
    """One row in a fresh process; a failure (exception, crash, timeout) becomes the row's error."""
    import subprocess

    passed = [a for a in sys.argv[1:] if not a.startswith(("--child", "--json"))]
    command = [sys.executable, os.path.abspath(__file__), *passed, f"--child={name},{int(rep_grad)},{jacobian_mode}"]
    row = {"method": name, "rep_grad": rep_grad, "jacobian_mode": jacobian_mode}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=FLAGS.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timeout after {FLAGS.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {**row, "error": first_line(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                                       f"exit {proc.returncode}")}


def main(argv):
    del argv
    import keras

    from mtl_keras.gradient_methods import GRADIENT_METHODS

    height, width = (int(v) for v in FLAGS.image_size)
    x, y = random_batch(FLAGS.batch_size, height, width)
    if FLAGS.child:
        name, rep_grad, jacobian_mode = FLAGS.child.split(",")
        try:
            row = measure(name, bool(int(rep_grad)), jacobian_mode, x, y)
        except Exception as error:  # noqa: BLE001 - reported as the row's error
            row = {"method": name, "rep_grad": bool(int(rep_grad)), "jacobian_mode": jacobian_mode,
                   "error": first_line(f"{type(error).__name__}: {error}")}
        print("ROW " + json.dumps(row), flush=True)
        return
    methods = FLAGS.methods or sorted(n for n in GRADIENT_METHODS if not n.startswith("_"))
    kinds = {"no": [False], "yes": [True], "both": [False, True]}[FLAGS.rep_grad]
    plan = [("uncertainty", False, "loop")]
    for jacobian_mode in FLAGS.jacobian_modes:
        for rep_grad in kinds:
            for name in ["equal"] + [m for m in methods if m != "equal"]:
                known = GRADIENT_METHODS.get(name)  # an unknown name gets its row, which shows the error
                if rep_grad and known is not None and not known.supports_rep_grad:
                    continue
                plan.append((name, rep_grad, jacobian_mode))
    rows = []
    started = time.time()
    for name, rep_grad, jacobian_mode in plan:
        rows.append(run_child(name, rep_grad, jacobian_mode))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "times_s"}), flush=True)

    def reference(row):
        for r in rows:
            if r["method"] == "equal" and r["rep_grad"] == row["rep_grad"] and r["jacobian_mode"] == row[
                    "jacobian_mode"] and "error" not in r:
                return r
        return None

    print(f"\n{FLAGS.model}, {height}x{width}, batch {FLAGS.batch_size}, KERAS_BACKEND={keras.config.backend()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load_average():.2f}, "
          f"{time.time() - started:.0f} s in all\n")
    print("| weighting | gradients | Jacobian | s/step | x EW | peak memory growth [MiB] | x EW |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        kind = "representation" if row["rep_grad"] else ("parameters" if row["method"] != "uncertainty"
                                                         else "loss only")
        if "error" in row:
            print(f"| {row['method']} | {kind} | {row['jacobian_mode']} | {table_cell(row['error'])} | | | |")
            continue
        ref = reference(row)
        ratio = f"{row['median_s'] / ref['median_s']:.2f}" if ref else "-"
        memory = row["peak_growth_mib"]
        memory_ratio = (f"{memory / ref['peak_growth_mib']:.2f}" if ref and memory is not None and
                        ref["peak_growth_mib"] else "-")
        print(f"| {row['method']} | {kind} | {row['jacobian_mode']} | {row['median_s']:.3f} | {ratio} | "
              f"{'-' if memory is None else f'{memory:.0f}'} | {memory_ratio} |")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
