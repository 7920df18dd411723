"""A run never touches another run's files before its own training starts, and the command line reports every
mistake in one line (exit status 2)."""

import json
import os
import subprocess
import sys

import pytest

from mtl_keras.config import TrainConfig
from mtl_keras.experiment import RUN_OUTPUTS, run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "experiments", "train.py")
TINY = dict(synthetic_num_train=4, synthetic_num_val=2, image_size=(32, 64), batch_size=2, steps=2,
            model="kendall_deeplabv3_resnet26_slim", num_sample_images=1, export=False,
            model_overrides=dict(backbone_width=8, aspp_channels=16, decoder_channels=16))


def _finished_run(folder):
    """A folder as a finished run leaves it (the contents are markers, so that any change is visible)."""
    folder.mkdir(parents=True)
    files = {"config.json": '{"marker": "old config"}', "metrics.json": '{"marker": "old metrics"}',
             "samples/val_07.png": "old picture", "eval/metrics.json": '{"marker": "old eval"}'}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def _contents(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


def test_a_finished_run_is_refused_without_overwrite_and_left_untouched(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    before = _contents(out)
    with pytest.raises(ValueError, match=r"holds a finished run .*--overwrite"):
        run_training(TrainConfig(output_dir=str(out), data_dir=str(tmp_path / "synthetic"), **TINY))
    assert _contents(out) == before
    assert not (tmp_path / "synthetic").exists()  # refused before the data were even generated


def test_a_run_failing_before_training_leaves_the_folder_as_it_was(tmp_path):
    # --overwrite is given, but the run fails on its data folder: the finished run there is not touched.
    out = tmp_path / "run"
    _finished_run(out)
    before = _contents(out)
    config = TrainConfig(output_dir=str(out), dataset="cityscapes", data_dir=str(tmp_path / "missing"),
                         overwrite=True, **TINY)
    with pytest.raises(FileNotFoundError, match="missing"):
        run_training(config)
    assert _contents(out) == before


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(ValueError, match="--output_dir .*notes.txt is a file; expected a folder"):
        run_training(TrainConfig(output_dir=str(path), data_dir=str(tmp_path / "synthetic"), **TINY))
    assert path.read_text() == "mine"


@pytest.mark.slow
def test_overwrite_replaces_every_output_of_the_finished_run(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    run_training(TrainConfig(output_dir=str(out), data_dir=str(tmp_path / "synthetic"), overwrite=True, **TINY),
                 verbose=0)
    assert not (out / "samples" / "val_07.png").exists() and not (out / "eval").exists()  # stale ones removed
    assert (out / "samples" / "val_00.png").exists()
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert "eval" in RUN_OUTPUTS and "samples" in RUN_OUTPUTS


@pytest.mark.parametrize("overrides, flag", [
    (dict(batch_size=0), "--batch_size"), (dict(image_size=(32,)), "--image_size"),
    (dict(scale_range=(2.0, 1.0)), "--scale_range"), (dict(cache="disk"), "--cache"),
    (dict(learning_rate=-1.0), "--learning_rate"), (dict(crop_size=(0, 8)), "--crop_size"),
])
def test_config_refuses_bad_settings_naming_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        TrainConfig(**overrides)


def _train_cli(tmp_path, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "MTL_KERAS_DEBUG"}  # the caller's, not the shell's
    full_env.update(env or {})
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=full_env)


@pytest.mark.subprocess
def test_cli_mistakes_are_one_line_with_exit_status_2(tmp_path):
    (tmp_path / "a_file").write_text("x")
    cases = [(["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
             (["--output_dir", "a_file"], "--output_dir a_file is a file"),
             (["--no_such_flag"], "no_such_flag"),
             (["--dataset", "cityscapes", "--data_dir", "nowhere"], "--data_dir 'nowhere' is not a folder")]
    for args, message in cases:
        result = _train_cli(tmp_path, *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert lines[0].startswith("train.py: error: ") and message in lines[0], (args, lines)
        assert len(lines) <= 2 and "Traceback" not in result.stderr, (args, lines)
    assert (tmp_path / "a_file").read_text() == "x" and not (tmp_path / "runs").exists()


@pytest.mark.subprocess
def test_cli_shows_the_traceback_when_asked(tmp_path):
    result = _train_cli(tmp_path, "--batch_size", "0", env={"MTL_KERAS_DEBUG": "1"})
    # The traceback, and still the exit status of a user's mistake.
    assert result.returncode == 2 and "Traceback" in result.stderr and "--batch_size must be" in result.stderr
