"""Preset folders (keras-hub's save_to_preset / from_preset) and the preset summaries."""

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
from mtl_keras.models import KendallMultiTaskModel, MTUNet
from tests.helpers import random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(name):
    return presets.build_from_preset(name, tiny=True)


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_architecture_round_trips_through_a_preset_folder_in_a_fresh_process(tmp_path):
    expected = {}
    for name in mtl_keras.list_models():
        model = _tiny(name)
        # Trained-looking weights (not the initialisation a fresh build would reproduce): moving statistics too.
        rng = np.random.default_rng(0)
        model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) ** 2 for w in model.get_weights()])
        height, width = model.input.shape[1:3]
        images = random_images(2, height, width, seed=1)
        np.save(tmp_path / f"{name}.images.npy", images)
        expected[name] = {k: keras.ops.convert_to_numpy(v) for k, v in model(images, training=False).items()}
        model.save_to_preset(str(tmp_path / name), metrics={"semantic_miou": 0.5})
    code = ("import sys, numpy as np, mtl_keras, keras\n"
            "for name in sys.argv[2:]:\n"
            "    m = mtl_keras.from_preset(f'{sys.argv[1]}/{name}')\n"
            "    out = m(np.load(f'{sys.argv[1]}/{name}.images.npy'), training=False)\n"
            "    np.savez(f'{sys.argv[1]}/{name}.out.npz', **{k: keras.ops.convert_to_numpy(v) for k, v in "
            "out.items()})\n"
            "    print(name, type(m).__name__, m.count_params())\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *expected], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, outputs in expected.items():
        loaded = dict(np.load(tmp_path / f"{name}.out.npz"))
        assert set(loaded) == set(outputs), name
        for key in outputs:
            np.testing.assert_allclose(loaded[key], outputs[key], atol=1e-5, rtol=1e-5, err_msg=f"{name} {key}")
        metadata = json.loads((tmp_path / name / "metadata.json").read_text())
        digest = hashlib.sha256((tmp_path / name / "model.weights.h5").read_bytes()).hexdigest()
        assert metadata["weights"]["sha256"] == digest and metadata["metrics"] == {"semantic_miou": 0.5}
        assert metadata["architecture"] == name and metadata["tasks"] == list(outputs)


def test_a_preset_folder_with_other_weights_is_refused(tmp_path):
    model = _tiny("kendall_deeplabv3_resnet26_cpu")
    folder = model.save_to_preset(str(tmp_path / "p"))
    weights = os.path.join(folder, "model.weights.h5")
    data = bytearray(open(weights, "rb").read())
    data[-100] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        mtl_keras.from_preset(folder)


def test_from_preset_of_a_class_checks_the_class(tmp_path):
    folder = _tiny("mt_unet").save_to_preset(str(tmp_path / "unet"))
    assert isinstance(MTUNet.from_preset(folder), MTUNet)
    with pytest.raises(ValueError, match="holds a MTUNet, not a KendallMultiTaskModel"):
        KendallMultiTaskModel.from_preset(folder)


def test_save_to_preset_never_replaces_a_preset_unasked(tmp_path):
    model = _tiny("kendall_deeplabv3_resnet26_cpu")
    folder = model.save_to_preset(str(tmp_path / "p"), description="first")
    before = open(os.path.join(folder, "metadata.json")).read()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_to_preset(folder, description="second")
    assert open(os.path.join(folder, "metadata.json")).read() == before
    model.save_to_preset(folder, description="second", overwrite=True)
    assert json.loads(open(os.path.join(folder, "metadata.json")).read())["description"] == "second"
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no staging folder left behind


def test_a_preset_whose_config_runs_code_is_refused(tmp_path):
    """safe_mode: a Lambda layer in config.json is not deserialised, so its code never runs."""
    marker = tmp_path / "ran"
    inputs = keras.Input((4,))
    # The Lambda writes `marker` whenever it runs (rebuilding the graph runs it once).
    outputs = keras.layers.Lambda(lambda x, path: (open(path, "w").close(), x * 2)[1],
                                  arguments={"path": str(marker)})(inputs)
    model = keras.Model(inputs, outputs)
    folder = mtl_keras.save_to_preset(model, str(tmp_path / "evil"))
    os.remove(marker)  # written when the model above was built
    with pytest.raises(ValueError, match="config.json"):
        mtl_keras.from_preset(folder)
    assert not marker.exists()
    mtl_keras.from_preset(folder, safe_mode=False)  # the control: without safe_mode the code runs
    assert marker.exists()


def test_list_presets_summarises_each_preset():
    summaries = mtl_keras.list_presets()
    assert set(summaries) >= set(mtl_keras.list_models())
    paper = summaries["kendall_deeplabv3_resnet101"]
    assert paper["parameters"] == 58_859_414 and paper["tasks"] == ["semantic", "instance", "depth"]
    assert "backbone_weights='imagenet'" in paper["weights"]
    trained = summaries["kendall_deeplabv3_resnet26_slim_synthetic"]
    assert trained["weights"].startswith("present: ") and trained["dataset"] == "synthetic"
    assert 0.5 < trained["metrics"]["semantic_miou"] <= 1
    table = str(summaries)
    assert table.splitlines()[0].split()[:3] == ["name", "architecture", "parameters"]
    assert "58,859,414" in table


def test_a_missing_weights_file_says_where_to_put_it(tmp_path, monkeypatch):
    preset = presets.get_preset("kendall_deeplabv3_resnet26_slim_synthetic")
    preset = {k: v for k, v in preset.items() if not k.startswith("_")}
    preset["name"] = "elsewhere"
    presets.write_preset(preset, str(tmp_path))  # the weights file is not next to it
    monkeypatch.setenv("MTL_KERAS_PRESETS", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    summary = mtl_keras.list_presets("elsewhere")["elsewhere"]
    assert summary["weights"] == (f"missing: put kendall_deeplabv3_resnet26_slim_synthetic.weights.h5 in "
                                  f"{tmp_path / 'home' / 'mtl_keras' / 'weights'} (or $MTL_KERAS_WEIGHTS)")


def test_preset_parameter_counts_match_the_models():
    for name in ("kendall_deeplabv3_resnet26_cpu", "kendall_deeplabv3_resnet26_slim"):
        assert presets.build_from_preset(name).count_params() == presets.get_preset(name)["parameters"], name
    # The papers' models (built full size in test_kendall_model.py / test_mt_unet.py).
    assert presets.get_preset("kendall_deeplabv3_resnet101")["parameters"] == 58_859_414


def test_build_model_and_load_model_agree_on_the_defaults():
    for name in ("mt_unet", "kendall_deeplabv3_resnet26_cpu"):
        built = mtl_keras.build_model(name, input_shape=(32, 64, 3))
        loaded = mtl_keras.load_model(name, input_shape=(32, 64, 3))
        assert built.get_config() == loaded.get_config(), name
    assert set(mtl_keras.build_model("mt_unet", input_shape=(32, 64, 3), base_filters=4).output) == {"semantic",
                                                                                                       "depth"}
