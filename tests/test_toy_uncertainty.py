"""experiments/toy_uncertainty.py (the reproduction report's toy, section 2.3): the learned sigmas recover the noise
std (10 and 1) from both initialisations, in the script's quick form (full-batch Adam, a few seconds of training)."""

import os

import pytest

from tests.helpers import load_script, run_quick_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_FRAGMENT = os.path.join(ROOT, "docs", "results", "toy_uncertainty.md")


def test_results_go_where_the_user_points_and_into_docs_only_with_write_docs(tmp_path):
    # toy_uncertainty.py picks its fragment with the scripts' shared helper (imported here without the script's absl
    # flags, which would clash with other scripts' flags in this process); its default is OUTPUT_DIR/results.md.
    reproduction = load_script("experiments/reproduction.py", "reproduction")
    out = str(tmp_path / "out")
    default = os.path.join(out, "results.md")
    assert reproduction.fragment_path("toy_uncertainty", default=default) == default
    chosen = str(tmp_path / "r.md")
    assert reproduction.fragment_path("toy_uncertainty", chosen, default=default) == chosen
    assert reproduction.fragment_path("toy_uncertainty", write_docs=True, default=default) == DOCS_FRAGMENT
    with pytest.raises(ValueError, match="--write_docs writes"):
        reproduction.fragment_path("toy_uncertainty", "r.md", write_docs=True)


@pytest.mark.slow  # about 15 s: a toy_uncertainty.py --quick process
@pytest.mark.subprocess
def test_quick_toy_recovers_the_noise_std_from_both_initialisations(tmp_path):
    docs_before = open(DOCS_FRAGMENT).read() if os.path.exists(DOCS_FRAGMENT) else None
    summary, results_md = run_quick_experiment("toy_uncertainty.py", tmp_path, "sigmas.json", timeout=300)
    assert (open(DOCS_FRAGMENT).read() if os.path.exists(DOCS_FRAGMENT) else None) == docs_before  # docs untouched
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
