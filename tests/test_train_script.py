"""experiments/train.py's command line itself: --help (fast, exit 0, no TensorFlow)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "experiments", "train.py")


def test_weighting_names_copy_equals_the_registries():
    from mtl_keras.config import WEIGHTING_NAMES
    from mtl_keras.gradient_methods import GRADIENT_METHODS
    from mtl_keras.weighting import weighting_names

    # The project's own methods (other tests register throw-away ones in the same process).
    own = [n for n in weighting_names() if n not in GRADIENT_METHODS
           or GRADIENT_METHODS[n].__module__.startswith("mtl_keras.")]
    assert list(WEIGHTING_NAMES) == own
    assert len(own) >= 27  # 5 loss weightings and 22 gradient methods ('equal' is one name in both)


@pytest.mark.subprocess
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_without_importing_tensorflow(flag):
    code = ("import runpy, sys\n"
            f"sys.argv = ['train.py', {flag!r}]\n"
            "try:\n"
            f"    runpy.run_path({TRAIN!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('EXIT', e.code, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("EXIT 0 False False"), result.stdout[-300:]
    assert result.stdout.startswith("Train a multi-task model.")  # the script's docstring first
    for name in ("--weighting", "--steps", "--output_dir", "pcgrad", "uncertainty"):
        assert name in result.stdout
    assert result.stderr == ""
    # --helpfull adds the flags of the other modules (absl's own --flagfile / --undefok); --help lists the script's.
    assert ("--undefok" in result.stdout) == (flag == "--helpfull")
