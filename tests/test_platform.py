"""TensorFlow's start-up banners are held back by ``import mtl_keras``; everything else it writes is kept."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_mtl_keras_platform(tmp_path, fake_tensorflow, env_overrides):
    """Runs ``import_tensorflow_quietly`` in a fresh process whose ``tensorflow`` is ``fake_tensorflow`` (source)."""
    (tmp_path / "tensorflow.py").write_text(textwrap.dedent(fake_tensorflow))
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", KERAS_BACKEND="tensorflow", **env_overrides)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('platform_under_test', "
            f"{os.path.join(REPO, 'mtl_keras', 'platform.py')!r}); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); print('imported', m.import_tensorflow_quietly())")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


FAKE = """
    import os
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
    os.write(2, b"a real problem while loading\\n")
    os.write(2, b"I0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...\\n")
"""


@pytest.mark.subprocess
def test_banners_are_dropped_and_other_lines_kept(tmp_path):
    result = _import_mtl_keras_platform(tmp_path, FAKE, {"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr
    assert "imported True" in result.stdout
    assert result.stderr == "a real problem while loading\n"


@pytest.mark.subprocess
def test_tf_cpp_min_log_level_0_leaves_the_import_to_tensorflow(tmp_path):
    result = _import_mtl_keras_platform(tmp_path, FAKE, {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "imported False" in result.stdout
    assert result.stderr == ""  # nothing imported TensorFlow: the function left it alone


@pytest.mark.subprocess
def test_import_error_is_raised_with_its_output(tmp_path):
    broken = FAKE + "\n    raise ImportError('libfoo.so missing')\n"
    result = _import_mtl_keras_platform(tmp_path, broken, {"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode != 0
    assert "a real problem while loading" in result.stderr and "libfoo.so missing" in result.stderr
    assert "oneDNN custom operations" not in result.stderr


@pytest.mark.subprocess
def test_import_mtl_keras_prints_no_tensorflow_banner():
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL",
                                                            "TF_ENABLE_ONEDNN_OPTS")}
    env.update(PYTHONPATH=REPO, KERAS_BACKEND="tensorflow")
    result = subprocess.run([sys.executable, "-c", "import mtl_keras, keras; print(keras.config.backend())"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tensorflow"
    assert "oneDNN custom operations" not in result.stderr and "absl::InitializeLog" not in result.stderr


def test_quiet_tensorflow_logs_holds_back_info_and_restores_the_levels():
    import logging

    from mtl_keras.platform import quiet_tensorflow_logs

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.name, record.levelno))

    tf_logger, handler = logging.getLogger("tensorflow"), Keep()
    tf_logger.addHandler(handler)
    before = tf_logger.level
    try:
        tf_logger.setLevel(logging.INFO)
        with quiet_tensorflow_logs():
            tf_logger.info("Assets written to: x")
            tf_logger.warning("a real warning")
        tf_logger.info("after")
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(before)
    assert records == [("tensorflow", logging.WARNING), ("tensorflow", logging.INFO)]
