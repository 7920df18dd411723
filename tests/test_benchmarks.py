"""benchmarks/run_all.py (a --quick run on a tiny model), the FLOP counter (exact counts by hand), and
docs/make_results.py. No timing is asserted: only that the numbers exist, are finite and positive."""

import math
import os
import re

import keras
import pytest

from mtl_keras.layers import AtrousConv2D
from tests.helpers import load_script

flops = load_script("benchmarks/flops.py", "flops")
count_flops, layer_flops, profiler_flops = flops.count_flops, flops.layer_flops, flops.profiler_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "benchmark_test_tiny_net"


# ---------------------------------------------------------------------------------------------------- FLOP counter
def test_count_flops_one_conv_exact():
    image = keras.Input((8, 10, 3))
    model = keras.Model(image, keras.layers.Conv2D(4, 3, padding="same", name="c")(image))
    flops = count_flops(model)
    assert flops["matmul"] == 2 * 3 * 3 * 3 * 4 * 8 * 10  # 2 * kh * kw * cin * cout * Hout * Wout = 17280
    assert flops["train_matmul"] == 3 * flops["matmul"]
    assert flops["other"] == 8 * 10 * 4  # the bias add
    # Without the taps on the one-pixel "same" padding: rows 8*3-2, columns 10*3-2 (output, tap) pairs in bounds.
    assert flops["effective"] == 2 * (8 * 3 - 2) * (10 * 3 - 2) * 3 * 4
    assert flops["dilated"] == 0


def test_count_flops_layer_kinds_exact():
    image = keras.Input((4, 6, 2))
    a = AtrousConv2D(5, 3, padding="same", dilation_rate=4, use_bias=False, name="atrous")(image)  # 4x6, rate 4
    b = keras.layers.Conv2D(3, 3, strides=2, padding="valid", use_bias=False, name="strided")(a)  # 1x2
    c = keras.layers.Conv2DTranspose(2, 2, strides=2, use_bias=False, name="up")(b)  # 2x4
    d = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(c)
    e = keras.layers.Dense(7, use_bias=False, name="dense")(d)
    rows = {r["layer"]: r for r in layer_flops(keras.Model(image, e))}
    assert rows["atrous"]["matmul_flops"] == 2 * 9 * 2 * 5 * 4 * 6
    # Rate 4 on 4 rows: only the middle row of taps lands inside; on 6 columns the side taps land in 2 of 6 each.
    assert rows["atrous"]["effective_flops"] == 2 * (4 * 1) * (6 + 2 + 2) * 2 * 5
    assert rows["atrous"]["dilated"]
    assert rows["strided"]["matmul_flops"] == rows["strided"]["effective_flops"] == 2 * 9 * 5 * 3 * 1 * 2
    assert rows["up"]["matmul_flops"] == 2 * 4 * 3 * 2 * 1 * 2  # per input position
    assert rows["dw"]["matmul_flops"] == 2 * 9 * 2 * 2 * 4
    assert rows["dense"]["matmul_flops"] == 2 * 2 * 7 * 2 * 4


def test_profiler_agrees_on_convs():
    image = keras.Input((16, 16, 3))
    x = AtrousConv2D(8, 3, padding="same", dilation_rate=2, name="a")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(4, 1, name="b")(x)
    model = keras.Model(image, keras.layers.Conv2DTranspose(2, 2, strides=2, name="up")(x))
    prof = profiler_flops(model)
    ours = count_flops(model)
    assert prof["by_op"]["Conv2D"] + prof["by_op"]["Conv2DBackpropInput"] == ours["matmul"]
    assert prof["total"] > ours["matmul"]  # + bias adds and batch norm


# ------------------------------------------------------------------------------------------------------- run_all
def _register_tiny_model(monkeypatch):
    """Registers a tiny model for this test only (monkeypatch removes it after: other tests check that every
    registered model has a preset)."""
    from mtl_keras import registry
    from mtl_keras.layers import conv_bn_relu, image_normalization
    from mtl_keras.models.heads import task_output

    def tiny(tasks=("semantic", "instance", "depth"), num_classes=19, input_shape=(32, 64, 3), **overrides):
        image = keras.Input(input_shape, name="image")
        x = image_normalization()(image)
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(x)
        x = conv_bn_relu(x, 8, 3, dilation_rate=2, name="atrous")
        return keras.Model(image, {t: task_output(x, t, num_classes, image, name=f"{t}_head") for t in tasks},
                           name=TINY)

    monkeypatch.setitem(registry._MODEL_ENTRY_POINTS, TINY, tiny)


def _table(markdown, title):
    """Rows (lists of cells) of the first table after the heading ``title``."""
    section = markdown.split(title, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    lines = []
    for line in rows:
        if lines and not line.startswith("|"):
            break
        lines.append([c.strip() for c in line.strip("|").split("|")])
    header, body = lines[0], [r for r in lines[2:]]
    end = next((i for i, r in enumerate(body) if len(r) != len(header)), len(body))
    return header, body[:end]


def _positive(cell):
    value = float(re.match(r"[-+0-9.eE]+", cell).group(0))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_run_all_quick_models(tmp_path, monkeypatch):
    """Training, inference and SavedModel rows of a tiny model; XLA is made to fail (compiling costs too long for a
    unit test): a failure is reported in its row, not raised."""
    _register_tiny_model(monkeypatch)
    run_all = load_script("benchmarks/run_all.py", "run_all_under_test")

    def no_xla(fn, position):
        def wrapped(*args):
            if args[position] is True:  # jit_compile
                raise RuntimeError("XLA disabled by the test")
            return fn(*args)
        return wrapped

    # measure_training(model, x, y, steps, warmup, jit_compile, ...), measure_inference(model, x, steps, warmup, jit)
    monkeypatch.setattr(run_all, "measure_training", no_xla(run_all.measure_training, 5))
    monkeypatch.setattr(run_all, "measure_inference", no_xla(run_all.measure_inference, 4))
    output = tmp_path / "benchmarks.md"
    report = run_all.main(["--quick", "--models", TINY, "--model_overrides", "{}", "--output", str(output),
                           "--skip_pipeline", "--skip_clustering", "--json", str(tmp_path / "b.json")])
    text = output.read_text()
    assert text.startswith(run_all.FRAGMENT_TITLE)
    assert report["peak_gflops"] > 0 and math.isfinite(report["peak_gflops"])
    assert "Cross-check" in text and "identical" in text  # count_flops == TensorFlow's profiler on the convs

    header, rows = _table(text, "## Training")
    assert header[:5] == ["model", "input", "batch", "XLA", "fwd GFLOP/img (nominal / effective)"]
    for column in ("s/step best (median)", "train img/s", "% of matmul peak (nominal)", "% (effective)",
                   "% by CPU time (nominal / effective)", "load"):
        assert column in header
    assert [r[3] for r in rows] == ["no", "yes"]
    row = rows[0]
    assert row[0] == TINY and row[1] == "32x64" and row[2] == "2"
    assert all(_positive(v) for v in row[4].split(" / "))
    for column in ("s/step best (median)", "train img/s", "% of matmul peak (nominal)", "% (effective)"):
        _positive(row[header.index(column)])
    assert all(_positive(v) for v in row[header.index("% by CPU time (nominal / effective)")].split(" / "))
    assert rows[1][header.index("s/step best (median)")].startswith("failed: RuntimeError: XLA disabled")

    header, rows = _table(text, "## Inference")
    assert [r[header.index("path")] for r in rows] == ["Keras tf.function", "Keras tf.function + XLA",
                                                     "SavedModel serving_default"]
    for row in (rows[0], rows[2]):
        for column in ("ms/batch best (median)", "img/s", "% of matmul peak (nominal)", "% (effective)"):
            _positive(row[header.index(column)])
    assert rows[1][header.index("ms/batch best (median)")].startswith("failed:")

    header, rows = _table(text, "## Float32 matmul rate")
    assert {r[0] for r in rows} == {"start", "end"}
    for row in rows:
        _positive(row[header.index("GFLOP/s best")])
    for row in report["training"][:1] + report["inference"][:1]:
        assert row["images_per_s"] > 0 and math.isfinite(row["peak_cpu"]) and row["peak_cpu"] > 0


def test_run_all_times_keep_three_significant_digits_at_any_speed():
    """A fast machine's step (a GPU, the tiny model above) is a number in the table, never 0.00: the time cells keep
    three significant digits in plain notation."""
    run_all = load_script("benchmarks/run_all.py", "run_all_under_test_times")
    cases = {3.4149: "3.41", 0.8531: "0.853", 0.0004: "0.000400", 0.0000123: "0.0000123", 12.34: "12.3",
             1234.5: "1230", 99.96: "100", 0.0009996: "0.00100", float("nan"): "-", None: "-"}
    assert {value: run_all.fmt_time(value) for value in cases} == cases
    row = {"model": TINY, "size": "32x64", "batch": 2, "xla": False, "gflops_nominal": 0.01, "gflops_effective": 0.01,
           "best_s": 0.0004, "median_s": 0.00051, "warmup_s": 1.0, "images_per_s": 5000.0, "peak_nominal": 0.001,
           "peak_effective": 0.001, "peak_cpu": None, "load": 0.5}
    assert "| 0.000400 (0.000510) |" in run_all.train_row(row)
    assert "| 0.400 (0.510) |" in run_all.infer_row({**row, "path": "Keras tf.function"})


@pytest.mark.slow  # about 30 s
@pytest.mark.subprocess
def test_run_all_isolate_measures_in_a_child_process_against_the_parents_peak(tmp_path, monkeypatch):
    """--isolate: the rows come back from a child process (a real, tiny model; this process never builds it), as
    rows, not failures, with the fractions taken against the parent's matmul rate."""
    import mtl_keras

    run_all = load_script("benchmarks/run_all.py", "run_all_under_test_isolate")
    with monkeypatch.context() as patch:
        patch.setattr(mtl_keras, "build_model", lambda *a, **k: pytest.fail("--isolate built a model in the parent"))
        report = run_all.main(["--quick", "--isolate", "--models", "kendall_deeplabv3_resnet26_slim", "--skip_xla",
                               "--skip_savedmodel", "--skip_pipeline", "--skip_clustering", "--skip_crosscheck",
                               "--output", str(tmp_path / "b.md")])
    assert len(report["training"]) == 1 and len(report["inference"]) == 1
    # The expectation, from the definitions rather than run_all's arithmetic: the peak is the best of the parent's
    # own matmul measurements (--quick: sizes 256 and 512, at the start and the end); the FLOPs per image are the
    # counter's (exact by hand, above) for the model at --quick's 32x64 and overrides; images/s is the batch (2)
    # over the best step time; a training step costs 3 forward passes (forward, input and weight gradients),
    # inference 1.
    parent_rates = [m["gflops"] for m in report["matmul"]["start"] + report["matmul"]["end"]]
    assert [m["n"] for m in report["matmul"]["start"]] == [256, 512] and len(parent_rates) == 4
    assert report["peak_gflops"] == max(parent_rates)
    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_slim", input_shape=(32, 64, 3), **run_all.QUICK_OVERRIDES)
    gflops = count_flops(model)["matmul"] / 1e9
    for row, factor in ((report["training"][0], 3), (report["inference"][0], 1)):
        assert "error" not in row, row
        assert row["size"] == "32x64" and row["batch"] == 2
        assert row["gflops_nominal"] == pytest.approx(gflops, rel=1e-12)
        images_per_s = 2 / row["best_s"]
        assert row["images_per_s"] == pytest.approx(images_per_s, rel=1e-12)
        assert row["peak_nominal"] == pytest.approx(factor * gflops * images_per_s / max(parent_rates), rel=1e-9)


def test_run_all_quick_data(tmp_path):
    """The input-pipeline and clustering rows (tiny generated data)."""
    run_all = load_script("benchmarks/run_all.py", "run_all_under_test_data")
    output = tmp_path / "benchmarks.md"
    run_all.main(["--quick", "--skip_training", "--skip_inference", "--skip_savedmodel", "--skip_crosscheck",
                  "--output", str(output), "--work_dir", str(tmp_path / "work")])
    text = output.read_text()
    header, rows = _table(text, "## Input pipeline")
    assert rows and all(_positive(r[1]) for r in rows)
    header, rows = _table(text, "## Instance clustering")
    assert rows[0][0] == "histogram"
    for column in ("wall ms / image (median)", "CPU ms (median)", "ARI/img"):
        _positive(rows[0][header.index(column)])


# ------------------------------------------------------------------------------------------------- make_results
def test_make_results(tmp_path):
    make_results = load_script("docs/make_results.py", "make_results_under_test")
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    (results / "benchmarks.md").write_text("# Speed\n\n| a |\n| --- |\n| 1 |\n")
    (results / "toy_uncertainty.md").write_text(
        "# Toy\n\n![sigma](toy_sigma.png)\n\n<img src=\"toy.png\">\n\n```\n# a comment, not a heading\n```\n")
    (results / "aaa_extra.md").write_text("# Extra\n\n[speed](benchmarks.md) [web](https://example.org/x.png)\n")
    output = tmp_path / "docs" / "results.md"
    missing = make_results.main(["--results_dir", str(results), "--output", str(output)])
    text = output.read_text()
    assert missing == ["init_robustness", "reproduce_kendall", "reproduce_mtunet"]
    assert "Generated" in text and "make_results.py" in text
    assert text.index("## Speed") < text.index("## Toy") < text.index("## Extra")  # fixed order, then a-z
    for name in missing:
        assert f"{name}: not yet generated" in text
    assert "![sigma](results/toy_sigma.png)" in text and '<img src="results/toy.png">' in text
    assert "[speed](results/benchmarks.md)" in text and "(https://example.org/x.png)" in text
    assert "# a comment, not a heading" in text and "## a comment" not in text
