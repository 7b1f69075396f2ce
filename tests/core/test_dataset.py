"""PatientDataset over cache files and collate_patients (the Batch table of docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient
from strpnet_core.dataset import BATCH_KEYS, PatientDataset, collate_patients, select_timepoints

S = 8


def _write(folder: Path, pid: str, t: int, *, event: int | None = 1, seed: int = 0) -> CachedPatient:
    rng = np.random.default_rng(seed)
    patient = CachedPatient(
        patient_id=pid, site=folder.name,
        images=rng.normal(size=(t, 4, S, S, S)).astype(np.float16),
        days=np.arange(t, dtype=np.float32) * 60.0, timepoints=[f"{i:03d}" for i in range(t)],
        brain_mask=(rng.random((S, S, S)) > 0.2).astype(np.uint8),
        recurrence=(rng.random((S, S, S)) > 0.9).astype(np.uint8) if event == 1 else None,
        event=event, time=None if event is None else 100.0 + t,
    )
    save_cached_patient(cache_path(folder, pid), patient)
    return patient


@pytest.fixture()
def caches(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "site-01", tmp_path / "site-02"
    _write(a, "A-001", 1, seed=1)
    _write(a, "A-002", 3, event=0, seed=2)
    _write(a, "A-000", 2, seed=3)
    _write(b, "B-001", 4, event=None, seed=4)
    return a, b


def test_training_leaves_out_patients_without_outcome(caches: tuple[Path, Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A site preprocessed without outcomes.csv (allowed for inference) must not train as censored at day 0."""
    a, b = caches
    assert len(PatientDataset([a, b])) == 4  # inference: every patient
    ds = PatientDataset([a, b], require_outcome=True)
    assert [ds[i]["patient_id"] for i in range(len(ds))] == ["A-000", "A-001", "A-002"]
    assert "1 of 4 patient(s)" in caplog.text and "left out of training" in caplog.text
    with pytest.raises(ValueError, match=r"none of the 1 patient\(s\) in .*site-02 has an outcome") as err:
        PatientDataset(b, require_outcome=True)
    assert "B-001" not in str(err.value)  # no patient name in a message that may leave the site


def test_items_follow_the_cache(caches: tuple[Path, Path]) -> None:
    a, _ = caches
    ds = PatientDataset(a)
    assert len(ds) == 3
    assert [ds[i]["patient_id"] for i in range(3)] == ["A-000", "A-001", "A-002"]  # sorted: deterministic
    item = ds[2]
    assert set(item) == set(BATCH_KEYS)
    assert item["images"].shape == (3, 4, S, S, S) and item["images"].dtype == torch.float32
    src = ds.load_patient(2)
    np.testing.assert_array_equal(item["images"].numpy(), src.images.astype(np.float32))
    np.testing.assert_array_equal(item["days"].numpy(), [0, 60, 120])
    assert item["time_mask"].all()
    assert item["has_label"] is False and float(item["event"]) == 0.0 and float(item["time"]) == 103.0
    assert item["recurrence"].shape == (1, S, S, S) and item["recurrence"].sum() == 0
    lab = ds[0]
    assert lab["has_label"] is True and float(lab["event"]) == 1.0
    np.testing.assert_array_equal(lab["recurrence"][0].numpy(), ds.load_patient(0).recurrence)
    np.testing.assert_array_equal(lab["brain_mask"][0].numpy(), ds.load_patient(0).brain_mask)


def test_pooled_folders_files_and_dtype(caches: tuple[Path, Path]) -> None:
    a, b = caches
    ds = PatientDataset([a, b], dtype=torch.float64)
    assert len(ds) == 4
    inference = ds[3]  # no outcome: event and time 0
    assert inference["patient_id"] == "B-001" and float(inference["event"]) == 0 and float(inference["time"]) == 0
    assert inference["images"].dtype == torch.float64
    assert len(PatientDataset([cache_path(a, "A-001"), cache_path(b, "B-001")])) == 2


def test_max_timepoints_keeps_preop_and_latest(caches: tuple[Path, Path]) -> None:
    _, b = caches
    ds = PatientDataset(b, max_timepoints=2)
    item = ds[0]
    np.testing.assert_array_equal(item["days"].numpy(), [0, 180])
    full = ds.load_patient(0).images.astype(np.float32)
    np.testing.assert_array_equal(item["images"].numpy(), full[[0, 3]])


@pytest.mark.parametrize(
    "t,k,expected",
    [(3, None, [0, 1, 2]), (3, 5, [0, 1, 2]), (3, 3, [0, 1, 2]), (5, 1, [4]), (5, 2, [0, 4]), (5, 3, [0, 3, 4])],
)
def test_select_timepoints(t: int, k: int | None, expected: list[int]) -> None:
    assert select_timepoints(t, k) == expected


def test_collate_pads_variable_timepoints(caches: tuple[Path, Path]) -> None:
    a, b = caches
    ds = PatientDataset([a, b])
    items = [ds[i] for i in range(4)]  # T = 2, 1, 3, 4
    batch = collate_patients(items)
    assert list(batch) == list(BATCH_KEYS)
    assert batch["images"].shape == (4, 4, 4, S, S, S) and batch["images"].dtype == torch.float32
    assert batch["days"].shape == (4, 4) and batch["days"].dtype == torch.float32
    assert batch["time_mask"].dtype == torch.bool
    assert batch["time_mask"].sum(dim=1).tolist() == [2, 1, 3, 4]
    assert batch["recurrence"].shape == batch["brain_mask"].shape == (4, 1, S, S, S)
    assert batch["has_label"].tolist() == [True, True, False, False]
    assert batch["event"].shape == batch["time"].shape == (4,)
    assert batch["patient_id"] == ["A-000", "A-001", "A-002", "B-001"]
    # padding is zeros; real steps are the items'
    assert torch.all(batch["images"][1, 1:] == 0) and torch.all(batch["days"][1, 1:] == 0)
    torch.testing.assert_close(batch["images"][2, :3], items[2]["images"])


def test_dataloader_with_collate(caches: tuple[Path, Path]) -> None:
    a, _ = caches
    loader = torch.utils.data.DataLoader(PatientDataset(a), batch_size=2, collate_fn=collate_patients)
    sizes = [len(b["patient_id"]) for b in loader]
    assert sizes == [2, 1]


def test_bad_arguments(tmp_path: Path, caches: tuple[Path, Path]) -> None:
    a, _ = caches
    with pytest.raises(ValueError, match="neither a cache folder"):
        PatientDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cache file"):
        PatientDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="max_timepoints"):
        PatientDataset(a, max_timepoints=0)
    with pytest.raises(ValueError, match="dtype"):
        PatientDataset(a, dtype=torch.int64)
    with pytest.raises(ValueError, match="items is empty"):
        collate_patients([])
    ds = PatientDataset(a)
    other = dict(ds[0])
    other["images"] = torch.zeros(1, 4, S, S, S + 8)
    with pytest.raises(ValueError, match="images shape"):
        collate_patients([ds[0], other])
    with pytest.raises(ValueError, match="lacks key"):
        collate_patients([{k: v for k, v in ds[0].items() if k != "days"}])
    with pytest.raises(IndexError):
        ds.load_patient(3)


def test_a_bad_cache_file_is_named_with_its_reason(tmp_path: Path, caches: tuple[Path, Path]) -> None:
    """Files copied in by other means: metadata of another shape, a key missing, a mask that is not 0/1."""
    import json

    from strpnet_core.cache import cache_file_problem, load_cache_header, load_cached_patient

    a, _ = caches
    good = cache_path(a, "A-002")
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(arrays["meta_json"]).decode())

    def variant(name: str, **changes: object) -> Path:
        out = tmp_path / "bad" / f"{name}.npz"
        out.parent.mkdir(exist_ok=True)
        np.savez(out, **{**arrays, **changes})
        return out

    def as_bytes(obj: object) -> np.ndarray:
        return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)

    header = load_cache_header(good)
    assert (header.patient_id, header.event, header.has_recurrence) == ("A-002", 0, False)
    cases = {
        variant("list", meta_json=as_bytes([1, 2])): "not an object",
        variant("nokey", meta_json=as_bytes({k: v for k, v in meta.items() if k != "patient_id"})): "lacks patient_id",
        variant("mask", brain_mask=np.full(arrays["brain_mask"].shape, 2, np.uint8)): "other than 0 and 1",
        variant("shape", days=np.zeros(7, np.float32)): "days",
    }
    for path, reason in cases.items():
        with pytest.raises(ValueError, match=reason) as info:
            load_cached_patient(path)
        assert str(path) in str(info.value)
    assert "lacks patient_id" in (cache_file_problem(tmp_path / "bad" / "nokey.npz") or "")
    with pytest.raises(ValueError, match="not an object"):
        load_cache_header(tmp_path / "bad" / "list.npz")
    # in a folder, a file copied in half is left out with a warning (strpnet train stopped mid-epoch on it)
    half = a / "A-000-half.npz"
    half.write_bytes(good.read_bytes()[:500])
    try:
        ds = PatientDataset(a)
        assert half not in ds.files and len(ds) == len(list(a.glob("*.npz"))) - 1
    finally:
        half.unlink()
