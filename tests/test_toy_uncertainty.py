"""experiments/toy_uncertainty.py (seed 004, section 2.3): the learned sigmas recover the noise std (10 and 1) from
both initialisations, in the script's quick form (full-batch Adam, a few seconds of training)."""

from tests.helpers import run_quick_experiment


def test_quick_toy_recovers_the_noise_std_from_both_initialisations(tmp_path):
    summary, results_md = run_quick_experiment("toy_uncertainty.py", tmp_path, "sigmas.json", timeout=300)
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
    assert (tmp_path / "results.png").stat().st_size > 0
    assert (tmp_path / "out" / "sigmas.png").stat().st_size > 0
