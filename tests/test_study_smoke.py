"""Smoke test of the comparison study (benchmarks/study): the CI-sized configuration runs end to end through the
real pipeline (synth, preprocessing, Flower simulation, centralised and local-only training, baselines, report).

It asserts only that the study completes and writes its table; the numbers of an 8-patient ci cohort mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.slow
def test_study_smoke_completes_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "study"
    docs = tmp_path / "docs"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "study" / "run_study.py"), "--config", "smoke", "--out", str(out),
         "--publish-to", str(docs)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    md = (out / "results.md").read_text()
    assert "| method | seeds | Harrell's C | Uno's C | Dice | iso-volume coverage |" in md
    for label in ("FL (FedAvg, 3 sites)", "centralised (pooled)", "local-only site-01", "cavity margin",
                  "Cox on volumes", "oracle (true risk)"):
        assert label in md
    assert "SMOKE RUN" in md
    assert (docs / "results.md").read_text() == md
    assert (docs / "images" / "results" / "concordance.png").is_file()
