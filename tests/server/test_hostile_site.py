"""Flower simulation of 4 ci sites (tiny model) where site 4 is hostile (tests/server/hostile_app.py):

- NaN weights: the server rejects that site's reply every round, names it, and the run completes with finite weights;
- weights x 1e3: with FedAvg the global model is wrecked, with FedMedian it stays close to the clean run's
  (the federated C-index is compared and reported; on this tiny cohort it is too coarse to be the main assertion).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import server.launch
from hostile_app import write_hostile_app  # tests/server/hostile_app.py
from strpnet_core.commands.simulate import simulate
from sim_fixtures import TINY_RUN_CONFIG, make_site_caches

pytestmark = pytest.mark.integration

ROUNDS = 2


@pytest.fixture(scope="module")
def caches4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site_caches(tmp_path_factory.mktemp("caches4"), sites=4, patients=6, seed=3)


def _run(run_dir: Path, caches: Path, monkeypatch: pytest.MonkeyPatch, *, attack: str | None,
         **overrides: object) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    if attack is not None:  # the clean run (attack None) comes first in a test: the app is the product's
        app = write_hostile_app(run_dir.parent / f"{run_dir.name}-app", attack=attack)
        monkeypatch.setattr(server.launch, "app_dir", lambda: app)
    summary = simulate(run_dir, data=None, cache=caches, sites=4, rounds=ROUNDS, preset="ci", seed=11,
                       overrides={**TINY_RUN_CONFIG, **overrides}, timeout_s=300, progress=False)
    rows = json.loads((run_dir / "metrics.json").read_text())
    weights = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    return summary, rows, weights


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(torch.sum((a[k].double() - b[k].double()) ** 2)) for k in a)
    den = sum(float(torch.sum(b[k].double() ** 2)) for k in b)
    return (num / den) ** 0.5


def test_nan_site_is_rejected_and_the_run_completes(caches4: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    summary, rows, weights = _run(tmp_path / "nan", caches4, monkeypatch, attack="nan",
                                  **{"min-train-nodes": 3, "min-evaluate-nodes": 3})
    assert summary["rounds_completed"] == ROUNDS
    for r in rows:
        assert r["train_rejected"] == 1 and r["train_sites"] == 3 and r["train_failures"] == 0
        assert r["eval_sites"] == 4 and r["eval_rejected"] == 0
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_scaled_site_with_robust_aggregation_stays_close_to_the_clean_run(
        caches4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, clean_rows, clean = _run(tmp_path / "clean", caches4, monkeypatch, attack=None)
    _, avg_rows, attacked_avg = _run(tmp_path / "avg", caches4, monkeypatch, attack="scale")
    _, med_rows, attacked_med = _run(tmp_path / "median", caches4, monkeypatch, attack="scale",
                                     aggregation="fedmedian")
    d_avg, d_med = _distance(attacked_avg, clean), _distance(attacked_med, clean)
    c = {name: rows[-1]["c_index"] for name, rows in (("clean", clean_rows), ("fedavg", avg_rows),
                                                        ("fedmedian", med_rows))}
    print(f"\nrelative weight distance to the clean run: fedavg {d_avg:.3g}, fedmedian {d_med:.3g}; "
          f"C-index {c}; comparable pairs {clean_rows[-1]['comparable']}")
    assert d_avg > 50  # the 1e3-scaled site dominates the mean
    assert d_med < 0.5  # the median keeps the model in the clean run's neighbourhood
    assert d_med * 100 < d_avg
