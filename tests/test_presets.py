import glob
import json
import os
import re
import subprocess
import sys

import pytest

import mtl_keras
from mtl_keras.config import TrainConfig
from mtl_keras.data.datasets import DATASETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "experiments", "presets", "*.json")))


def test_the_papers_presets_exist():
    names = {os.path.splitext(os.path.basename(p))[0] for p in PRESETS}
    assert {"kendall_tiny_cityscapes", "kendall_cityscapes", "mtunet_cityscapes_7", "mtunet_cityscapes_19",
            "mtunet_nyuv2_13"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_preset_is_a_valid_config_naming_registered_parts(path):
    with open(path) as f:
        config = TrainConfig.from_dict(json.load(f))
    assert config.model in mtl_keras.list_models()
    assert config.dataset in DATASETS or config.dataset in ("cityscapes_npy", "nyuv2_npy", "nyuv2")
    assert config.steps or config.epochs


def test_kendall_tiny_preset_has_the_papers_optimiser():
    with open(os.path.join(ROOT, "experiments", "presets", "kendall_tiny_cityscapes.json")) as f:
        config = TrainConfig.from_dict(json.load(f))
    assert (config.optimizer, config.learning_rate, config.momentum, config.weight_decay, config.lr_power,
            config.steps, config.batch_size, config.crop_size) == ("sgd", 2.5e-3, 0.9, 1e-4, 0.9, 50000, 8,
                                                                   (256, 256))


@pytest.mark.slow  # about 9 s: a process importing train.py (TensorFlow)
@pytest.mark.subprocess
def test_flags_override_a_preset():
    code = ("import sys; sys.path.insert(0, 'experiments'); import train; from absl import flags; "
            "flags.FLAGS(['t', '--preset', 'mtunet_cityscapes_7', '--epochs', '3', '--tasks', 'semantic']); "
            "c = train.config_from_flags(); print(c.model, c.weighting, c.epochs, c.tasks, c.learning_rate)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.split("\n")[-2] == "mt_unet mtunet 3 ('semantic',) 0.0001"


def test_unknown_config_field_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown config field"):
        TrainConfig.from_dict({"learning_rat": 0.1})


@pytest.mark.parametrize("settings, message", [
    ({"flip": "no"}, "--flip must be true or false, got 'no'"),  # a JSON string is not a boolean
    ({"momentum": True}, "--momentum must be a number, got True"),
    ({"dataset": 3}, "--dataset must be a string, got 3"),
    ({"model_overrides": [["depth", 26]]}, "--model_overrides must be a JSON object"),
    ({"jit_compile": "yes"}, "--jit_compile must be true, false or null, got 'yes'"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict(settings)
    assert TrainConfig.from_dict({"flip": False, "momentum": 1, "jit_compile": None}).momentum == 1  # ints are numbers
