"""benchmarks/weighting_cost.py on a tiny configuration: every requested row measured in its own process and
tabulated relative to EW; a row that fails shows its error. No timing is asserted, only that the numbers exist."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.tf_only
def test_weighting_cost_tabulates_every_row_relative_to_ew(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "weighting_cost.py"),
                           "--image_size=32,64", "--batch_size=2", "--methods=pcgrad,no_such_method",
                           "--rep_grad=both", "--steps=1", "--warmup=1", f"--json={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    measured = [(r["method"], r["rep_grad"]) for r in rows if "error" not in r]
    assert measured == [("uncertainty", False), ("equal", False), ("pcgrad", False), ("equal", True),
                        ("pcgrad", True)]
    for row in rows:
        if "error" not in row:
            assert row["median_s"] > 0 and row["peak_growth_mib"] > 0, row
    failed = [r for r in rows if "error" in r]
    assert [r["method"] for r in failed] == ["no_such_method", "no_such_method"]
    assert "Unknown weighting 'no_such_method'" in failed[0]["error"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| pcgrad |")]
    assert len(table) == 2 and table[0].split("|")[5].strip() not in ("", "-")  # a ratio to EW in each
