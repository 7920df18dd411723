"""Behaviours the code documents but no other test checked: one focused test per claim, each against an expectation
of its own (not the code's output). A claim the code does not meet is kept as a strict xfail naming what is wrong."""

import json
import logging
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import mtl_keras  # noqa: E402
from mtl_keras import checkpointing, distribution, presets  # noqa: E402
from mtl_keras.tasks import TASK_NAMES  # noqa: E402
from tests.helpers import load_script, tiny_kendall_kwargs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
TINY_SLIM = dict(model="kendall_deeplabv3_resnet26_slim",
                 model_overrides=dict(backbone_width=8, aspp_channels=16, decoder_channels=16))
MALFORMED_JSON = '{"cluster": {"worker": ["a:1",'  # cut short: not JSON


def _h5_arrays(path):
    """{dataset path: array} of every dataset in an HDF5 file (a .weights.h5), read with h5py alone."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


# ------------------------------------------------------------------------------------------------------------------
# Claims 1 and 5: two logical CPU replicas (set before TensorFlow initialises: in a subprocess)
# ------------------------------------------------------------------------------------------------------------------

_TWO_REPLICAS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from mtl_keras import distribution
    distribution.configure_cpu_replicas(2)
    import keras
    from mtl_keras import experiment
    from mtl_keras.config import TrainConfig
    from mtl_keras.data import generate_synthetic_cityscapes

    work = sys.argv[1]
    data = generate_synthetic_cityscapes(os.path.join(work, "data"), num_train=4, num_val=2, height=32, width=64)
    base = TrainConfig(data_dir=str(data), image_size=(32, 64), batch_size=4, steps=1, strategy="mirrored",
                       cpu_replicas=2, tasks=("semantic", "depth"), export=False, val_batches=1, num_sample_images=1,
                       model=sys.argv[2], model_overrides=json.loads(sys.argv[3]))
    result = {}

    # Claim 5: a global batch of 3 over 2 replicas.
    odd_dir = os.path.join(work, "odd")
    try:
        experiment.run_training(base.replace(batch_size=3, output_dir=odd_dir), verbose=0)
        result["odd_batch_error"] = None
    except ValueError as e:
        result["odd_batch_error"] = str(e)
    result["odd_dir_created"] = os.path.exists(odd_dir)

    # Claim 1: the batch-norm layers of the model run_training builds, with and without --sync_batchnorm. The run
    # stops (a sentinel exception) right after the model is set up, before any training.
    class Stop(Exception):
        pass

    built, replicas = [], []
    real_build, real_strategy = experiment.build_model, experiment.distribution.create_strategy

    def spy_build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def spy_strategy(*args, **kwargs):
        strategy = real_strategy(*args, **kwargs)
        replicas.append(int(strategy.num_replicas_in_sync))
        return strategy

    def stop(*args, **kwargs):
        raise Stop()

    experiment.build_model = spy_build
    experiment.distribution.create_strategy = spy_strategy
    experiment.build_loss_weighting = stop  # called right after the batch-norm setting
    for sync in (True, False):
        built.clear()
        replicas.clear()
        try:
            experiment.run_training(base.replace(sync_batchnorm=sync, output_dir=os.path.join(work, f"s{sync}")),
                                    verbose=0)
        except Stop:
            pass
        layers = [l for l in built[0]._flatten_layers(include_self=False, recursive=True)
                  if isinstance(l, keras.layers.BatchNormalization)]
        result[f"sync={sync}"] = {"replicas": replicas, "batch_norm_layers": len(layers),
                                  "synchronized": [bool(l.synchronized) for l in layers]}
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def two_replica_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("two_replicas")
    proc = subprocess.run([sys.executable, "-c", _TWO_REPLICAS_SCRIPT, str(work), TINY_SLIM["model"],
                           json.dumps(TINY_SLIM["model_overrides"])], env=ENV, cwd=str(work), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "RESULT " in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.tf_only
@pytest.mark.subprocess
def test_claim1_nosync_batchnorm_keeps_per_replica_statistics_and_the_default_synchronises(two_replica_results):
    synced, per_replica = two_replica_results["sync=True"], two_replica_results["sync=False"]
    for run in (synced, per_replica):
        assert run["replicas"] == [2]  # a real mirrored strategy over 2 logical CPUs
        assert run["batch_norm_layers"] > 10  # the ResNet-26 encoder, ASPP and decoder batch norms
    assert all(synced["synchronized"])  # default: statistics all-reduced over the replicas
    assert not any(per_replica["synchronized"])  # --nosync_batchnorm: each replica its own slice's statistics


@pytest.mark.tf_only
@pytest.mark.subprocess
def test_claim5_global_batch_not_divisible_by_the_replicas_is_refused_naming_batch_size(two_replica_results):
    message = two_replica_results["odd_batch_error"]
    assert message is not None, "batch 3 over 2 replicas was accepted"
    assert "--batch_size" in message and "3" in message and "2 replicas" in message
    assert not two_replica_results["odd_dir_created"]  # refused before anything is written


# ------------------------------------------------------------------------------------------------------------------
# Claims 2 and 3: divergence
# ------------------------------------------------------------------------------------------------------------------

def test_claim2_an_infinite_loss_stops_training_with_the_divergence_error():
    from mtl_keras.training import MultiTaskTrainer
    from mtl_keras.weighting import FixedWeighting

    tasks = ("semantic", "depth")
    model = mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=tasks, num_classes=3, input_shape=(32, 32, 3),
                                  output_stride=16, **tiny_kendall_kwargs())
    trainer = MultiTaskTrainer(model, FixedWeighting(tasks, task_weights=[0.5, 0.5]))
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    depth = rng.uniform(0, 2, (8, 32, 32, 1)).astype("float32")
    depth[4:] = np.inf  # batch 2 of 4: an infinite target with no mask (every pixel valid): L1 = +inf, not NaN
    targets = {"semantic": rng.integers(0, 3, (8, 32, 32)).astype("int32"), "depth": depth}
    dataset = tf.data.Dataset.from_tensor_slices((images, targets)).batch(4)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(dataset, epochs=3, steps_per_epoch=2, verbose=0, callbacks=[checkpointing.DivergenceGuard()])
    message = str(error.value)
    assert "diverged at epoch 1, step 2" in message and "loss=inf" in message
    assert "=nan" not in message.lower()  # the infinity itself is reported
    assert int(trainer.optimizer.iterations.numpy()) == 2  # stopped at once: no step after the infinite loss


@pytest.mark.slow  # 20 to 40 s: a tiny run_training
def test_claim3_after_divergence_the_last_checkpoint_is_the_last_good_epochs(tmp_path, monkeypatch):
    from mtl_keras.config import TrainConfig
    from mtl_keras.data import generate_synthetic_cityscapes
    from mtl_keras.data import datasets
    from mtl_keras.experiment import run_training

    data = generate_synthetic_cityscapes(str(tmp_path / "data"), num_train=4, num_val=2, height=32, width=64)
    real_load = datasets.load_dataset

    def load_with_nan_images_from_epoch_2(*args, **kwargs):
        ds = real_load(*args, **kwargs)
        if args[2] != "train":
            return ds
        # 2 steps per epoch: the images turn NaN from the first batch of epoch 2 on (PNGs cannot hold NaN)
        return ds.enumerate().map(lambda i, example: (tf.where(i >= 2, np.float32(np.nan), example[0]), example[1]))

    monkeypatch.setattr(datasets, "load_dataset", load_with_nan_images_from_epoch_2)
    out = tmp_path / "run"
    config = TrainConfig(data_dir=str(data), image_size=(32, 64), batch_size=2, steps=4, output_dir=str(out),
                         tasks=("semantic", "depth"), export=False, val_batches=1, num_sample_images=1, **TINY_SLIM)
    with pytest.raises(FloatingPointError, match="diverged"):
        run_training(config, verbose=0)

    state = checkpointing.read_state(str(out / "backup"))
    assert [b["epoch"] for b in state["backups"]] == [1]  # epoch 1 was good, epoch 2 diverged
    checkpoint = _h5_arrays(out / "checkpoints" / "last.weights.h5")
    last_good = _h5_arrays(out / "backup" / state["backups"][0]["file"])
    assert checkpoint and set(checkpoint) == set(last_good)
    for name, value in checkpoint.items():
        if np.issubdtype(value.dtype, np.floating):
            assert np.all(np.isfinite(value)), name
        np.testing.assert_array_equal(value, last_good[name], err_msg=name)


# ------------------------------------------------------------------------------------------------------------------
# Claim 4: safe_mode in experiments/evaluate.py
# ------------------------------------------------------------------------------------------------------------------

def test_claim4_evaluate_refuses_a_keras_file_with_a_lambda_layer(tmp_path):
    marker = str(tmp_path / "code_ran")

    def build():
        inputs = keras.Input((4,))
        # Arbitrary code: the lambda creates the marker file whenever it runs (also when a loader rebuilds it).
        outputs = keras.layers.Lambda(lambda x: (open(marker, "a").close(), x * 2.0)[1], output_shape=(4,))(inputs)
        return keras.Model(inputs, outputs)

    path = str(tmp_path / "lambda.keras")
    build().save(path)
    if os.path.exists(marker):
        os.remove(marker)
    evaluate = load_script("experiments/evaluate.py", "evaluate_script")
    with pytest.raises(ValueError, match="safe_mode"):
        evaluate.load_predictor(path)
    assert not os.path.exists(marker)  # the code in the file never ran
    # Control: the same file loaded unsafely brings the code back, and it runs: the refusal above is what kept it out.
    unsafe = keras.saving.load_model(path, safe_mode=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unsafe(np.ones((1, 4), "float32"))), 2.0)
    assert os.path.exists(marker)


# ------------------------------------------------------------------------------------------------------------------
# Claim 6: malformed JSON names the file
# ------------------------------------------------------------------------------------------------------------------

def _camera_json(tmp_path, monkeypatch):
    from mtl_keras.data.cityscapes import cityscapes_source
    from tests.test_data_miniatures import write_cityscapes_miniature

    split = write_cityscapes_miniature(tmp_path / "cs")
    camera = split["train"][1][0]["camera"]
    with open(camera, "w") as f:
        f.write('{"extrinsic": {"baseline": 0.209313,')
    with pytest.raises(ValueError) as error:
        cityscapes_source(str(tmp_path / "cs"), "train", image_size=(8, 12), tasks=("depth",), depth_target="metric")
    return camera, str(error.value)


def _run_config_evaluate(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")  # a run folder; its config.json is read first
    (run / "config.json").write_text('{"model": "mt_unet", "tasks": ["semantic",')
    evaluate = load_script("experiments/evaluate.py", "evaluate_script")
    with pytest.raises(ValueError) as error:
        evaluate.load_predictor(str(run))
    return str(run / "config.json"), str(error.value)


def _run_config_zoo(tmp_path, monkeypatch):
    from mtl_keras.experiment import load_run

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.weights.h5").write_bytes(b"")
    (run / "config.json").write_text('{"model": "mt_unet", "tasks": ["semantic",')
    with pytest.raises(ValueError) as error:
        load_run(str(run))
    return str(run / "config.json"), str(error.value)


def _backup_state(tmp_path, monkeypatch):
    # Documented: an unreadable state.json is ignored with a warning (a fresh start), not an error.
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / checkpointing.STATE_FILE).write_text('{"backups": [{"epoch": 1,')
    logger = logging.getLogger("mtl_keras")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert checkpointing.read_state(str(backup)) == {}
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings, "no warning"
    return str(backup / checkpointing.STATE_FILE), " ".join(warnings)


def _preset(tmp_path, monkeypatch):
    preset_dir = tmp_path / "presets"
    preset_dir.mkdir()
    monkeypatch.setenv(presets.PRESETS_ENV, str(preset_dir))
    (preset_dir / "broken_preset.json").write_text('{"name": "broken_preset", "architecture": "mt_unet",')
    with pytest.raises(ValueError) as error:
        mtl_keras.load_model("broken_preset")
    return str(preset_dir / "broken_preset.json"), str(error.value)


def _tf_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", MALFORMED_JSON)
    with pytest.raises(ValueError) as error:
        distribution.task_info()
    return "TF_CONFIG", str(error.value)


def _json_error_case(name, reason=None):
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(name, marks=marks, id=name)


MALFORMED_JSON_CASES = {
    "camera": _camera_json,
    "run_config_evaluate": _run_config_evaluate,
    "run_config_zoo": _run_config_zoo,
    "backup_state": _backup_state,
    "preset": _preset,
    "tf_config": _tf_config,
}


@pytest.mark.parametrize("case", [_json_error_case(name) for name in MALFORMED_JSON_CASES])
def test_claim6_malformed_json_is_a_clear_error_naming_the_file(tmp_path, monkeypatch, case):
    where, message = MALFORMED_JSON_CASES[case](tmp_path, monkeypatch)
    assert where in message, message


# ------------------------------------------------------------------------------------------------------------------
# Claim 7: weights of another architecture
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["mt_unet", "narrower_slim"])
def test_claim7_weights_of_another_architecture_or_width_are_a_clear_error(tmp_path, source):
    tiny_slim = presets.get_preset("kendall_deeplabv3_resnet26_slim")["tiny_arguments"]
    path = str(tmp_path / f"{source}.weights.h5")
    if source == "mt_unet":
        other = mtl_keras.load_model("mt_unet", **presets.get_preset("mt_unet")["tiny_arguments"])
    else:  # the same architecture at half the backbone width
        other = mtl_keras.load_model("kendall_deeplabv3_resnet26_slim", **dict(tiny_slim, backbone_width=8))
    other.save_weights(path)
    with pytest.raises((ValueError, OSError)) as error:
        mtl_keras.load_model("kendall_deeplabv3_resnet26_slim", weights=path, **dict(tiny_slim, backbone_width=16))
    message = " ".join(str(error.value).split())
    assert path in message  # names the file that does not fit
    assert "could not be loaded" in message or "shape" in message
    # Control: the matching architecture and width loads the same kind of file without complaint.
    if source == "narrower_slim":
        loaded = mtl_keras.load_model("kendall_deeplabv3_resnet26_slim", weights=path, **dict(tiny_slim,
                                                                                             backbone_width=8))
        for a, b in zip(loaded.get_weights(), other.get_weights()):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------------------------
# Claim 8: NaN in the .npy release
# ------------------------------------------------------------------------------------------------------------------

def _nan_release(root, field):
    """A one-example NYUv2 .npy release (6x8) with NaN at pixel (2, 3) of ``field``; returns (paths, example)."""
    from tests.test_data_miniatures import write_npy_release
    from tests.test_data_miniatures import npy_examples

    example = npy_examples(1, 6, 8, 0, 13)[0]
    example[field] = example[field].copy()
    example[field][2, 3] = np.nan
    return write_npy_release(root, "val", [example])[0], example


@pytest.mark.parametrize("field", [
    "depth",
    "normal"])
def test_claim8_nan_depth_and_normals_in_the_npy_release_are_masked_as_invalid(tmp_path, field):
    from mtl_keras.data import load_nyuv2_npy

    _, example = _nan_release(tmp_path, field)
    (image, targets), = list(load_nyuv2_npy(tmp_path, "val", image_size=(6, 8), batch_size=1, flip=False))
    key = {"depth": "depth", "normal": "normals"}[field]
    value, mask = targets[key].numpy()[0], targets[f"{key}_mask"].numpy()[0, ..., 0]
    # Independent expectation from the docstring: valid = stored value finite and (depth) > 0 / (normals) not
    # all-zero; invalid pixels are 0 with mask 0.
    stored = example[field]
    valid = np.isfinite(stored).all(-1) & ((stored[..., 0] > 0) if field == "depth" else np.any(stored != 0, -1))
    assert not valid[2, 3] and valid.sum() > 30
    np.testing.assert_array_equal(mask, valid.astype(np.float32))
    np.testing.assert_array_equal(value, np.where(valid[..., None], stored, 0.0))
    assert np.all(np.isfinite(value))


@pytest.mark.parametrize("field,message", [("image", "image values outside"), ("label", "label values outside")])
def test_claim8_nan_images_and_labels_in_the_npy_release_are_refused_naming_the_file(tmp_path, field, message):
    from mtl_keras.data import load_nyuv2_npy

    paths, _ = _nan_release(tmp_path, field)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(load_nyuv2_npy(tmp_path, "val", image_size=(6, 8), batch_size=1))
    assert message in str(error.value) and paths[field] in str(error.value)


@pytest.mark.parametrize("field,refused", [
    ("image", True),
    ("label", True), ("depth", False), ("normal", False)])
def test_claim8_prepare_data_check_flags_exactly_the_nan_the_loader_refuses(tmp_path, field, refused):
    """validate.py (prepare_data.py --check) documents the .npy value checks "as the loader checks them"."""
    from tests.helpers import load_script

    validate_dataset = load_script("experiments/data_checks.py", "data_checks").validate_dataset

    paths, _ = _nan_release(tmp_path, field)
    report, = validate_dataset("nyuv2_npy", str(tmp_path), splits=("val",), workers=1)
    flagged = [path for path, _ in report.errors]
    assert flagged == ([paths[field]] if refused else []), report.errors


# ------------------------------------------------------------------------------------------------------------------
# Claim 9: unknown --tasks on the command line
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_claim9_unknown_task_on_the_command_line_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--tasks", "semantic,edges",
                           "--output_dir", str(out)], cwd=str(work), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]  # a user's mistake: exit status 2, as argparse's
    text = proc.stderr + proc.stdout
    assert "edges" in text, text[-2000:]
    for valid in TASK_NAMES:
        assert valid in text.split("edges", 1)[1], (valid, text[-2000:])  # listed as valid, after the bad name
    assert "Traceback" not in text  # one clear message
    assert os.listdir(out) == [] and os.listdir(work) == []  # nothing written, no data generated
