"""experiments/reproduce_kendall.py and reproduce_mtunet.py end to end in a CI-sized form (two variants, two steps,
a 16 + 8 image synthetic set), and the table helpers of experiments/reproduction.py."""

import json
import math
import os
import subprocess
import sys

import pytest

from mtl_keras.config import TrainConfig
from tests.helpers import load_script

reproduction = load_script("experiments/reproduction.py", "reproduction")
Metric, Variant = reproduction.Metric, reproduction.Variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(name, tmp_path, variants):
    out = tmp_path / "out"
    markdown = tmp_path / "fragment.md"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick", f"--variants={variants}",
           "--steps=2", "--synthetic_num_train=16", "--synthetic_num_val=8", f"--data_dir={tmp_path / 'data'}",
           f"--output_dir={out}", f"--markdown={markdown}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / f"{name}.json").read_text())
    text = markdown.read_text()
    assert (out / f"{name}.md").read_text() == text
    return text, results


def _table(text):
    """{row label: {column header: cell}} of the markdown table; the 'ours' column after 'X paper' is 'X ours'."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    named = []
    for i, cell in enumerate(header):
        named.append(f"{header[i - 1][:-len(' paper')]} ours" if cell == "ours" else cell)
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(named), line
        if set(cells[0]) <= {"-", ":"}:  # the alignment row
            continue
        rows[cells[0]] = dict(zip(named, cells))
    return rows


def _number(cell):
    value = float(cell.rstrip("%"))
    assert math.isfinite(value), cell
    return value


def _check_common(text, results, names, steps=2):
    assert text.startswith("## Reproduction")
    assert "quick mode" in text and "python experiments/" in text and "--steps=2" in text
    assert "Remarks:" in text and "Synthetic data" in text
    assert results["quick"] is True and results["dataset"] == "synthetic"
    assert [v["name"] for v in results["variants"]] == names
    for record in results["variants"]:
        assert record["steps"] == steps and not record["reused"]
        assert record["val"]["num_images"] == 8
        assert set(record["final_task_weights"]) >= {f"{t}_weight" for t in record["tasks"]}


@pytest.mark.subprocess
@pytest.mark.slow
def test_reproduce_kendall_ci(tmp_path):
    text, results = _run_script("reproduce_kendall", tmp_path, "single_depth,uncertainty_semantic_depth")
    _check_common(text, results, ["single_depth", "uncertainty_semantic_depth"])
    rows = _table(text)
    assert set(rows) == {"depth only (`single_depth`)",
                         "2-task uncertainty, sem + depth (`uncertainty_semantic_depth`)",
                         "untrained network (step 0, reference)"}
    single = rows["depth only (`single_depth`)"]
    assert single["inverse depth mean error [px] paper"] == "0.640"
    assert _number(single["inverse depth mean error [px] ours"]) > 0
    assert single["seg IoU ours"] == "-" and single["instance mean error [px] ours"] == "-"
    pair = rows["2-task uncertainty, sem + depth (`uncertainty_semantic_depth`)"]
    assert (pair["seg IoU paper"], pair["inverse depth mean error [px] paper"]) == ("62.7%", "0.533")
    assert 0 <= _number(pair["seg IoU ours"]) <= 100
    assert _number(pair["inverse depth mean error [px] ours"]) > 0
    assert pair["instance mean error [px] paper"] == "-" and pair["instance mean error [px] ours"] == "-"
    assert pair["weighting"] == "uncertainty" and pair["tasks"] == "sem+depth"
    record = results["variants"][1]
    assert record["tasks"] == ["semantic", "depth"] and math.isfinite(record["val"]["semantic_miou"])
    assert set(record["final_task_weights"]) == {"semantic_weight", "depth_weight", "semantic_sigma2",
                                                 "depth_sigma2"}
    assert results["variants"][0]["weighting"] == "equal"


@pytest.mark.subprocess
@pytest.mark.slow
def test_reproduce_mtunet_ci(tmp_path):
    text, results = _run_script("reproduce_mtunet", tmp_path, "no_cross_talk,fixed_d03_s07")
    _check_common(text, results, ["no_cross_talk", "fixed_d03_s07"])
    rows = _table(text)
    no_cross = rows["without cross-talk (`no_cross_talk`)"]
    assert (no_cross["mIoU paper"], no_cross["abs. depth error paper"]) == ("72.30%", "0.0142")
    fixed = rows["fixed W1 (depth) 0.3, W2 (seg) 0.7 (`fixed_d03_s07`)"]
    assert fixed["mIoU paper"] == "-" and fixed["weighting"] == "fixed 0.7/0.3"
    for row in (no_cross, fixed, rows["untrained network (step 0, reference)"]):
        for column in ("pixel acc. (paper: \"IoU\") ours", "mIoU ours"):
            assert 0 <= _number(row[column]) <= 100
        for column in ("abs. depth error ours", "rel. depth error ours"):
            assert _number(row[column]) >= 0
    first, second = results["variants"]
    assert first["overrides"]["model_overrides"] == {"attention": True, "cross_talk": False}
    assert first["weighting"] == "mtunet" and second["task_weights"] == [0.7, 0.3]
    # The quick base's narrow width is kept under the variant's switches.
    config = json.loads((tmp_path / "out" / "runs" / "no_cross_talk" / "config.json").read_text())
    assert config["model_overrides"] == {"base_filters": 8, "attention": True, "cross_talk": False}
    assert config["num_classes"] == 7 and config["export"] is False and config["num_sample_images"] == 0


def _plan(name, *flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--dry_run", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plans = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {p["name"]: p["config"] for p in plans}


@pytest.mark.subprocess
@pytest.mark.slow
def test_full_mode_plans_use_the_papers_schedules(tmp_path):
    """Without --quick: the presets' schedules (no training here, --dry_run)."""
    plans = _plan("reproduce_kendall", "--dataset=cityscapes", f"--data_dir={tmp_path}")
    assert len(plans) == 9
    for config in plans.values():
        assert (config["model"], config["steps"], config["batch_size"], config["learning_rate"]) == \
            ("kendall_deeplabv3_resnet101", 50000, 8, 0.0025)
        assert config["crop_size"] == [256, 256] and config["image_size"] == [128, 256]
        assert config["dataset"] == "cityscapes" and config["export"] is False
    assert plans["single_instance"]["tasks"] == ["instance"] and plans["single_instance"]["weighting"] == "equal"
    assert plans["fixed_weights"]["task_weights"] == [0.89, 0.01, 0.1]
    assert plans["unweighted_sum"]["weighting"] == "equal"
    assert plans["uncertainty_instance_depth"]["tasks"] == ["instance", "depth"]

    plans = _plan("reproduce_mtunet", "--dataset=cityscapes_npy", f"--data_dir={tmp_path}")
    assert len(plans) == 10
    for config in plans.values():
        assert (config["model"], config["epochs"], config["steps"], config["optimizer"], config["learning_rate"]) == \
            ("mt_unet", 200, 0, "adam", 0.0001)
        assert config["tasks"] == ["semantic", "depth"] and "base_filters" not in config["model_overrides"]
    assert plans["mt_unet"]["num_classes"] == 7 and plans["mt_unet_19cls"]["num_classes"] == 19
    assert plans["plain_unet"]["model_overrides"] == {"attention": False, "cross_talk": False}
    assert plans["fixed_d07_s03"]["task_weights"] == [0.3, 0.7]
    nyu = _plan("reproduce_mtunet", "--dataset=nyuv2_npy", f"--data_dir={tmp_path}", "--variants=mt_unet,dwa")
    assert set(nyu) == {"mt_unet", "dwa"} and nyu["mt_unet"]["batch_size"] == 2 and nyu["dwa"]["num_classes"] == 13


# ------------------------------------------------------------------------------------------ helpers, no training
METRICS = [Metric("semantic_miou", "IoU", True, scale=100.0, digits=1, suffix="%"),
           Metric("depth_mean_error_px", "depth", False, digits=3)]


def _record(name, val, paper, tasks=("semantic", "depth")):
    return {"name": name, "label": name.upper(), "tasks": list(tasks), "weighting": "fixed", "task_weights": [1, 2],
            "paper": paper, "val": val, "val_untrained": {"semantic_miou": 0.01, "depth_mean_error_px": 9.0},
            "final_task_weights": {"semantic_weight": 1.0, "depth_weight": 2.0}, "wall_seconds": 12.3}


def test_results_table_and_ranking_remarks():
    records = [_record("a", {"semantic_miou": 0.5, "depth_mean_error_px": 1.0}, {"semantic_miou": "60.0%"}),
               _record("b", {"semantic_miou": 0.4, "depth_mean_error_px": float("nan")},
                       {"semantic_miou": "61.0%", "depth_mean_error_px": "0.5"})]
    table = reproduction.results_table(records, METRICS)
    lines = table.splitlines()
    assert lines[0] == ("| variant | tasks | weighting | IoU paper | ours | depth paper | ours | final task weights "
                        "| time [s] |")
    assert lines[2] == "| A (`a`) | sem+depth | fixed 1/2 | 60.0% | 50.0% | - | 1.000 | sem 1, depth 2 | 12 |"
    assert lines[3].startswith("| B (`b`) | sem+depth | fixed 1/2 | 61.0% | 40.0% | 0.5 | - |")
    assert lines[4] == "| untrained network (step 0, reference) |  |  | - | 1.0% | - | 9.000 |  |  |"
    (remark,) = reproduction.ranking_remarks(records, METRICS)  # depth: only one row has both numbers
    assert remark.startswith("IoU: among the 2 rows") and "*B* (61.0%)" in remark and "*A* (50.0%)" in remark
    assert remark.endswith("a different row.")


def test_variant_selection_and_config():
    variants = [Variant("x", "X", dict(weighting="equal")),
                Variant("y", "Y", dict(model_overrides=dict(attention=False), tasks=("semantic",)))]
    assert [v.name for v in reproduction.select_variants(variants, ["y"])] == ["y"]
    assert reproduction.select_variants(variants, []) == variants
    with pytest.raises(ValueError, match="Unknown variant"):
        reproduction.select_variants(variants, ["z"])
    base = TrainConfig(model="mt_unet", model_overrides=dict(base_filters=8))
    config = reproduction.variant_config(base, variants[1], "/out")
    assert config.model_overrides == {"base_filters": 8, "attention": False}
    assert config.tasks == ("semantic",) and config.output_dir == os.path.join("/out", "runs", "y")
    assert base.model_overrides == {"base_filters": 8}


def test_run_variants_reuses_finished_runs_and_restarts_changed_ones(tmp_path, monkeypatch):
    import mtl_keras.experiment

    trained = []

    def fake_run_training(config, verbose=0):
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            f.write(config.to_json())
        results = {"val": {"depth_mean_error_px": 1.5, "semantic_miou": float("nan")}, "val_untrained": {},
                   "final_task_weights": {"depth_weight": 1.0}, "wall_seconds": 3.0, "steps": config.steps}
        with open(os.path.join(config.output_dir, "metrics.json"), "w") as f:
            json.dump(results, f)
        trained.append((os.path.basename(config.output_dir), config.steps))
        return results

    monkeypatch.setattr(mtl_keras.experiment, "run_training", fake_run_training)
    variants = [Variant("a", "A", dict(tasks=("depth",))), Variant("b", "B", dict(tasks=("semantic", "depth")))]
    base = TrainConfig(steps=5)
    out = str(tmp_path / "out")
    seen = []
    records = reproduction.run_variants(base, variants, out, on_record=lambda r: seen.append(len(r)))
    assert trained == [("a", 5), ("b", 5)] and seen == [1, 2] and not any(r["reused"] for r in records)
    assert records[1]["val"]["semantic_miou"] is None  # NaN -> null in the JSON-ready records
    records = reproduction.run_variants(base, variants, out)
    assert len(trained) == 2 and all(r["reused"] for r in records)
    # Another config in the same folder: that run is not resumed but started afresh.
    with open(os.path.join(out, "runs", "a", "stale_backup"), "w") as f:
        f.write("x")
    records = reproduction.run_variants(base.replace(steps=7), variants[:1], out)
    assert trained[-1] == ("a", 7) and not records[0]["reused"]
    assert not os.path.exists(os.path.join(out, "runs", "a", "stale_backup"))
    reproduction.run_variants(base.replace(steps=7), variants[:1], out, rerun=True)
    assert trained[-1] == ("a", 7) and len(trained) == 4
    # A field added to TrainConfig since the run (absent from its config.json) with its default: still reused.
    path = os.path.join(out, "runs", "a", "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["seed"]
    with open(path, "w") as f:
        json.dump(saved, f)
    assert reproduction.run_variants(base.replace(steps=7), variants[:1], out)[0]["reused"]
    assert not reproduction.run_variants(base.replace(steps=7, seed=3), variants[:1], out)[0]["reused"]


def test_write_fragment_and_duration(tmp_path):
    path = reproduction.write_fragment(str(tmp_path / "f.md"), "Title", ["Para."], "| a |", ["One."])
    assert open(path).read() == "## Title\n\nPara.\n\n| a |\n\nRemarks:\n\n- One.\n"
    assert reproduction.format_duration(59.6) == "1 min 00 s"
    assert reproduction.format_duration(3725) == "1 h 02 min"
    assert reproduction.command_line([os.path.join(ROOT, "experiments", "x.py"), "--a=b c"]) == \
        "python experiments/x.py '--a=b c'"


def test_fragments_go_where_the_user_points_and_into_docs_only_with_write_docs():
    assert reproduction.fragment_path("x") == ""  # the scripts' own OUTPUT_DIR copy only
    assert reproduction.fragment_path("x", "/tmp/a.md") == "/tmp/a.md"
    assert reproduction.fragment_path("x", write_docs=True) == os.path.join(ROOT, "docs", "results", "x.md")
    with pytest.raises(ValueError, match="--write_docs writes"):
        reproduction.fragment_path("x", "a.md", write_docs=True)
