"""What makes a finished patient due again, what a failure leaves behind, and a defective recurrence mask (no
registration runs here: tiny NIfTI files and a QC record written by hand)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from strpnet_core.cache import cache_path
from strpnet_core.contract import MODALITIES
from strpnet_core.preprocessing.pipeline import (
    PipelineSettings,
    _recurrence_mask,
    input_hash,
    is_done,
    preprocess_patient,
    qc_path,
)
from strpnet_core.preprocessing.resample import resample_to_grid
from strpnet_core.site.records import PatientRecord, Scan


def _nifti(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


def _record(root: Path, *, event: int = 1, time_days: float = 200.0) -> PatientRecord:
    scans = []
    for tp, day in (("000", 0.0), ("001", 90.0)):
        images = {m: _nifti(root / f"P-{tp}" / f"P-{tp}-{m}.nii.gz", np.full((4, 4, 4), 1.0, np.float32))
                  for m in MODALITIES}
        scans.append(Scan(tp, day, images, None))
    return PatientRecord("P", tuple(scans), event, time_days, None)


def test_a_changed_outcome_or_scan_makes_a_finished_patient_due_again(tmp_path: Path) -> None:
    rec = _record(tmp_path / "site")
    out, shash = tmp_path / "cache", PipelineSettings.from_preset("ci").hash(0)
    out.mkdir()
    cache_path(out, "P").write_bytes(b"npz")
    qc_path(out, "P").write_text(json.dumps({"status": "ok", "settings_hash": shash, "input_hash": input_hash(rec)}))
    assert is_done(out, rec, shash)
    assert not is_done(out, rec, "another-settings-hash")
    assert not is_done(out, _record(tmp_path / "site", event=0, time_days=400.0), shash)  # outcome updated
    later = PatientRecord("P", rec.scans[:1], 1, 200.0, None)  # a scan fewer (or more)
    assert not is_done(out, later, shash)
    f = rec.scans[1].images["t1c"]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # a scan file replaced
    assert not is_done(out, rec, shash)
    for text in ("[]", "null", "{"):  # a QC record that is not an object: due again, not a crash of the site
        qc_path(out, "P").write_text(text)
        assert not is_done(out, rec, shash)


def test_a_failed_patient_leaves_no_cache_file_of_an_earlier_run(tmp_path: Path) -> None:
    rec = _record(tmp_path / "site")
    rec.scans[0].images["t1c"].write_bytes(b"\x1f\x8b\x08\x00garbage")  # the pre-op T1c is now unreadable
    out = tmp_path / "cache"
    out.mkdir()
    cache_path(out, "P").write_bytes(b"an earlier run's cache file")
    res = preprocess_patient(rec, site_name="s", out_dir=out, preset="ci")
    assert res.status == "failed" and "step read" in (res.error or "")
    assert not cache_path(out, "P").exists()
    assert json.loads(qc_path(out, "P").read_text())["status"] == "failed"


def test_a_patient_gone_from_the_site_leaves_no_cache_file(tmp_path: Path) -> None:
    """A patient whose folders were removed from the site (consent withdrawn) or renamed kept its cache file, which
    the federation trained on; now its files are removed and reported. An empty site folder removes nothing."""
    from strpnet_core.cache import list_cache
    from strpnet_core.preprocessing.pipeline import preprocess_site
    from strpnet_core.site import validate_site
    from strpnet_core.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", sites=1, patients=[2], preset="ci", seed=3, png=False, progress=False)
    site, out, shash = tmp_path / "cohort" / "site-01", tmp_path / "cache", PipelineSettings.from_preset("ci").hash(0)
    out.mkdir()
    index = validate_site(site, check_voxels=False)
    for rec in index.patients:  # finished by an earlier run (no registration runs here)
        cache_path(out, rec.patient_id).write_bytes(b"npz")
        qc_path(out, rec.patient_id).write_text(json.dumps({"status": "ok", "settings_hash": shash,
                                                            "input_hash": input_hash(rec)}))
    for name in ("GONE.npz", "GONE.qc.json", "GONE.qc.png"):
        (out / name).write_bytes(b"x")
    report = preprocess_site(site, out, preset="ci", workers=1, progress=False)
    assert report.removed == ["GONE"] and [r.status for r in report.results] == ["skipped", "skipped"]
    assert sorted(p.name for p in out.glob("GONE*")) == [] and len(list_cache(out)) == 2
    assert "GONE" in report.table() and json.loads(report.report_path.read_text())["removed"] == ["GONE"]
    (tmp_path / "empty").mkdir()
    assert preprocess_site(tmp_path / "empty", out, preset="ci", workers=1, progress=False).removed == []
    assert len(list_cache(out)) == 2


def test_float64_voxels_beyond_float32_are_named_at_read(tmp_path: Path) -> None:
    """A float64 voxel of 1e39 passed the voxel check and became inf in the float32 pipeline, surfacing later as a
    confusing "non-finite values inside the brain mask"."""
    import pytest

    from strpnet_core.preprocessing.pipeline import PreprocessError, _read

    arr = np.random.default_rng(0).normal(size=(8, 8, 8))
    ok = _nifti(tmp_path / "ok.nii.gz", arr)
    assert _read(ok, "P", "000", "t1c").GetPixelID() == sitk.sitkFloat32
    arr[0, 0, 0] = 1e39
    big = _nifti(tmp_path / "big.nii.gz", arr)
    with pytest.raises(PreprocessError, match=r"big\.nii\.gz.*step read: float64 voxel values beyond the float32"):
        _read(big, "P", "000", "t1c")


def test_a_defective_recurrence_mask_is_dropped_with_its_reason(tmp_path: Path) -> None:
    rec = _record(tmp_path / "site")
    arr = np.zeros((4, 4, 4), np.float32)
    cases = {"fractional": (arr + 0.6, "not a binary mask"), "empty": (arr, "empty recurrence mask")}
    for name, (values, reason) in cases.items():
        qc: dict = {}
        path = _nifti(tmp_path / f"{name}.nii.gz", values)
        assert _recurrence_mask(PatientRecord("P", rec.scans, 1, 200.0, path), qc) is None
        assert reason in qc["recurrence_dropped"] and str(path) in qc["recurrence_dropped"]
    good = arr.copy()
    good[1, 1, 1] = 1
    qc = {}
    img = _recurrence_mask(PatientRecord("P", rec.scans, 1, 200.0, _nifti(tmp_path / "good.nii.gz", good)), qc)
    assert img is not None and not qc


def test_label_resampling_keeps_fractional_labels() -> None:
    img = sitk.GetImageFromArray(np.full((4, 4, 4), 0.6, np.float32))
    assert resample_to_grid(img, img, label=True).all()  # a cast to uint8 before the threshold made this 0


class _DiesInTheWorker(PatientRecord):
    """A job whose unpickling kills the worker process at once (as the kernel's OOM killer would)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os._exit, (3,))


def test_a_worker_that_dies_fails_its_own_patient_only(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The dead worker breaks the pool; every other patient is run again and gets its own result."""
    import strpnet_core.site as site
    from strpnet_core.preprocessing.pipeline import preprocess_site
    from strpnet_core.site.records import SiteIndex

    good = [_record(tmp_path / f"site-{i}") for i in range(6)]
    good = [PatientRecord(f"P{i}", r.scans, r.event, r.time_days, None) for i, r in enumerate(good)]
    base = _record(tmp_path / "site-x")
    dies = _DiesInTheWorker("DIES", base.scans + base.scans[1:], 1, 200.0, None)  # most scans: submitted first
    index = SiteIndex(site_name="s", site_dir=tmp_path, patients=[dies, *good])
    monkeypatch.setattr(site, "validate_site", lambda *a, **k: index)
    report = preprocess_site(tmp_path, tmp_path / "cache", workers=2, preset="ci", progress=False, threads=1)
    by_id = {r.patient_id: r for r in report.results}
    assert "worker process died" in (by_id["DIES"].error or "")
    for r in good:  # constant images: each fails on its own, at the read step, not with the dead worker
        assert by_id[r.patient_id].status == "failed" and "step read" in (by_id[r.patient_id].error or "")


def test_a_smaller_field_of_view_is_not_counted_as_tissue() -> None:
    """A follow-up that covers only part of the grid: its z-score statistics use the covered brain voxels only."""
    from strpnet_core.preprocessing import z_score_normalize
    from strpnet_core.preprocessing.resample import field_of_view_on_grid

    grid = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    rng = np.random.default_rng(0)
    half = sitk.GetImageFromArray((100 + 10 * rng.standard_normal((10, 10, 5))).astype(np.float32))  # x < 5 only
    fov = field_of_view_on_grid(half, grid)
    assert fov[:, :, :5].all() and not fov[:, :, 5:].any()
    arr = resample_to_grid(half, grid)
    brain = np.ones((10, 10, 10), bool)
    z = z_score_normalize(arr, brain & fov.astype(bool))
    assert abs(float(z[:, :, :5].mean())) < 1e-6 and abs(float(z[:, :, :5].std()) - 1) < 1e-6
    assert not z[:, :, 5:].any()
    assert float(z_score_normalize(arr, brain)[:, :, :5].mean()) > 0.9  # the zeros as tissue: every seen voxel "bright"
