"""Simulated sites on a CUDA GPU (skipped where torch sees none; run on a GPU machine, docs/federation.md).

By default ``strpnet simulate`` shares the visible GPUs among the sites (Flower client resources, ``num-gpus`` =
min(1, GPUs / sites)): every site's training must then run on CUDA, which each site reports as ``train-cuda``
(the row's ``train_cuda`` is the example-weighted share of training patients that went through a GPU). With
``gpus_per_site = 0`` Ray hides the GPU from the sites and they train on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from strpnet_core.commands.simulate import simulate
from sim_fixtures import TINY_RUN_CONFIG, make_site_caches

pytestmark = [pytest.mark.integration, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")]


@pytest.mark.parametrize("gpus_per_site, expected_cuda", [(None, 1.0), (0.0, 0.0)])
def test_simulated_sites_share_the_gpu(tmp_path: Path, gpus_per_site: float | None, expected_cuda: float) -> None:
    caches = make_site_caches(tmp_path / "caches", sites=3, patients=6)
    run_dir = tmp_path / "run"
    simulate(run_dir, data=None, cache=caches, sites=3, rounds=2, preset="ci", seed=3, gpus_per_site=gpus_per_site,
             overrides=dict(TINY_RUN_CONFIG), timeout_s=300, progress=False)
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train_sites"] == 3 and r["train_failures"] == 0
        assert r["train_cuda"] == expected_cuda
        assert all(site["train_cuda"] == expected_cuda for site in r["per_site"])
