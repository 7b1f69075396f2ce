"""Flower simulation of 3 sites (ci preset, cache files written directly, tiny model), 2 rounds: it finishes, the
loss falls, the outputs are written, the coordinator's test set is evaluated server-side after every round, a run
resumed from its round-1 checkpoint reaches bit-identical weights, and two runs that sample one of the three sites
with the same seed pick the same site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from strpnet_core.commands.simulate import simulate
from sim_fixtures import TINY_RUN_CONFIG, assert_same_final_model, make_site_caches

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The coordinator's own held-out patients (another seed than the sites')."""
    return make_site_caches(tmp_path_factory.mktemp("coordinator"), sites=1, patients=8, seed=99) / "site-01"


def _run(run_dir: Path, caches: Path, test_cache: Path, rounds: int, *, resume: bool = False) -> dict:
    return simulate(run_dir, data=None, cache=caches, sites=3, rounds=rounds, preset="ci", seed=7, resume=resume,
                    overrides={**TINY_RUN_CONFIG, "test-cache": str(test_cache)}, timeout_s=240, progress=False)


@pytest.fixture(scope="module")
def full_run(site_caches: Path, test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sim-full")
    _run(run_dir, site_caches, test_cache, rounds=2)
    return run_dir


def test_simulation_finishes_with_outputs_and_falling_loss(full_run: Path) -> None:
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    for name in ("final_model.pt", "model_config.json", "metrics.csv", "metrics.json", "checkpoint.npz"):
        assert (full_run / name).is_file(), name
    rows = json.loads((full_run / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train_sites"] == 3 and r["eval_sites"] == 3 and r["train_failures"] == 0
        assert r["comparable"] >= 0 and r["n_patients"] >= 3
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert len((full_run / "metrics.csv").read_text().splitlines()) == 3
    model = torch.load(full_run / "final_model.pt", weights_only=True)
    assert model["server_round"] == 2 and model["model_config"] and model["state_dict"]


def test_coordinator_test_set_is_evaluated_every_round(full_run: Path) -> None:
    """Server-side evaluation on the 8 patients of ``test-cache`` after every round (its C-index is checked against
    lifelines in tests/core/test_report.py)."""
    rows = json.loads((full_run / "metrics.json").read_text())
    assert all(r["test_n_patients"] == 8 and r["test_comparable"] > 0 for r in rows)
    assert all(0.0 <= r["test_c_index"] <= 1.0 for r in rows)
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["final"]["test_c_index"] == rows[-1]["test_c_index"]


def test_resume_reaches_the_same_final_weights(full_run: Path, site_caches: Path, test_cache: Path,
                                               tmp_path: Path) -> None:
    _run(tmp_path, site_caches, test_cache, rounds=1)
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_completed"] == 1
    summary = _run(tmp_path, site_caches, test_cache, rounds=2, resume=True)
    assert summary["resumed_from_round"] == 1 and summary["rounds_completed"] == 2
    assert_same_final_model(full_run, tmp_path)
    rows_a = json.loads((full_run / "metrics.json").read_text())
    rows_b = json.loads((tmp_path / "metrics.json").read_text())
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["comparable"] == rb["comparable"]


def test_a_sampled_fraction_of_the_sites_is_the_same_in_every_run_of_a_seed(site_caches: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``fraction-train`` 0.34 of 3 sites: one site trains. Flower draws new node ids for every simulation; ordered
    by their sites' sampling keys, the same seed picks the same site, so the final weights are bit-identical (by
    node id, another site 2 times in 3)."""
    overrides = {**TINY_RUN_CONFIG, "fraction-train": 0.34, "min-train-nodes": 1}
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        simulate(run, data=None, cache=site_caches, sites=3, rounds=1, preset="ci", seed=7, overrides=overrides,
                 timeout_s=240, progress=False)
    out = capsys.readouterr().out
    assert "sampled 1 of 3 connected site(s)" in out and "no sampling key" not in out  # every site told its key
    rows = [json.loads((run / "metrics.json").read_text())[0] for run in runs]
    assert [r["train_sites"] for r in rows] == [1, 1] and [r["eval_sites"] for r in rows] == [3, 3]
    assert_same_final_model(*runs)
