"""The ``libmtl_nyuv2_*`` presets build LibMTL's NYUv2 example models: their trainable parameter counts equal the ones
LibMTL's own code gives (recorded in each preset's ``reference`` by ``benchmarks/libmtl_parity.py``, which builds
LibMTL's models with PyTorch and counts ``p.numel()`` of the parameters that require gradients)."""

import math

import keras
import pytest

from mtl_keras import presets

PARITY = ["hps", "cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "ltb"]


def test_every_libmtl_architecture_has_a_parity_preset_with_libmtl_s_count():
    for name in PARITY:
        preset = presets.get_preset(f"libmtl_nyuv2_{name}")
        assert preset["architecture"] == name
        assert preset["arguments"]["input_shape"] == [288, 384, 3] and preset["arguments"]["num_classes"] == 13
        assert preset["arguments"]["tasks"] == ["semantic", "depth", "normals"]
        assert preset["reference"]["libmtl_trainable_parameters"] > 70_000_000


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY)
def test_trainable_parameters_equal_libmtl_s(name):
    preset = presets.get_preset(f"libmtl_nyuv2_{name}")
    model = presets.build_from_preset(f"libmtl_nyuv2_{name}")
    assert sum(math.prod(v.shape) for v in model.trainable_weights) == \
        preset["reference"]["libmtl_trainable_parameters"]
    assert model.count_params() == preset["parameters"]
    del model
    keras.backend.clear_session()
