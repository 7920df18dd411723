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
