"""Site resolution (node config / simulation partition), first-use cache preparation under a lock, seeds, splits."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client.site_data import list_sites, resolve_site
from strpnet_core import federation
from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient
from strpnet_core.federation import (
    READY_MARKER,
    FederationConfig,
    derive_seed,
    prepare_site_cache,
    split_indices,
)


def _cache(site_dir: Path, n: int = 3, preset: str = "ci") -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        p = CachedPatient(patient_id=f"P{i}", site=site_dir.name, images=rng.normal(size=(1, 4, 4, 4, 4)).astype(
            np.float32), days=np.zeros(1, np.float32), timepoints=["000"], brain_mask=np.ones((4, 4, 4), np.uint8),
            event=1, time=100.0 + i, meta={"preset": preset})
        save_cached_patient(cache_path(site_dir, p.patient_id), p)
    return site_dir


def test_deployment_node_config() -> None:
    cfg = FederationConfig()
    loc = resolve_site({"data-dir": "/data/a", "cache-dir": "/cache/a", "site-name": "hospital-a"}, cfg)
    assert (loc.site_name, str(loc.data_dir), str(loc.cache_dir)) == ("hospital-a", "/data/a", "/cache/a")
    assert resolve_site({"data-dir": "/data/site-x"}, cfg).site_name == "site-x"


def test_simulation_partition_maps_to_the_pth_site(tmp_path: Path) -> None:
    for name in ("site-02", "site-01", "truth", ".hidden", "site-03"):
        (tmp_path / "data" / name).mkdir(parents=True)
    assert [p.name for p in list_sites(tmp_path / "data")] == ["site-01", "site-02", "site-03"]
    cfg = FederationConfig(data_root=str(tmp_path / "data"), cache_root=str(tmp_path / "cache"))
    loc = resolve_site({"partition-id": 1, "num-partitions": 3}, cfg)
    assert loc.site_name == "site-02" and loc.data_dir == tmp_path / "data" / "site-02"
    assert loc.cache_dir == tmp_path / "cache" / "site-02"
    with pytest.raises(ValueError, match="partition 3 has no site folder"):
        resolve_site({"partition-id": 3}, cfg)
    with pytest.raises(ValueError, match="expected data-dir"):
        resolve_site({"foo": 1}, cfg)


def test_refresh_brings_a_ready_cache_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ready cache is reused by the ClientApp as it is; flower-client (refresh) runs the incremental preprocessing
    again, which skips finished patients and redoes new or changed ones (preprocess_site, input_hash)."""
    from strpnet_core.preprocessing import pipeline

    calls: list[Path] = []

    def fake_preprocess_site(raw: Path, cache: Path, **kw: object) -> pipeline.PreprocessReport:
        calls.append(Path(raw))
        _cache(Path(cache), n=2)
        return pipeline.PreprocessReport("site-01", str(cache), "h", [pipeline.PatientResult("P0", "ok"),
                                                                      pipeline.PatientResult("P1", "ok")])

    monkeypatch.setattr(pipeline, "preprocess_site", fake_preprocess_site)
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    raw.mkdir()
    assert prepare_site_cache(raw, cache, site_name="site-01", preset="ci").num_patients == 2
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # created closed to other users (not by the lock's mkdir)
    prepare_site_cache(raw, cache, site_name="site-01", preset="ci")  # ready: reused
    assert len(calls) == 1
    prepare_site_cache(raw, cache, site_name="site-01", preset="ci", refresh=True)
    assert len(calls) == 2 and (cache / READY_MARKER).is_file()
    prepare_site_cache(None, cache, site_name="site-01", preset="ci", refresh=True)  # no raw folder: as it is
    assert len(calls) == 2


def test_existing_cache_is_accepted_and_marked(tmp_path: Path) -> None:
    site = _cache(tmp_path / "site-01")
    info = prepare_site_cache(None, site, site_name="site-01", preset="ci")
    assert info.num_patients == 3 and (site / READY_MARKER).is_file()
    with pytest.raises(ValueError, match="built with preset 'ci' but this run uses preset 'demo'"):
        prepare_site_cache(None, site, site_name="site-01", preset="demo")


def test_a_damaged_first_cache_file_does_not_take_the_site_out(tmp_path: Path) -> None:
    """The preset of a cache without a marker is read from its first *usable* file (a file copied in half sorts
    first here); the dataset leaves the damaged one out."""
    site = _cache(tmp_path / "site-01")
    good = cache_path(site, "P0").read_bytes()
    cache_path(site, "A-half").write_bytes(good[: len(good) // 2])
    info = prepare_site_cache(None, site, site_name="site-01", preset="ci")
    assert json.loads((site / READY_MARKER).read_text())["preset"] == "ci"
    assert info.num_patients == 4 and len(federation.load_site_dataset(site)) == 3
    with pytest.raises(ValueError, match="built with preset 'ci' but this run uses preset 'demo'"):
        prepare_site_cache(None, site, site_name="site-01", preset="demo")


def test_the_coordinators_test_cache_is_checked_before_the_first_round(tmp_path: Path) -> None:
    from strpnet_core.federation import check_test_cache
    from strpnet_core.site import NoUsablePatientError

    def cfg(path: Path, preset: str = "ci") -> FederationConfig:
        return FederationConfig.from_run_config({"test-cache": str(path), "preset": preset})

    with pytest.raises(FileNotFoundError, match=f"test-cache {tmp_path / 'typo'}: not a folder"):
        check_test_cache(cfg(tmp_path / "typo"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoUsablePatientError):
        check_test_cache(cfg(tmp_path / "empty"))
    test = _cache(tmp_path / "test", n=4)
    with pytest.raises(ValueError, match="preprocessed with preset 'ci', the run uses 'demo'"):
        check_test_cache(cfg(test, "demo"))
    assert check_test_cache(cfg(test)) == 4


def test_nothing_to_train_on_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to train on"):
        prepare_site_cache(tmp_path / "missing", tmp_path / "cache", site_name="x", preset="ci")


def test_concurrent_first_use_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = federation._build_cache

    def slow_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(federation, "_build_cache", slow_build)
    site = _cache(tmp_path / "site-01")
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        prepare_site_cache(None, site, site_name="site-01", preset="ci").num_patients)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [3, 3, 3, 3] and len(calls) == 1


def test_seeds_and_splits_are_deterministic() -> None:
    assert derive_seed(0, "train", 1, "a") == derive_seed(0, "train", 1, "a")
    assert len({derive_seed(0, "train", r, s) for r in (1, 2) for s in ("a", "b")}) == 4
    train, val = split_indices(10, 0.3, 0, "a")
    assert (train, val) == split_indices(10, 0.3, 0, "a")
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert split_indices(1, 0.5, 0, "a") == ([0], [])
    assert split_indices(5, 0.0, 0, "a") == ([0, 1, 2, 3, 4], [])


def test_evaluation_never_scores_the_training_patients(tmp_path: Path) -> None:
    """val-fraction > 0 with no patient held out (2 patients at 0.25: round(0.5) = 0) evaluates nobody; only
    val-fraction = 0 evaluates every patient."""
    from strpnet_core.federation import load_site_dataset, site_splits

    ds = load_site_dataset(_cache(tmp_path / "a", n=2))
    train, val = site_splits(ds, FederationConfig(val_fraction=0.25), "a")
    assert len(train) == 2 and len(val) == 0
    train, val = site_splits(ds, FederationConfig(val_fraction=0.5), "a")
    assert len(train) == len(val) == 1 and set(train.indices).isdisjoint(val.indices)
    train, val = site_splits(ds, FederationConfig(val_fraction=0.0), "a")
    assert len(train) == len(val) == 2


def test_run_config_parsing_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="num-server-rounds"):
        FederationConfig.from_run_config({"num-server-rounds": "three"})
    with pytest.raises(ValueError, match="fraction-train"):
        FederationConfig.from_run_config({"fraction-train": 1.5})
    with pytest.raises(ValueError, match="no-such-knob"):
        FederationConfig.from_run_config({"no-such-knob": 1})
    for key in ("dp-noise-multiplier", "dp-clipping-norm", "round-timeout"):  # NaN passes every comparison
        with pytest.raises(ValueError, match=f"{key} must be a finite number, got nan"):
            FederationConfig.from_run_config({key: float("nan")})
    with pytest.raises(ValueError, match="dp-clipping-norm must be a finite number, got inf"):  # no clipping at all
        FederationConfig.from_run_config({"dp-clipping-norm": float("inf")})
    assert FederationConfig.from_run_config({"node-wait-timeout": float("inf")}).node_wait_timeout == float("inf")


def test_pyproject_run_config_parses() -> None:
    """Every key of [tool.flwr.app.config] is consumed, and the model/train configs build."""
    import tomllib

    from flwr.common.config import flatten_dict

    root = Path(__file__).resolve().parents[2]
    run_config = flatten_dict(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    cfg = FederationConfig.from_run_config(run_config)
    assert cfg.num_server_rounds == run_config["num-server-rounds"]
    assert cfg.model_config().widths == tuple(int(w) for w in run_config["model.widths"].split(","))
    assert cfg.model_config().lstm_hidden == run_config["model.lstm-hidden"]
    assert cfg.train_config().local_epochs == run_config["local-epochs"]
