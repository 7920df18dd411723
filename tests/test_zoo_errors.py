"""Broken model and weights files are errors that name the file and say what is wrong."""

import pytest

import mtl_keras

TINY = dict(input_shape=(32, 32, 3), backbone_width=8, aspp_channels=16, decoder_channels=16)
NAME = "kendall_deeplabv3_resnet26_slim"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = mtl_keras.build_model(NAME, **TINY)
    model.save_weights(str(folder / "full.weights.h5"))
    model.save(str(folder / "full.keras"))
    for name in ("full.weights.h5", "full.keras"):  # a download or copy cut short: the first half of the file
        data = (folder / name).read_bytes()
        (folder / name.replace("full", "half")).write_bytes(data[:len(data) // 2])
    return folder


def test_a_truncated_weights_file_names_the_file(saved):
    path = str(saved / "half.weights.h5")
    with pytest.raises(ValueError, match=r"Cannot load the weights .*half\.weights\.h5 .*truncated"):
        mtl_keras.load_model(NAME, weights=path, **TINY)


def test_a_truncated_keras_file_is_not_called_missing(saved):
    path = str(saved / "half.keras")
    with pytest.raises(ValueError, match=r"half\.keras is not a \.keras file .*truncated or corrupt") as error:
        mtl_keras.load_model(path)
    assert "not found" not in str(error.value).lower()


def test_weights_of_another_width_are_refused_naming_the_file(saved):
    with pytest.raises(ValueError, match=r"Cannot load the weights .*full\.weights\.h5.*another architecture"):
        mtl_keras.load_model(NAME, weights=str(saved / "full.weights.h5"), **dict(TINY, backbone_width=16))


def test_intact_files_still_load(saved):
    mtl_keras.load_model(NAME, weights=str(saved / "full.weights.h5"), **TINY)
    assert mtl_keras.load_model(str(saved / "full.keras")).name == NAME
