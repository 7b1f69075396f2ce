"""`strpnet simulate`'s client resources: simulated sites share the visible GPUs (issue 5), CPU-only otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.utils import simulation_config_from_json

from strpnet_core.commands.simulate import concurrent_sites, simulation_resources


def _flower_accepts(cfg: dict) -> object:
    """Parse ``cfg`` the way ``flwr run --federation-config`` does (dashes -> proto field names)."""
    return simulation_config_from_json({k.replace("-", "_"): v for k, v in cfg.items()})


def test_cpu_only_machine_reserves_no_gpu() -> None:
    cfg = simulation_resources(3, 1, None, 0)
    assert "client-resources-num-gpus" not in cfg and "init-args-num-gpus" not in cfg
    assert cfg["num-supernodes"] == 3 and cfg["client-resources-num-cpus"] == 1
    proto = _flower_accepts(cfg)
    assert proto.num_supernodes == 3 and not proto.HasField("client_resources_num_gpus")


@pytest.mark.parametrize(("sites", "gpus", "per_site"), [(3, 1, 1 / 3), (2, 4, 1.0), (4, 2, 0.5), (1, 1, 1.0)])
def test_sites_share_the_visible_gpus(sites: int, gpus: int, per_site: float) -> None:
    cfg = simulation_resources(sites, 1, None, gpus)
    assert cfg["client-resources-num-gpus"] == pytest.approx(per_site)
    assert cfg["init-args-num-gpus"] == gpus
    # All sites fit at once: sites x per-site share <= visible GPUs.
    assert sites * cfg["client-resources-num-gpus"] <= gpus + 1e-9
    proto = _flower_accepts(cfg)
    assert proto.client_resources_num_gpus == pytest.approx(per_site, rel=1e-6)
    assert proto.init_args_num_gpus == gpus


def test_explicit_share_and_bad_values() -> None:
    assert simulation_resources(3, 2, 0.25, 1)["client-resources-num-gpus"] == 0.25
    assert "client-resources-num-gpus" not in simulation_resources(3, 1, 0.0, 2)  # 0: sites stay on the CPU
    with pytest.raises(ValueError, match="no CUDA GPU"):
        simulation_resources(3, 1, 0.5, 0)
    with pytest.raises(ValueError, match=">= 0"):
        simulation_resources(3, 1, -1.0, 1)


@pytest.mark.parametrize(("sites", "cores", "per_site", "expected"), [
    (3, 2, 1, 3),  # 2 at a time would leave one core idle while the third site trains alone
    (2, 2, 1, 2), (1, 2, 1, 2), (4, 2, 1, 2), (8, 2, 1, 2),  # waves already fill every core
    (5, 2, 1, 3),  # waves of 3 + 2
    (7, 4, 1, 7), (9, 4, 1, 5),  # 7 on 4 cores: 4 + 3, 5 + 2, 6 + 1 each idle a core, so all at once; 9: 5 + 4
    (3, 2, 2, 1),  # one slot: one site at a time, never idle
    (5, 4, 2, 3),  # 2 slots of 2 CPUs: waves of 3 + 2
])
def test_concurrent_sites_keep_every_core_busy(sites: int, cores: int, per_site: int, expected: int) -> None:
    a = concurrent_sites(sites, cores, per_site)
    assert a == expected
    slots = max(1, cores // per_site)
    assert slots <= a <= 2 * slots
    waves = [min(a, sites - i) for i in range(0, sites, a)]
    assert sum(waves) == sites and all(w >= min(slots, sites) for w in waves)
    cfg = simulation_resources(sites, per_site, None, 0, cores=cores)
    assert cfg["init-args-num-cpus"] == max(cores, a * per_site)
    assert cfg["init-args-num-cpus"] // cfg["client-resources-num-cpus"] == max(a, cores // per_site)


def test_cores_default_to_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process pinned to one CPU (taskset, a container's cpuset) runs one site at a time, whatever the machine has;
    cohort generation then uses one process."""
    import os

    from strpnet_core.commands.simulate import _generation_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert simulation_resources(3, 1, None, 0)["init-args-num-cpus"] == 1
    assert _generation_workers(None) == 1 and _generation_workers(4) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert simulation_resources(3, 1, None, 0)["init-args-num-cpus"] == 3  # waves of 3 on 2 cores


def test_simulate_without_the_simulation_runtime_says_how_to_install_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment's install (`pip install -e .`) has no Ray: `strpnet simulate` stops before any work, saying so."""
    import importlib.util

    from strpnet_core.commands.simulate import simulate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"needs Flower's simulation runtime \(Ray\).*\.\[simulation\]"):
        simulate(tmp_path / "run", data=None, sites=1, rounds=1, preset="ci", seed=0)
    assert not (tmp_path / "run").exists()
