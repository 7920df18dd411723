"""experiments/toy_uncertainty.py (seed 004, section 2.3): the learned sigmas recover the noise std (10 and 1) from
both initialisations, in the script's quick form (full-batch Adam, a few seconds of training)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "toy_uncertainty.py")


def test_quick_toy_recovers_the_noise_std_from_both_initialisations(tmp_path):
    results_md = tmp_path / "toy.md"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--output_dir", str(tmp_path / "out"),
                           "--results_md", str(results_md)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "out" / "sigmas.json") as f:
        summary = json.load(f)
    assert summary["passed"]
    assert set(summary["results"]) == {"1.0", "5.0"}
    for sigma0, result in summary["results"].items():
        sigma = result["sigma"]
        assert abs(sigma["y1"] - 10.0) <= 1.0, (sigma0, sigma)
        assert abs(sigma["y2"] - 1.0) <= 0.1, (sigma0, sigma)
        # The likelihood's optimum: sigma = the RMS residual of the network's own fit.
        for k in ("y1", "y2"):
            assert abs(sigma[k] / result["residual_std"][k] - 1.0) < 0.03, (sigma0, k, sigma, result)
    # The sigmas start where asked and are recorded over training.
    for sigma0, history in summary["history"].items():
        assert abs(history["y1"][0] - float(sigma0)) < 1e-4 and abs(history["y2"][0] - float(sigma0)) < 1e-4
        assert len(history["y1"]) == summary["settings"]["epochs"] + 1
    text = results_md.read_text()
    assert text.startswith("## ")
    assert "experiments/toy_uncertainty.py --quick" in text
    assert "9.95" in text and "0.95" in text
    assert (tmp_path / "toy.png").stat().st_size > 0
    assert (tmp_path / "out" / "sigmas.png").stat().st_size > 0
