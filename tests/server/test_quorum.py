"""Fewer sites than the quorum: the run stops with a clear error instead of waiting forever, and its outputs are
written (simulation of 3 sites, quorum 4, 1-second bounded waits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strpnet_core.commands.simulate import simulate

pytestmark = pytest.mark.integration


def test_below_quorum_stops_cleanly_with_outputs(site_caches: Path, tmp_path: Path) -> None:
    overrides = {"val-fraction": 0.4, "local-epochs": 1, "num-threads": 1, "model.widths": "4,8",
                 "model.lstm-hidden": 8, "model.risk-hidden": 8, "min-available-nodes": 5, "min-train-nodes": 4,
                 "node-wait-timeout": 1.0, "start-wait-timeout": 1.0}
    with pytest.raises(RuntimeError, match="quorum"):
        simulate(tmp_path, data=None, cache=site_caches, sites=3, rounds=2, preset="ci", seed=1,
                 overrides=overrides, timeout_s=240, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "fewer than the quorum min-train-nodes = 4" in summary["stopped"]
    assert summary["rounds_completed"] == 0
    assert (tmp_path / "final_model.pt").is_file() and (tmp_path / "checkpoint.npz").is_file()
