"""The benchmark (mtl_keras/benchmark.py, experiments/benchmark.py): Delta_m and the table against a hand-computed
example, the grid and its shards, protocol errors, and (subprocess) a killed grid that resumes and shards that merge
to the table of one process."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from mtl_keras import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmark.py")

# Two tasks, mixed directions: semantic mIoU (higher is better), depth errors (lower is better).
DIRECTIONS = {"semantic": {"semantic_miou": "higher"},
              "depth": {"depth_mean_error_px": "lower", "depth_rel_error": "lower"}}


def _protocol(tmp_path, **changes):
    data = {
        "name": "hand", "description": "hand-computed", "source": "tests", "tasks": DIRECTIONS,
        "metric_labels": {"semantic_miou": "mIoU"},
        "training": {"dataset": "synthetic", "image_size": [32, 64], "batch_size": 2, "steps": 4},
        "architectures": {"hps": {"model": "hps", "model_overrides": {"backbone_depth": 26, "backbone_width": 4}}},
        "weightings": {"equal": {}, "uncertainty": {}, "pcgrad": {}},
        "baseline": {"architecture": "hps", "weighting": "equal"}, "seeds": [0, 1], "notes": [],
    }
    data.update(changes)
    path = tmp_path / f"{data['name']}.json"
    path.write_text(json.dumps(data))
    return benchmark.load_protocol(str(path))


def test_delta_m_hand_computed():
    baseline = {"semantic_miou": 0.5, "depth_mean_error_px": 2.0, "depth_rel_error": 0.2}
    # semantic +10 %; depth: error 10 % lower (+10 %), relative error 10 % higher (-10 %) -> depth 0 -> (10 + 0) / 2
    assert benchmark.delta_m({"semantic_miou": 0.55, "depth_mean_error_px": 1.8, "depth_rel_error": 0.22},
                             baseline, DIRECTIONS) == pytest.approx(5.0)
    # every metric 20 % better -> +20
    assert benchmark.delta_m({"semantic_miou": 0.6, "depth_mean_error_px": 1.6, "depth_rel_error": 0.16},
                             baseline, DIRECTIONS) == pytest.approx(20.0)
    # semantic equal; depth error 50 % higher (-50 %), rel equal -> depth -25 -> (0 - 25) / 2
    assert benchmark.delta_m({"semantic_miou": 0.5, "depth_mean_error_px": 3.0, "depth_rel_error": 0.2},
                             baseline, DIRECTIONS) == pytest.approx(-12.5)
    assert math.isnan(benchmark.delta_m({"semantic_miou": 0.5}, baseline, DIRECTIONS))
    with pytest.raises(ValueError, match="baseline of 'semantic_miou' is 0"):
        benchmark.delta_m(baseline, {**baseline, "semantic_miou": 0.0}, DIRECTIONS)


def _write_cell(root, protocol, cell, metrics, step_seconds, memory_mb):
    folder = os.path.join(root, "cells", cell.name)
    os.makedirs(folder)
    config = benchmark.cell_config(protocol, cell, root)
    benchmark.prepare_cell_folder(protocol, cell, config)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"val": metrics}, f)
    with open(os.path.join(folder, benchmark.CELL_COST_FILE), "w") as f:
        json.dump({"median_step_seconds": step_seconds, "peak_memory_bytes": memory_mb * 2 ** 20}, f)


def _metrics(miou, error, rel):
    return {"semantic_miou": miou, "depth_mean_error_px": error, "depth_rel_error": rel}


def test_table_hand_computed(tmp_path):
    """Three methods (EW on 2 seeds, PCGrad on 2, uncertainty on 1), two tasks, mixed directions; every number of
    the expected rows worked out by hand."""
    protocol = _protocol(tmp_path)
    root = str(tmp_path / "grid")
    Cell = benchmark.Cell
    # Single-task baselines: seed 0 mIoU 0.4, errors 2.0 / 0.1; seed 1 mIoU 0.6, errors 2.0 / 0.3 -> mean 0.5, 2, 0.2
    _write_cell(root, protocol, Cell("hps", "equal", 0, "semantic"), {"semantic_miou": 0.4}, 0.05, 900)
    _write_cell(root, protocol, Cell("hps", "equal", 1, "semantic"), {"semantic_miou": 0.6}, 0.05, 900)
    _write_cell(root, protocol, Cell("hps", "equal", 0, "depth"),
                {"depth_mean_error_px": 2.0, "depth_rel_error": 0.1, "semantic_miou": 0.01}, 0.05, 900)
    _write_cell(root, protocol, Cell("hps", "equal", 1, "depth"),
                {"depth_mean_error_px": 2.0, "depth_rel_error": 0.3}, 0.05, 900)
    _write_cell(root, protocol, Cell("hps", "equal", 0), _metrics(0.55, 1.8, 0.22), 0.10, 1000)  # +5
    _write_cell(root, protocol, Cell("hps", "equal", 1), _metrics(0.45, 2.2, 0.18), 0.12, 1000)  # -5
    _write_cell(root, protocol, Cell("hps", "pcgrad", 0), _metrics(0.6, 1.6, 0.16), 0.25, 1500)  # +20, x2.5, x1.5
    _write_cell(root, protocol, Cell("hps", "pcgrad", 1), _metrics(0.6, 1.6, 0.16), 0.24, 1200)  # +20, x2.0, x1.2
    _write_cell(root, protocol, Cell("hps", "uncertainty", 0), _metrics(0.5, 3.0, 0.2), 0.11, 1000)  # -12.5

    rows, missing = benchmark.build_table(protocol, root, expected=benchmark.grid(protocol))
    assert missing == ["hps__uncertainty__seed1"]
    by_name = {(r["architecture"], r["weighting"]): r for r in rows}
    assert [(r["architecture"], r["weighting"]) for r in rows] == [
        ("STL", "equal"), ("hps", "equal"), ("hps", "uncertainty"), ("hps", "pcgrad")]
    stl = by_name["STL", "equal"]
    # seed 0: semantic -20 %, depth (0 + 50 %) / 2 -> (-20 + 25) / 2 = 2.5; seed 1: -2.5. The depth run's own
    # semantic_miou (0.01) is not a baseline: each single-task run gives its own task's metrics only.
    assert stl["delta_m"] == pytest.approx((0.0, math.sqrt(12.5)))
    assert stl["metrics"]["semantic_miou"] == pytest.approx((0.5, math.sqrt(0.02)))
    equal = by_name["hps", "equal"]
    assert equal["delta_m"] == pytest.approx((0.0, math.sqrt(50.0)))
    assert equal["metrics"]["depth_mean_error_px"] == pytest.approx((2.0, math.sqrt(0.08)))
    assert equal["step_time_vs_ew"] == pytest.approx(1.0) and equal["peak_memory_vs_ew"] == pytest.approx(1.0)
    pcgrad = by_name["hps", "pcgrad"]
    assert pcgrad["seeds"] == 2 and pcgrad["delta_m"] == pytest.approx((20.0, 0.0))
    assert pcgrad["step_time_vs_ew"] == pytest.approx((2.5 + 2.0) / 2)
    assert pcgrad["peak_memory_vs_ew"] == pytest.approx((1.5 + 1.2) / 2)
    assert pcgrad["step_seconds"] == pytest.approx(0.245) and pcgrad["peak_memory_mb"] == pytest.approx(1350)
    uncertainty = by_name["hps", "uncertainty"]
    assert uncertainty["seeds"] == 1 and uncertainty["delta_m"] == pytest.approx((-12.5, 0.0))
    assert uncertainty["step_time_vs_ew"] == pytest.approx(1.1)

    text = (tmp_path / "grid" / "table.md").read_text()
    assert "| hps | pcgrad | 2 | 0.6000 ± 0.0000 | 1.6000 ± 0.0000 | 0.1600 ± 0.0000 | 20.00 ± 0.00 | 2.25 | 1.35 |" in text
    assert "mIoU ↑" in text and "depth_rel_error ↓" in text
    assert "1 cell(s) of the grid not finished: hps__uncertainty__seed1" in text
    with open(tmp_path / "grid" / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["delta_m_std"]) == pytest.approx(math.sqrt(50.0))
    assert float(table[3]["step_time_vs_ew"]) == pytest.approx(2.25)
    assert os.path.getsize(tmp_path / "grid" / "delta_m_vs_cost.png") > 0


def test_grid_order_shards_and_seeds(tmp_path):
    protocol = _protocol(tmp_path)
    cells = benchmark.grid(protocol, weightings=["pcgrad"], seeds=3)
    # EW is always in (the cost reference); baselines first; the seeds continue past the protocol's list.
    assert [c.name for c in cells[:2]] == ["single_semantic__hps__equal__seed0", "single_semantic__hps__equal__seed1"]
    assert [c.name for c in cells if not c.is_baseline] == [
        "hps__equal__seed0", "hps__equal__seed1", "hps__equal__seed2",
        "hps__pcgrad__seed0", "hps__pcgrad__seed1", "hps__pcgrad__seed2"]
    assert len(cells) == 2 * 3 + 6
    shards = [benchmark.shard(cells, i, 4) for i in range(4)]
    assert sorted(c for part in shards for c in part) == sorted(cells)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert benchmark.parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            benchmark.parse_shard(bad)
    with pytest.raises(ValueError, match="--weightings: 'nash' is not in protocol 'hand'"):
        benchmark.grid(protocol, weightings=["nash"])
    config = benchmark.cell_config(protocol, cells[0], "root")
    assert config.tasks == ("semantic",) and config.weighting == "equal" and config.seed == 0
    assert config.output_dir == os.path.join("root", "cells", "single_semantic__hps__equal__seed0")
    assert not config.export and config.model_overrides == {"backbone_depth": 26, "backbone_width": 4}


@pytest.mark.parametrize("change, message", [
    ({"tasks": {"semantic": {"semantic_miou": "up"}}}, "direction must be 'higher' or 'lower'"),
    ({"tasks": {"semantic": {"depth_rel_error": "lower"}}}, "task 'semantic' has no metric 'depth_rel_error'"),
    ({"weightings": {"equal": {}, "magic": {}}}, "unknown weighting 'magic'"),
    ({"architectures": {"x": {"model": "no_such_model"}}}, "'model' must be a registered model"),
    ({"training": {"seed": 3}}, "which each cell sets"),
    ({"training": {"batch_size": 0}}, "--batch_size must be an integer >= 1"),
])
def test_protocol_errors_name_the_file(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as info:
        _protocol(tmp_path, **change)
    assert str(tmp_path / "hand.json") in str(info.value) and "\n" not in str(info.value)


def test_protocol_lookup_errors(tmp_path):
    with pytest.raises(ValueError, match="no such protocol; expected a JSON file or one of .*quick"):
        benchmark.load_protocol("no_such_protocol")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        benchmark.load_protocol(str(tmp_path / "broken.json"))
    (tmp_path / "partial.json").write_text("{}")
    with pytest.raises(ValueError, match="partial.json: missing key"):
        benchmark.load_protocol(str(tmp_path / "partial.json"))


def test_quick_protocol_is_the_issue_grid():
    protocol = benchmark.load_protocol("quick")
    assert {"equal", "uncertainty", "dwa", "pcgrad", "mgda", "cagrad", "nash_mtl", "famo"} <= set(protocol.weightings)
    assert len(protocol.architectures) >= 3 and len(protocol.seeds) >= 2
    assert protocol.training["dataset"] == "synthetic"


def test_changed_protocol_is_refused_before_touching_a_finished_cell(tmp_path):
    protocol = _protocol(tmp_path)
    root = str(tmp_path / "grid")
    cell = benchmark.Cell("hps", "equal", 0)
    config = benchmark.cell_config(protocol, cell, root)
    os.makedirs(config.output_dir)
    (tmp_path / "grid" / "cells" / cell.name / "config.json").write_text(config.replace(steps=8).to_json())
    with pytest.raises(ValueError, match=r"holds a run made with other settings \(steps\)"):
        benchmark.run_grid(protocol, [cell], root, jobs=0, on_event=lambda line: None)
    assert sorted(os.listdir(config.output_dir)) == ["config.json"]


# ----------------------------------------------------------------------------------- Real grids at a tiny size

def _tiny_protocol(tmp_path):
    from mtl_keras.data.synthetic import generate_synthetic_cityscapes

    data = generate_synthetic_cityscapes(str(tmp_path / "data"), num_train=8, num_val=4, height=32, width=64)
    protocol = {
        "name": "tiny", "description": "a tiny grid", "source": "tests", "tasks": DIRECTIONS, "metric_labels": {},
        # 4 batches of 2 per pass: 16 steps are 4 epochs, a backup after each to resume from
        "training": {"dataset": "synthetic", "data_dir": data, "image_size": [32, 64], "batch_size": 2, "steps": 16,
                     "deterministic": True, "flip": False},
        "architectures": {"hps": {"model": "hps", "model_overrides": {"backbone_depth": 26, "backbone_width": 4,
                                                                      "head_channels": 8}}},
        "weightings": {"equal": {}, "uncertainty": {}},
        "baseline": {"architecture": "hps", "weighting": "equal"}, "seeds": [0], "notes": [],
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(protocol))
    return str(path)


def _benchmark(protocol, root, *flags, **kwargs):
    return subprocess.Popen([sys.executable, SCRIPT, f"--protocol={protocol}", f"--output_dir={root}", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _table_without_cost(root):
    with open(os.path.join(root, "table.csv")) as f:
        rows = list(csv.DictReader(f))
    cost = ("step_time_vs_ew", "peak_memory_vs_ew", "step_seconds", "peak_memory_mb")
    return [{k: v for k, v in row.items() if k not in cost} for row in rows]


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.subprocess
def test_preempted_grid_resumes_and_shards_merge_to_the_same_table(tmp_path):
    protocol = _tiny_protocol(tmp_path)
    # Two shards side by side into one folder, then a merge.
    sharded = str(tmp_path / "sharded")
    shards = [_benchmark(protocol, sharded, f"--shard={i}/2", "--jobs=0") for i in range(2)]  # cells in-process
    for process in shards:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out
    loaded = benchmark.load_protocol(protocol)
    _, missing = benchmark.build_table(loaded, sharded, expected=benchmark.grid(loaded))  # the merge
    assert missing == []

    # One process, a child process per cell, preempted (SIGTERM to the grid alone, as Kubernetes sends it) once a
    # cell is finished and another has a backup: the grid passes it on; the cell backs up its step and stops.
    # (SIGKILL mid-run: tests/test_fault_tolerance.py.)
    single = str(tmp_path / "single")
    cells_dir = os.path.join(single, "cells")
    process = _benchmark(protocol, single, "--jobs=1", start_new_session=True)
    from mtl_keras import checkpointing

    stopped_in = None
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline and stopped_in is None:
        names = os.listdir(cells_dir) if os.path.isdir(cells_dir) else []
        done = [n for n in names if os.path.isfile(os.path.join(cells_dir, n, "metrics.json"))]
        partial = [n for n in names if n not in done
                   and checkpointing.read_state(os.path.join(cells_dir, n, "backup")).get("backups")]
        if done and partial:
            process.send_signal(signal.SIGTERM)
            stopped_in = partial[0]
        time.sleep(0.05)
    out, _ = process.communicate(timeout=120)
    assert stopped_in is not None, "the grid finished before it could be preempted mid-cell"
    assert process.returncode == 75, out  # EX_TEMPFAIL: requeue
    assert "SIGTERM: the 1 running cell(s) back up and stop" in out and "backed up and stopped" in out, out
    assert not os.path.exists(os.path.join(cells_dir, stopped_in, "metrics.json"))
    finished_before = {n: os.path.getmtime(os.path.join(cells_dir, n, "metrics.json")) for n in done}

    restart = _benchmark(protocol, single, "--jobs=1")
    out, _ = restart.communicate(timeout=600)
    assert restart.returncode == 0 and "4 of 4 cells finished" in out, out
    assert f"{len(done)} done" in out and "(1 resuming)" in out, out
    for name, mtime in finished_before.items():  # not trained again
        assert os.path.getmtime(os.path.join(cells_dir, name, "metrics.json")) == mtime
    with open(os.path.join(cells_dir, stopped_in, "metrics.json")) as f:
        assert json.load(f)["resumed_from_epoch"] >= 1
    # Deterministic cells: the resumed grid and the sharded one give the same metrics and Delta_m.
    assert _table_without_cost(single) == _table_without_cost(sharded)
    assert len(_table_without_cost(single)) == 3  # STL, equal, uncertainty
