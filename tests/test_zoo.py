"""Presets (models/*.json) against the registry, load_model by name and by path, and publish_run."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras import presets
from mtl_keras.config import TrainConfig
from mtl_keras.layers import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from tests.helpers import assert_outputs_close, load_script, random_images

publish = load_script("experiments/publish.py", "publish")  # publishing a run is train.py --publish's

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha256_of(path):
    """The file's SHA-256 hex digest by hashlib (mtl_keras.presets.file_sha256 is part of what is under test)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def builtin_presets():
    folder = presets.builtin_presets_dir()
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            found[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    return found


def tiny_model(name):
    """The registered model ``name``, loaded by name, at the small size of its preset's tiny_arguments."""
    return mtl_keras.load_model(name, **presets.get_preset(name)["tiny_arguments"])


def tiny_images(name, batch=2, seed=0):
    height, width = presets.preset_build_kwargs(presets.get_preset(name), tiny=True)["input_shape"][:2]
    return random_images(batch, height, width, seed=seed)


@pytest.fixture
def preset_dirs(tmp_path, monkeypatch):
    """Empty preset and weights folders searched before the built-in ones."""
    preset_dir, weights = tmp_path / "presets", tmp_path / "weights"
    preset_dir.mkdir()
    weights.mkdir()
    monkeypatch.setenv(presets.PRESETS_ENV, str(preset_dir))
    monkeypatch.setenv(presets.WEIGHTS_ENV, str(weights))
    return preset_dir, weights


# ----------------------------------------------------------------------------------------------------- presets
def test_presets_and_registry_match_both_ways():
    found = builtin_presets()
    assert found, f"no presets in {presets.builtin_presets_dir()}"
    registered = set(mtl_keras.list_models())
    architecture_presets = {name for name, p in found.items() if p["architecture"] == name}
    assert registered - architecture_presets == set(), "registered models without a preset in models/"
    assert architecture_presets - registered == set(), "presets of architectures that are not registered"
    for name, preset in found.items():
        assert preset["name"] == name
        assert preset["architecture"] in registered, name
    assert set(mtl_keras.list_presets()) >= registered


@pytest.mark.parametrize("name", sorted(builtin_presets()))
def test_preset_describes_inputs_classes_and_training(name):
    preset = presets.get_preset(name)
    args = preset["arguments"]
    assert {"tasks", "num_classes", "input_shape"} <= set(args)
    assert preset["input"]["mean"] == list(IMAGENET_MEAN_RGB) and preset["input"]["std"] == list(IMAGENET_STD_RGB)
    assert preset["input"]["range"] == [0, 255] and preset["input"]["color"] == "RGB"
    assert len(preset["classes"]["names"]) == args["num_classes"]
    assert all(0 <= c < args["num_classes"] for c in preset["classes"]["instance_classes"])
    assert all(s % preset["input"]["size_multiple"] == 0 for s in args["input_shape"][:2])
    training = preset["training"]
    if training.get("train_preset"):  # the paper's hyper-parameters agree with experiments/presets
        with open(os.path.join(ROOT, "experiments", "presets", f"{training['train_preset']}.json")) as f:
            paper = json.load(f)
        for key, value in training.items():
            if key in paper:
                assert paper[key] == value, (key, paper[key], value)
        assert TrainConfig.from_dict(paper).tasks == tuple(args["tasks"])
    weights = preset.get("weights")
    if weights:
        assert len(weights["sha256"]) == 64 and weights["file"].endswith((".weights.h5", ".keras"))


def test_preset_arguments_rebuild_the_architecture():
    """build_model(architecture, **arguments) gives a model whose config is the preset's arguments."""
    for name, preset in builtin_presets().items():
        if preset["architecture"] != name:
            continue
        model = presets.build_from_preset(name, input_shape=(32, 32, 3))  # full width, small input
        config = {k: v for k, v in model.get_config().items() if k not in ("name", "trainable")}
        assert config == dict(preset["arguments"], input_shape=[32, 32, 3]), name
        del model
        keras.backend.clear_session()


# -------------------------------------------------------------------------------------------------- round trip
@pytest.mark.subprocess
def test_every_registered_model_round_trips_through_a_keras_file_in_a_new_process(tmp_path):
    names = mtl_keras.list_models()
    expected = {}
    for name in names:
        model = tiny_model(name)
        images = tiny_images(name)
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}_images.npy", images)
        expected[name] = {k: np.asarray(v) for k, v in model(images, training=False).items()}
    code = (
        "import sys, numpy as np, mtl_keras\n"
        "folder = sys.argv[1]\n"
        "for name in sys.argv[2:]:\n"
        "    model = mtl_keras.load_model(f'{folder}/{name}.keras')\n"
        "    out = model(np.load(f'{folder}/{name}_images.npy'), training=False)\n"
        "    np.savez(f'{folder}/{name}_out.npz', **{k: np.asarray(v) for k, v in out.items()})\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), *names], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    for name in names:
        loaded = dict(np.load(tmp_path / f"{name}_out.npz"))
        assert_outputs_close(expected[name], loaded)


# -------------------------------------------------------------------------------------------------- load_model
NAME = "kendall_deeplabv3_resnet26_slim"


def write_trained_preset(folder, weights_file, name="tiny_trained", sha256=None):
    preset = dict(presets.get_preset(NAME), name=name, arguments=presets.preset_build_kwargs(presets.get_preset(NAME), tiny=True),
                  weights={"file": os.path.basename(weights_file), "sha256": sha256 or sha256_of(weights_file)})
    preset["arguments"] = {k: list(v) if isinstance(v, tuple) else v for k, v in preset["arguments"].items()}
    return presets.write_preset(preset, str(folder))


def test_load_model_by_name_loads_the_presets_weights_file(preset_dirs):
    preset_dir, weights = preset_dirs
    model = tiny_model(NAME)
    model.save_weights(weights / "tiny_trained.weights.h5")
    write_trained_preset(preset_dir, str(weights / "tiny_trained.weights.h5"))
    assert "tiny_trained" in mtl_keras.list_presets()
    loaded = mtl_keras.load_model("tiny_trained")
    images = tiny_images(NAME)
    assert_outputs_close(model(images, training=False), loaded(images, training=False))


def test_sha256_mismatch_is_a_clear_error_and_loads_nothing(preset_dirs, monkeypatch):
    preset_dir, weights = preset_dirs
    tiny_model(NAME).save_weights(weights / "tiny_trained.weights.h5")
    write_trained_preset(preset_dir, str(weights / "tiny_trained.weights.h5"), sha256="0" * 64)
    calls = []
    monkeypatch.setattr(keras.Model, "load_weights", lambda self, *a, **k: calls.append(a))
    monkeypatch.setattr(mtl_keras.registry, "model_entry_point",
                        lambda name: pytest.fail("the model was built despite the sha256 mismatch"))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        mtl_keras.load_model("tiny_trained")
    assert calls == []


def test_missing_weights_file_says_where_it_looked(preset_dirs):
    preset_dir, weights = preset_dirs
    tiny_model(NAME).save_weights(weights / "tiny_trained.weights.h5")
    write_trained_preset(preset_dir, str(weights / "tiny_trained.weights.h5"))
    os.remove(weights / "tiny_trained.weights.h5")
    with pytest.raises(FileNotFoundError, match="tiny_trained.weights.h5.*Looked in"):
        mtl_keras.load_model("tiny_trained")


def test_load_model_takes_weights_as_an_argument_weights_h5_or_keras(tmp_path):
    model = tiny_model(NAME)
    images = tiny_images(NAME)
    expected = model(images, training=False)
    model.save_weights(tmp_path / "w.weights.h5")
    model.save(tmp_path / "m.keras")
    tiny = {k: v for k, v in presets.get_preset(NAME)["tiny_arguments"].items()}
    for path in (tmp_path / "w.weights.h5", tmp_path / "m.keras"):
        loaded = mtl_keras.load_model(NAME, weights=path, **tiny)
        assert_outputs_close(expected, loaded(images, training=False))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        mtl_keras.load_model(NAME, weights=tmp_path / "w.weights.h5", sha256="f" * 64, **tiny)


def test_load_model_by_name_without_weights_builds_the_architecture():
    model = mtl_keras.load_model("mt_unet", input_shape=(32, 32, 3), base_filters=4)
    assert model.name == "mt_unet" and set(model.output) == {"semantic", "depth"}


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a model preset.*kendall_deeplabv3_resnet101"):
        mtl_keras.load_model("resnet9000")
    tiny_model(NAME).save_weights(tmp_path / "w.weights.h5")
    with pytest.raises(ValueError, match="weights only"):
        mtl_keras.load_model(tmp_path / "w.weights.h5")
    with pytest.raises(FileNotFoundError):
        mtl_keras.load_model(tmp_path / "missing.keras")


def test_load_model_keeps_safe_mode_on(tmp_path):
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        mtl_keras.load_model(tmp_path / "lambda.keras")


# ------------------------------------------------------------------------------------------------- publish_run
def make_run(folder, with_keras_file=True):
    """A finished training output folder of a tiny model (what experiments/train.py writes, minus the extras)."""
    tiny = presets.get_preset(NAME)["tiny_arguments"]
    config = TrainConfig(model=NAME, model_overrides={k: v for k, v in tiny.items() if k != "input_shape"},
                         image_size=tuple(tiny["input_shape"][:2]), output_dir=str(folder))
    os.makedirs(folder / "checkpoints")
    (folder / "config.json").write_text(config.to_json())
    model = mtl_keras.build_model(NAME, input_shape=tuple(tiny["input_shape"]), **config.model_overrides)
    if with_keras_file:
        model.save(folder / "model.keras")
    from mtl_keras.experiment import build_loss_weighting
    from mtl_keras.training import MultiTaskTrainer

    trainer = MultiTaskTrainer(model, build_loss_weighting(config, model.output.keys()))
    trainer.save_weights(folder / "checkpoints" / "last.weights.h5")
    (folder / "metrics.json").write_text(json.dumps({"model": NAME, "val": {"semantic_miou": 0.5},
                                                     "val_untrained": {"semantic_miou": 0.01}, "steps": 3}))
    return model


def test_publish_run_makes_a_named_model_with_weights_sha256_and_metrics(tmp_path, preset_dirs):
    preset_dir, weights = preset_dirs
    model = make_run(tmp_path / "run")
    path = publish.publish_run(tmp_path / "run", "slim_tiny_synthetic", weights_dir=weights, presets_dir=preset_dir)
    assert path == str(preset_dir / "slim_tiny_synthetic.json")
    preset = presets.get_preset("slim_tiny_synthetic")
    assert preset["architecture"] == NAME
    weights_file = weights / preset["weights"]["file"]
    assert preset["weights"]["sha256"] == sha256_of(weights_file)
    assert preset["metrics"] == {"semantic_miou": 0.5}
    assert preset["training"]["model"] == NAME and preset["classes"]["names"][0] == "road"
    loaded = mtl_keras.load_model("slim_tiny_synthetic")
    images = tiny_images(NAME)
    assert_outputs_close(model(images, training=False), loaded(images, training=False))
    with pytest.raises(FileExistsError):
        publish.publish_run(tmp_path / "run", "slim_tiny_synthetic", weights_dir=weights, presets_dir=preset_dir)
    with pytest.raises(ValueError, match="registered architecture"):
        publish.publish_run(tmp_path / "run", NAME, weights_dir=weights, presets_dir=preset_dir)


def test_a_run_without_model_keras_loads_from_its_last_checkpoint(tmp_path):
    from mtl_keras.experiment import load_run

    model = make_run(tmp_path / "run", with_keras_file=False)
    with pytest.raises(ValueError, match="unfinished run folder.*load_run"):  # the trainer's checkpoint: the run's
        mtl_keras.load_model(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    images = tiny_images(NAME)
    assert_outputs_close(model(images, training=False), loaded(images, training=False))


def _train_and_publish(tmp_path, name, *extra):
    from mtl_keras.data import generate_synthetic_cityscapes

    data = tmp_path / "synthetic"
    if not data.exists():
        generate_synthetic_cityscapes(str(data), num_train=4, num_val=2, height=64, width=128, seed=0)
    command = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--output_dir={tmp_path / 'run'}",
               f"--data_dir={data}", "--image_size=32,64", "--batch_size=2", "--steps=2", "--tasks=semantic,depth",
               "--export=false", "--val_batches=1", f"--publish={name}",
               f"--publish_weights_dir={tmp_path / 'weights'}", f"--publish_presets_dir={tmp_path / 'presets'}",
               *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.slow  # about 100 s: three train.py processes
@pytest.mark.subprocess
def test_train_publish_makes_a_model_loadable_by_name_and_refuses_a_bad_name_before_training(tmp_path,
                                                                                             monkeypatch):
    done = _train_and_publish(tmp_path, "slim_published_synthetic", "--publish_description=from the test")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published as 'slim_published_synthetic'" in done.stdout
    monkeypatch.setenv(presets.PRESETS_ENV, str(tmp_path / "presets"))
    monkeypatch.setenv(presets.WEIGHTS_ENV, str(tmp_path / "weights"))
    preset = presets.get_preset("slim_published_synthetic")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert preset["description"] == "from the test"
    assert preset["metrics"]["semantic_miou"] == pytest.approx(metrics["val"]["semantic_miou"])
    assert preset["weights"]["sha256"] == sha256_of(tmp_path / "weights" / "slim_published_synthetic.weights.h5")
    loaded = mtl_keras.load_model("slim_published_synthetic")
    saved = mtl_keras.load_model(str(tmp_path / "run" / "model.keras"))
    images = random_images(batch=1, height=32, width=64)
    assert_outputs_close(saved(images, training=False), loaded(images, training=False))

    # The same name again (no --publish_overwrite) and an architecture's name both fail before any training.
    for name, message in (("slim_published_synthetic", "exists"), ("mt_unet", "registered architecture")):
        again = _train_and_publish(tmp_path, name)
        assert again.returncode == 2 and message in again.stderr, again.stderr[-2000:]  # a user's mistake
        assert "epochs x" not in again.stderr  # the run never started


@pytest.mark.slow
def test_the_synthetic_default_model_loads_by_name_from_the_checkout_and_segments_synthetic_scenes(tmp_path):
    # The released weights: experiments/train.py's default job, committed beside its preset in models/. Loaded by
    # name and evaluated on the whole synthetic val split (the same 50 scenes the preset's metrics were measured on:
    # scene i depends only on (seed, split, i)), it must give the published quality: the floors allow the rounding
    # differences of another CPU, not a worse model. The bar (mIoU >= 0.5, depth <= 0.6 px) is checked too.
    from mtl_keras.data import generate_synthetic_cityscapes
    from mtl_keras.data.datasets import load_dataset
    from mtl_keras.evaluation import evaluate_model

    preset = presets.get_preset("kendall_deeplabv3_resnet26_slim_synthetic")
    published, untrained = preset["metrics"], preset["source"]["untrained_metrics"]
    model = mtl_keras.load_model("kendall_deeplabv3_resnet26_slim_synthetic")  # sha256 checked first
    data = generate_synthetic_cityscapes(str(tmp_path / "synthetic"), num_train=1, num_val=50, seed=0)
    val = load_dataset("synthetic", data, "val", image_size=(128, 256), batch_size=10, num_classes=19)
    measured = evaluate_model(model, val, 19, ("semantic", "instance", "depth"))
    assert measured["num_images"] == published["num_images"] == 50
    assert measured["semantic_miou"] >= published["semantic_miou"] - 0.01 >= 0.5
    assert measured["depth_mean_error_px"] <= published["depth_mean_error_px"] + 0.01 <= 0.6
    assert measured["instance_mean_error_px"] <= published["instance_mean_error_px"] + 0.05
    assert measured["instance_mean_error_px"] < 0.2 * untrained["instance_mean_error_px"]
