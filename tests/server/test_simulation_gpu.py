"""Simulated sites on a CUDA GPU (skipped where torch sees none; run on a GPU machine, docs/federation.md).

By default ``strpnet simulate`` shares the visible GPUs among the sites (Flower client resources, ``num-gpus`` =
min(1, GPUs / sites)): every site's training must then run on CUDA, which each site reports as ``train-cuda``
(the row's ``train_cuda`` is the example-weighted share of training patients that went through a GPU). With
``gpus_per_site = 0`` Ray hides the GPU from the sites and they train on the CPU. A run resumed from its round-1
checkpoint on the GPU reaches bit-identical final weights, as on the CPU (training uses deterministic CUDA kernels).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from strpnet_core.commands.simulate import simulate
from sim_fixtures import TINY_RUN_CONFIG, assert_same_final_model, make_site_caches

pytestmark = [pytest.mark.integration, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")]


def _run(run_dir: Path, caches: Path, rounds: int, *, gpus_per_site: float | None = None,
         resume: bool = False) -> dict:
    return simulate(run_dir, data=None, cache=caches, sites=3, rounds=rounds, preset="ci", seed=3,
                    gpus_per_site=gpus_per_site, resume=resume, overrides=dict(TINY_RUN_CONFIG), timeout_s=300,
                    progress=False)


def _assert_cuda_share(run_dir: Path, expected: float) -> None:
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train_sites"] == 3 and r["train_failures"] == 0
        assert r["train_cuda"] == expected
        assert all(site["train_cuda"] == expected for site in r["per_site"])


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site_caches(tmp_path_factory.mktemp("caches"), sites=3, patients=6)


@pytest.fixture(scope="module")
def shared_run(caches: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("shared")
    _run(run_dir, caches, rounds=2)
    return run_dir


def test_sites_sharing_the_gpu_train_on_cuda(shared_run: Path) -> None:
    _assert_cuda_share(shared_run, 1.0)


def test_sites_without_a_gpu_share_train_on_the_cpu(caches: Path, tmp_path: Path) -> None:
    _run(tmp_path, caches, rounds=2, gpus_per_site=0.0)
    _assert_cuda_share(tmp_path, 0.0)


def test_resume_on_the_gpu_reaches_the_same_final_weights(shared_run: Path, caches: Path, tmp_path: Path) -> None:
    _run(tmp_path, caches, rounds=1)
    summary = _run(tmp_path, caches, rounds=2, resume=True)
    assert summary["resumed_from_round"] == 1 and summary["rounds_completed"] == 2
    assert_same_final_model(shared_run, tmp_path)
