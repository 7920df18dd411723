"""experiments/evaluate.py keeps each evaluated model's and split's outputs apart and never mixes two evaluations."""

import os

import pytest

from tests.helpers import load_script

evaluate = load_script("experiments/evaluate.py", "evaluate_script")


@pytest.mark.parametrize("kind, model_path, split, expected", [
    ("run", "runs/a", "val", "runs/a/eval"),
    ("run", "runs/a", "test", "runs/a/eval_test"),
    ("keras", "runs/a/model.keras", "val", "runs/a/eval_model"),
    ("saved_model", "runs/a/export", "val", "runs/a/eval_export"),
    ("saved_model", "runs/a/export/", "train", "runs/a/eval_export_train"),
])
def test_default_output_dir_is_one_folder_per_model_and_split(tmp_path, kind, model_path, split, expected):
    info = {"kind": kind, "model_path": str(tmp_path / model_path),
            "run_dir": str(tmp_path / "runs" / "a")}
    assert evaluate.default_output_dir(info, split) == str(tmp_path / expected)


def test_a_model_file_outside_a_run_folder_is_evaluated_next_to_it(tmp_path):
    info = {"kind": "keras", "model_path": str(tmp_path / "models" / "net.keras"), "run_dir": None}
    assert evaluate.default_output_dir(info, "val") == str(tmp_path / "models" / "eval_net")


def test_an_earlier_evaluation_is_replaced_whole(tmp_path):
    out = tmp_path / "eval"
    (out / "images").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "images" / "07_old_panel.png").write_text("stale")
    evaluate.prepare_output_dir(str(out))
    assert out.is_dir() and os.listdir(out) == []


def test_a_folder_with_other_files_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds files that are not an earlier evaluation"):
        evaluate.prepare_output_dir(str(out))
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        evaluate.prepare_output_dir(str(tmp_path / "file"))


def test_a_preset_is_evaluated_into_eval_name_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = {"kind": "preset", "model_path": "kendall_deeplabv3_resnet26_slim_synthetic", "run_dir": None}
    assert evaluate.default_output_dir(info, "val") == str(tmp_path / "eval_kendall_deeplabv3_resnet26_slim_synthetic")


@pytest.mark.parametrize("kind, model_path", [("keras", "runs/a/model.keras"), ("saved_model", "runs/a/export")])
def test_an_export_or_model_file_never_writes_into_the_runs_own_eval(tmp_path, kind, model_path):
    run = tmp_path / "runs" / "a"
    (run / "eval").mkdir(parents=True)
    (run / "model.keras").write_text("a run's model")
    info = {"kind": kind, "model_path": str(tmp_path / model_path), "run_dir": str(run)}
    with pytest.raises(ValueError, match="the run's own evaluation folder"):
        evaluate.check_not_the_runs_eval(info, str(run / "eval"))
    with pytest.raises(ValueError, match="the run's own evaluation folder"):
        evaluate.check_not_the_runs_eval(dict(info, run_dir=None), str(run / "eval") + "/")  # no config.json
    evaluate.check_not_the_runs_eval(info, evaluate.default_output_dir(info, "val"))  # its own folder is fine
    evaluate.check_not_the_runs_eval(dict(info, kind="run", model_path=str(run)), str(run / "eval"))


def _info(model_tasks, config_tasks=None, outputs=None):
    from mtl_keras.export import OUTPUT_NAMES

    outputs = outputs or {t: OUTPUT_NAMES[t] for t in model_tasks}
    config = {"tasks": list(config_tasks)} if config_tasks else None
    return {"kind": "saved_model", "model_path": "/runs/a/export", "run_dir": "/runs/a" if config else None,
            "config": config, "model_tasks": list(model_tasks), "outputs": outputs}


def test_the_tasks_evaluated_are_the_flag_s_else_the_run_s_else_the_dataset_s():
    full = _info(("semantic", "instance", "depth", "normals"), config_tasks=("depth", "semantic"))
    assert evaluate.tasks_to_evaluate(full, "synthetic", ["depth"]) == ["depth"]
    assert evaluate.tasks_to_evaluate(full, "synthetic") == ["semantic", "depth"]  # the run's, in task order
    no_config = _info(("semantic", "instance", "depth", "normals"))
    assert evaluate.tasks_to_evaluate(no_config, "synthetic") == ["semantic", "instance", "depth"]
    assert evaluate.tasks_to_evaluate(no_config, "nyuv2_npy") == ["semantic", "depth", "normals"]
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.tasks_to_evaluate(no_config, "synthetic", ["semantics"])


@pytest.mark.parametrize("config_tasks, source", [(("semantic", "instance", "depth"), "/runs/a/config.json"),
                                                  (None, "dataset synthetic")])
def test_a_task_without_an_output_is_one_line_naming_the_path_and_the_output(config_tasks, source):
    info = _info(("semantic", "depth"), config_tasks=config_tasks)
    with pytest.raises(ValueError) as error:
        evaluate.tasks_to_evaluate(info, "synthetic")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("/runs/a/export has no output for task(s) instance (instance_vectors)")
    assert source in message and "--tasks=semantic,depth" in message
    with pytest.raises(ValueError, match=r"no output for task\(s\) normals \(normals\)"):
        evaluate.tasks_to_evaluate(info, "synthetic", ["semantic", "normals"])


def test_delta_m_sign_convention():
    """LibMTL's count_improvement, as the benchmark's table: positive = better than single-task."""
    single = {"miou": 0.50, "depth_err": 1.0}
    better = {"miou": 0.55, "depth_err": 0.9}  # +10 % mIoU, -10 % error
    hib = {"miou": True, "depth_err": False}
    assert evaluate.delta_m(better, single, hib) == pytest.approx(10.0)
    worse = {"miou": 0.45, "depth_err": 1.2}  # -10 %, +20 %
    assert evaluate.delta_m(worse, single, hib) == pytest.approx(-15.0)
    # two metrics of one task are averaged first: depth (-10 % + 30 %) / 2 = +10 %, semantic 0 -> 5
    two = {"depth_mean_error_px": False, "depth_rel_error": False, "semantic_miou": True}
    base = {"depth_mean_error_px": 1.0, "depth_rel_error": 0.1, "semantic_miou": 0.5}
    assert evaluate.delta_m({"depth_mean_error_px": 1.1, "depth_rel_error": 0.07, "semantic_miou": 0.5}, base,
                            two) == pytest.approx(5.0)
    assert evaluate.delta_m({"miou": 0.55, "depth_err": 1.1}, single, hib) == pytest.approx(0.0)
    with pytest.raises(KeyError):
        evaluate.delta_m({"miou": 0.5}, single, hib)
    with pytest.raises(ValueError):
        evaluate.delta_m(better, {"miou": 0.0, "depth_err": 1.0}, hib)
