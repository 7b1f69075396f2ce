"""End-to-end preprocessing on a tiny synthetic ci cohort, checked against the generator's truth.

One cohort per test session (``generate_cohort(sites=2, patients=[2, 1], preset="ci")``: site-01 skull-stripped
with 2 patients, site-02 skull-on with 1), preprocessed once in-process (``preprocess_patient`` with
``transforms_out``, so the registrations are not run twice).  Truth convention (docs/architecture.md): S maps a
point of a written image to the pre-op T1c space; the error of an estimated T (pre-op T1c -> image) at a brain
voxel y of the image is ``|T(S(y)) - y|``.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from strpnet_core.cache import load_cached_patient
from strpnet_core.preprocessing.brain import brain_mask
from strpnet_core.preprocessing.pipeline import PipelineSettings, preprocess_patient, preprocess_site
from strpnet_core.preprocessing.qc import dice
from strpnet_core.preprocessing.registration import mean_displacement_error
from strpnet_core.preprocessing.threads import itk_threads
from strpnet_core.site import validate_site

SEED = 7
SPACING = 4.0


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from strpnet_core.synth import generate_cohort

    out = tmp_path_factory.mktemp("ci-cohort")
    generate_cohort(out, sites=2, patients=[2, 1], preset="ci", seed=SEED, png=False, progress=False)
    return out


@pytest.fixture(scope="session")
def processed(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Preprocess every patient once; keep the transforms used, per patient."""
    cache = tmp_path_factory.mktemp("ci-cache")
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)
    out: dict = {"cache": cache, "patients": {}}
    for site_dir in sorted(cohort.glob("site-*")):
        index = validate_site(site_dir, require_outcomes=True, check_voxels=False)
        for rec in index.patients:
            tx: dict = {}
            res = preprocess_patient(rec, site_name=index.site_name, out_dir=cache / site_dir.name, preset="ci",
                                     seed=0, transforms_out=tx)
            out["patients"][rec.patient_id] = (site_dir.name, rec, res, tx)
    return out


def _truth_errors(cohort: Path, processed: dict) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean errors (mm) per image: longitudinal T1c, other modalities (full chain to the pre-op T1c), the
    longitudinal T1c outside a ball around the tumour (seed +- diagnosis radius + margin + 15 mm), and the
    within-scan error of the pre-op T1n/T2w/FLAIR."""
    long, mods, long_far, within = [], [], [], []
    for pid, (site, rec, res, tx) in processed["patients"].items():
        assert res.status == "ok", res.error
        tdir = cohort / "truth" / site / pid
        info = json.loads((tdir / "truth.json").read_text())
        radius = info["diagnosis_diameter_mm"] / 2 + info["resection_margin_mm"] + 15.0
        for scan in rec.scans:
            if scan.timepoint not in res.timepoints:
                continue
            tmask = sitk.ReadImage(str(tdir / f"{pid}-{scan.timepoint}-brainmask.nii.gz"))
            for m, path in scan.images.items():
                if scan.timepoint == "000" and m == "t1c":
                    continue
                truth = sitk.ReadTransform(str(tdir / f"{pid}-{scan.timepoint}-{m}.tfm"))
                img = sitk.ReadImage(str(path))
                mmask = sitk.Resample(tmask, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
                err = mean_displacement_error(tx[(scan.timepoint, m)], truth, mmask, max_points=4000)
                (long if m == "t1c" else mods).append(err)
                if scan.timepoint == "000":
                    within.append(err)  # pre-op: S = R_mod, the pure within-scan error
                if m == "t1c":
                    arr = sitk.GetArrayFromImage(mmask)
                    for z, y, x in np.argwhere(arr > 0):
                        p = mmask.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
                        if np.linalg.norm(np.subtract(truth.TransformPoint(p), info["seed_point_lps_mm"])) < radius:
                            arr[z, y, x] = 0
                    far = sitk.GetImageFromArray(arr)
                    far.CopyInformation(mmask)
                    long_far.append(mean_displacement_error(tx[(scan.timepoint, m)], truth, far, max_points=4000))
    return long, mods, long_far, within


def test_truth_convention_sanity(cohort: Path) -> None:
    """Plugging the exact inverse of S into the error gives 0; the identity gives the misalignment itself."""
    tdir = cohort / "truth" / "site-01" / "SYN01-0001"
    s = sitk.ReadTransform(str(tdir / "SYN01-0001-000-t2w.tfm"))  # pre-op: S = R_mod (invertible rigid)
    mask = sitk.ReadImage(str(tdir / "SYN01-0001-000-brainmask.nii.gz"))
    assert mean_displacement_error(s.GetInverse(), s, mask) < 1e-6
    assert mean_displacement_error(sitk.Transform(3, sitk.sitkIdentity), s, mask) > 0.3


def test_registration_accuracy_vs_truth(cohort: Path, processed: dict) -> None:
    long, mods, long_far, within = _truth_errors(cohort, processed)
    assert long and mods and within
    # Within-scan (pre-op modality -> T1c): meets the target, <= 1 mm mean and < half a voxel.
    assert np.mean(within) <= 1.0 and max(within) < SPACING / 2
    print(f"errors (mm): within {np.round(within, 3)} longitudinal {np.round(long, 3)} far from the tumour "
          f"{np.round(long_far, 3)} follow-up modalities mean {np.mean(mods):.3f} max {max(mods):.3f}")
    # Full chain of the follow-up modalities (-> own T1c -> pre-op T1c) carries the longitudinal error.
    assert np.mean(mods) <= 1.2 and max(mods) < SPACING / 2
    # Longitudinal T1c -> pre-op T1c: below half a voxel; the 1 mm target is NOT met at 4 mm (1.054 mm measured with
    # the demons stage and the lesion left out of N4, 0.980 with it kept in, 1.29 with rigid + affine only;
    # docs/preprocessing.md).
    assert max(long) < SPACING / 2 and np.mean(long) <= 1.25
    assert max(long_far) < SPACING / 2


def test_n4_brain_and_zscore(cohort: Path, processed: dict) -> None:
    from strpnet_core.preprocessing.bias import flair_lesion_mask, n4_correct
    from strpnet_core.synth.truth_regions import score_bias_correction, white_matter_probability

    sites = {s["name"]: s for s in json.loads((cohort / "truth" / "cohort.json").read_text())["sites"]}
    corrs, dices, cv_clean, cv_in, cv_n4 = [], [], [], [], []
    for pid, (site, rec, res, _) in processed["patients"].items():
        tdir = cohort / "truth" / site / pid
        info = json.loads((tdir / "truth.json").read_text())
        pwm = white_matter_probability(info, "ci")
        for scan in rec.scans[:2]:
            tmask = sitk.ReadImage(str(tdir / f"{pid}-{scan.timepoint}-brainmask.nii.gz"))
            img = sitk.ReadImage(str(scan.images["t1c"]), sitk.sitkFloat32)
            flair = sitk.ReadImage(str(scan.images["t2f"]), sitk.sitkFloat32)  # its lesion left out, as the pipeline does
            lesion = flair_lesion_mask(flair, sitk.Resample(tmask, flair, sitk.Transform(), sitk.sitkNearestNeighbor))
            corrected, lb = n4_correct(img, tmask, exclude=lesion)
            mk = sitk.GetArrayFromImage(tmask) > 0
            bias = sitk.GetArrayFromImage(sitk.ReadImage(str(tdir / f"{pid}-{scan.timepoint}-t1c-bias.nii.gz")))
            truth_s = sitk.ReadTransform(str(tdir / f"{pid}-{scan.timepoint}-t1c.tfm"))
            scores = score_bias_correction(img, corrected, lb, mk, bias, sites[site]["intensity_offset"], truth_s,
                                           info, pwm)
            assert scores.wm_voxels > 500
            corrs.append(scores.corr)
            cv_clean.append(scores.cv_clean)
            cv_in.append(scores.cv_written)
            cv_n4.append(scores.cv_corrected)
            if site == "site-02":  # skull-on site: atlas brain extraction
                bm, method = brain_mask(img, seed=0)
                assert method == "atlas"
                dices.append(dice(sitk.GetArrayFromImage(bm), sitk.GetArrayFromImage(tmask)))
        cached = load_cached_patient(res.cache_file)
        m = cached.brain_mask > 0
        x = cached.images.astype(np.float64)
        assert np.abs(x[:, :, m].mean(-1)).max() < 1e-2 and np.abs(x[:, :, m].std(-1) - 1).max() < 1e-2
        assert np.all(x[:, :, ~m] == 0)
    print(f"N4 corr {np.round(corrs, 3)}; WM CV clean {np.round(cv_clean, 4)} input {np.round(cv_in, 4)} "
          f"N4 {np.round(cv_n4, 4)}; atlas Dice {np.round(dices, 4)}")
    # Mean over scans meets 0.85 (measured 0.911 with the eroded N4 fit mask); single scans dip where the true field
    # is nearly flat (0.819 on a stripped follow-up, 0.66 before the eroded fit; same minimum on seed 11): floor 0.75.
    assert np.mean(corrs) >= 0.85 and min(corrs) >= 0.75
    # White-matter CV back near the bias-free value (measured N4 / bias-free <= 1.01; 1.09 over all 36 images of
    # seed 11) and well below the biased input's.
    assert max(np.divide(cv_n4, cv_clean)) <= 1.15 and np.mean(cv_n4) < 0.8 * np.mean(cv_in)
    # Target 0.97 per scan: met on the pre-op scan (0.980), not on the follow-up (0.961; 0.958 before the
    # refinement change).  At 4 mm even the true mask refined gives <= 0.968 (docs/preprocessing.md): floor 0.95.
    assert dices and min(dices) >= 0.95


def test_resume_skips_done_patients(cohort: Path, processed: dict) -> None:
    out = processed["cache"] / "site-01"
    report = preprocess_site(cohort / "site-01", out, preset="ci", seed=0, progress=False)
    assert [r.status for r in report.results] == ["skipped"] * len(report.results) and report.results
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # made by the first run: closed to other users


def test_cache_geometry_maps_back_to_preop(cohort: Path, processed: dict) -> None:
    """The recurrence label on the model grid, resampled back through the cache geometry onto the pre-op T1c,
    overlaps the site's recurrence mask."""
    done = 0
    for pid, (site, rec, res, _) in processed["patients"].items():
        cached = load_cached_patient(res.cache_file)
        if cached.recurrence is None or not cached.recurrence.any():
            continue
        g = cached.geometry
        grid = sitk.GetImageFromArray(np.asarray(cached.recurrence, dtype=np.uint8))
        grid.SetOrigin(g["grid_origin"])
        grid.SetSpacing(g["grid_spacing"])
        grid.SetDirection(g["grid_direction"])
        ref = sitk.Image([int(v) for v in g["reference_size"]], sitk.sitkUInt8)
        ref.SetOrigin(g["reference_origin"])
        ref.SetSpacing(g["reference_spacing"])
        ref.SetDirection(g["reference_direction"])
        back = sitk.GetArrayFromImage(sitk.Resample(grid, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        site_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(rec.recurrence))) > 0
        assert back.shape == site_mask.shape
        assert dice(back, site_mask) >= 0.9
        done += 1
    assert done >= 1


def test_corrupted_scans(cohort: Path, processed: dict, tmp_path: Path) -> None:
    """A truncated follow-up scan is excluded with a reason naming it while its patient goes on; a truncated
    pre-op scan fails (or excludes) only that patient."""
    site = tmp_path / "site-01"
    shutil.copytree(cohort / "site-01", site)
    follow = site / "SYN01-0001-001" / "SYN01-0001-001-t2w.nii.gz"
    follow.write_bytes(follow.read_bytes()[: follow.stat().st_size // 2])
    pre = site / "SYN01-0002-000" / "SYN01-0002-000-t1c.nii.gz"
    pre.write_bytes(pre.read_bytes()[: pre.stat().st_size // 2])
    out = tmp_path / "cache"
    # Reuse nothing: SYN01-0001 is re-run on the damaged site.
    report = preprocess_site(site, out, preset="ci", seed=0, progress=False)
    by_id = {r.patient_id: r for r in report.results}
    ok = by_id["SYN01-0001"]
    assert ok.status == "ok" and "001" not in ok.timepoints and "000" in ok.timepoints
    reasons = " ".join(report.validation_problems) + " " + " ".join(ok.excluded_scans.values())
    assert "SYN01-0001-001-t2w" in reasons
    bad = by_id.get("SYN01-0002")
    if bad is not None:  # the validator may already have excluded it (header-level check)
        assert bad.status == "failed" and "SYN01-0002" in (bad.error or "") and "000" in (bad.error or "")
    else:
        assert any("SYN01-0002-000-t1c" in p for p in report.validation_problems)
    assert (out / "SYN01-0001.npz").exists() and not (out / "SYN01-0002.npz").exists()


def test_settings_hash_changes_with_settings() -> None:
    a = PipelineSettings.from_preset("ci")
    assert a.hash(0) == PipelineSettings.from_preset("ci").hash(0) != a.hash(1)


def test_output_does_not_depend_on_the_thread_count(processed: dict, tmp_path: Path) -> None:
    """The session's caches were made on 2 SimpleITK threads; the same patients on 1 thread give bit-identical
    images (registration and N4, whose threaded sums vary with the count and from run to run, run on one thread:
    ``preprocessing/threads.py``). One patient of each site kind: skull-stripped, and skull-on (atlas)."""
    chosen = {}
    for pid, (site, rec, res, _) in processed["patients"].items():
        chosen.setdefault(site, (pid, rec))
    with itk_threads(1):
        for site, (pid, rec) in chosen.items():
            res = preprocess_patient(rec, site_name=site, out_dir=tmp_path / site, preset="ci", seed=0)
            assert res.status == "ok", res.error
            one = load_cached_patient(tmp_path / site / f"{pid}.npz")
            two = load_cached_patient(processed["cache"] / site / f"{pid}.npz")
            np.testing.assert_array_equal(one.images, two.images)
            np.testing.assert_array_equal(one.brain_mask, two.brain_mask)
    assert len(chosen) == 2
