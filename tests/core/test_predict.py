"""``strpnet predict``: the inverse mapping onto the pre-op T1c, the risk reference (aggregate quantiles), clear
errors on bad folders, and end to end on a synthetic ci patient with a briefly trained model.

The end-to-end tests (marked ``integration``) generate one ci site of 2 patients (seeded; one with a recurrence),
preprocess the patient with the recurrence, train a tiny ST-RPNet on it briefly (seeded) and predict it. The patient
is the training set: the test checks the geometric chain raw T1c -> model grid -> prediction -> raw T1c (a wrong
inverse mapping, a flipped axis or a shifted origin puts the map off the true recurrence; the test shows that a
mirrored map fails the same criterion), not generalisation to new patients.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from strpnet_core import cli
from strpnet_core.federation import (
    EVAL_COUNT_KEYS,
    RISK_HIST_BINS,
    RISK_HIST_HIGH,
    RISK_HIST_KEYS,
    RISK_HIST_LOW,
    RISK_HIST_MIN_PATIENTS,
    pool_eval_counts,
)
from strpnet_core.predict import (
    JSON_SUFFIX,
    MASK_SUFFIX,
    PNG_SUFFIX,
    PROB_SUFFIX,
    PredictError,
    predict_patient,
    run_model,
    select_patient,
)
from strpnet_core.preprocessing.resample import (
    grid_from_geometry,
    grid_geometry,
    model_grid,
    resample_from_grid,
    resample_to_grid,
)
from strpnet_core.risk_reference import (
    RISK_REFERENCE_JSON,
    k_anonymous_counts,
    load_risk_reference,
    percentile_of,
    quantiles_from_histogram,
    risk_histogram,
    site_risk_histogram,
    write_risk_reference,
    write_risk_reference_from_history,
)

SEED = 3  # ci cohort seed: patient SYN01-0002 has a recurrence
#: Tiny model, briefly trained on the one patient (30 Adam steps; pos-weight 100 for a ~30-voxel recurrence).
TRAIN_EPOCHS = 30
TRAIN_LR = 0.01
TRAIN_WIDTHS = ("4", "8")
TRAIN_SEED = 11


# ----------------------------------------------------------------------------------------------------------------------
# inverse mapping (unit)
# ----------------------------------------------------------------------------------------------------------------------
def _reference(size: tuple[int, int, int], spacing: tuple[float, float, float], angle_deg: float = 0.0) -> sitk.Image:
    """An empty 'pre-op T1c' with a brain-like ellipsoid mask, optionally rotated about z (oblique direction)."""
    ref = sitk.Image(list(size), sitk.sitkFloat32)
    ref.SetSpacing(list(spacing))
    ref.SetOrigin([-60.0, -70.0, -40.0])
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ref.SetDirection(rot.ravel().tolist())
    return ref


def _brain(ref: sitk.Image) -> sitk.Image:
    z, y, x = np.indices(ref.GetSize()[::-1]).astype(float)
    c = (np.array(ref.GetSize()[::-1]) - 1) / 2
    r = np.array(ref.GetSize()[::-1]) * 0.35
    inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    m = sitk.GetImageFromArray(inside.astype(np.uint8))
    m.CopyInformation(ref)
    return m


def _blob_on(img: sitk.Image, centre: np.ndarray, sigma_mm: float) -> np.ndarray:
    """exp(-|x - centre|^2 / (2 sigma^2)) at the physical centre of every voxel of ``img`` (z, y, x array)."""
    idx = np.indices(img.GetSize()[::-1]).reshape(3, -1)[::-1].T.astype(float)  # x, y, z indices
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    pts = np.asarray(img.GetOrigin()) + (idx * np.asarray(img.GetSpacing())) @ d.T
    val = np.exp(-np.sum((pts - centre) ** 2, axis=1) / (2 * sigma_mm**2))
    return val.reshape(img.GetSize()[::-1]).astype(np.float32)


def test_inverse_mapping_is_exact_when_grid_voxels_are_reference_voxels() -> None:
    ref = _reference((40, 44, 30), (4.0, 4.0, 4.0), angle_deg=20.0)
    brain = _brain(ref)
    grid = model_grid(ref, brain, 4.0, (16, 32, 32))
    geometry = grid_geometry(grid, ref)
    values = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    back = resample_from_grid(values, geometry, ref)
    assert back.GetSize() == ref.GetSize() and back.GetOrigin() == ref.GetOrigin()
    assert back.GetDirection() == ref.GetDirection() and back.GetSpacing() == ref.GetSpacing()
    again = resample_to_grid(back, grid)
    # Grid voxels inside the reference are reference voxels: values come back exactly (a grid voxel outside the
    # reference's field of view has nothing to come back from).
    inside_ref = resample_to_grid(sitk.Cast(ref * 0 + 1, sitk.sitkUInt8), grid, label=True) > 0
    assert inside_ref.sum() > 0.5 * inside_ref.size
    np.testing.assert_allclose(again[inside_ref], values[inside_ref], atol=1e-6)
    # Reference voxels outside the model grid's extent are 0.
    arr = sitk.GetArrayFromImage(back)
    cover = sitk.GetArrayFromImage(resample_from_grid(np.ones_like(values), geometry, ref, label=True))
    assert (cover == 0).sum() > 0 and np.all(arr[cover == 0] == 0)


def test_inverse_mapping_round_trips_on_an_oblique_anisotropic_scan() -> None:
    """Pre-op T1c of 1.1 x 0.9 x 3 mm voxels, rotated 25 degrees; model grid of 2 mm: a smooth map (Gaussian blob,
    sigma 12 mm) mapped back agrees with the blob at the T1c's voxels, and resampled once more onto the grid agrees
    with the original grid map, both within the error bound of (tri)linear interpolation,
    ``sum_axes h^2 / 8 * max|f''|`` with ``max|f''| = 1 / sigma^2`` for a unit Gaussian."""
    sigma = 12.0
    ref = _reference((100, 120, 40), (1.1, 0.9, 3.0), angle_deg=25.0)
    grid = model_grid(ref, _brain(ref), 2.0, (32, 48, 48))
    geometry = grid_geometry(grid, ref)
    bound_grid = sum(h * h for h in grid.GetSpacing()) / 8 / sigma**2  # 0.0104
    bound_ref = sum(h * h for h in ref.GetSpacing()) / 8 / sigma**2  # 0.0095
    centre = np.asarray(grid.TransformContinuousIndexToPhysicalPoint([20.0, 26.0, 15.0]))
    on_grid = _blob_on(grid, centre, sigma)
    back = resample_from_grid(on_grid, geometry, ref)
    truth_ref = _blob_on(ref, centre, sigma)
    cover = sitk.GetArrayFromImage(resample_from_grid(np.ones_like(on_grid), geometry, ref, label=True)) > 0
    err_ref = np.abs(sitk.GetArrayFromImage(back) - truth_ref)[cover]
    assert err_ref.max() < bound_grid, err_ref.max()
    again = resample_to_grid(back, grid)
    interior = np.zeros(on_grid.shape, dtype=bool)
    interior[3:-3, 3:-3, 3:-3] = True
    inside_ref = resample_to_grid(sitk.Cast(ref * 0 + 1, sitk.sitkUInt8), grid, label=True) > 0
    sel = interior & inside_ref
    assert sel.sum() > 1000
    assert np.abs(again - on_grid)[sel].max() < bound_grid + bound_ref
    # A wrong inverse (a flip of the grid's x axis) is far off: the check above can fail.
    flipped = resample_to_grid(resample_from_grid(on_grid[:, :, ::-1].copy(), geometry, ref), grid)
    assert np.abs(flipped - on_grid)[sel].max() > 0.3


def test_inverse_mapping_checks_shape_and_reference() -> None:
    ref = _reference((40, 44, 30), (4.0, 4.0, 4.0))
    grid = model_grid(ref, _brain(ref), 4.0, (16, 16, 16))
    geometry = grid_geometry(grid, ref)
    with pytest.raises(ValueError, match="shape"):
        resample_from_grid(np.zeros((16, 16, 8)), geometry, ref)
    other = _reference((40, 44, 30), (4.0, 4.0, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        resample_from_grid(np.zeros((16, 16, 16)), geometry, other)
    g, r = grid_from_geometry(geometry)
    assert g.GetSize() == grid.GetSize() and r.GetSize() == ref.GetSize()
    with pytest.raises(ValueError, match="grid_"):
        grid_from_geometry({k: v for k, v in geometry.items() if k != "grid_origin"})


# ----------------------------------------------------------------------------------------------------------------------
# risk reference (unit)
# ----------------------------------------------------------------------------------------------------------------------
def test_risk_histogram_bins_and_minimum_count() -> None:
    width = (RISK_HIST_HIGH - RISK_HIST_LOW) / RISK_HIST_BINS
    r = [RISK_HIST_LOW - 1, RISK_HIST_LOW, RISK_HIST_LOW + width * 0.999, RISK_HIST_LOW + width, RISK_HIST_HIGH, 99]
    h = risk_histogram(r)
    assert h.shape == (len(RISK_HIST_KEYS),) and h.sum() == len(r)
    assert h[0] == 1 and h[1] == 2 and h[2] == 1 and h[-1] == 2
    small = site_risk_histogram([0.1] * (RISK_HIST_MIN_PATIENTS - 1))
    assert set(small) == set(RISK_HIST_KEYS) and sum(small.values()) == 0
    enough = site_risk_histogram([0.1] * RISK_HIST_MIN_PATIENTS)
    assert sum(enough.values()) == pytest.approx(RISK_HIST_MIN_PATIENTS)
    with pytest.raises(ValueError, match="non-finite"):
        risk_histogram([0.0, float("nan")])

def test_site_histogram_cells_each_stand_for_at_least_k_patients() -> None:
    # groups tile the cells from the first to the last, k = 5: [0..3] (0 + 1 + 0 + 4 = 5, the empty cell 0
    # included), [4] (6), then [5..7] (2 < k) joins [4] -> [4..7] = 8
    c = np.array([0, 1, 0, 4, 6, 2, 0, 0])
    out = k_anonymous_counts(c, 5)
    assert np.allclose(out, [1.25, 1.25, 1.25, 1.25, 2, 2, 2, 2]) and out.sum() == pytest.approx(13)
    assert np.array_equal(k_anonymous_counts(c, 1), c) and not k_anonymous_counts(c, 14).any()
    rng = np.random.default_rng(1)
    for k in (2, 5, 9):
        for _ in range(50):
            risks = rng.normal(rng.uniform(-3, 3), rng.uniform(0.2, 4), int(rng.integers(k, 60)))
            raw = risk_histogram(risks)
            sent = np.array(list(site_risk_histogram(risks, min_patients=k).values()))
            assert sent.sum() == pytest.approx(raw.sum())
            # every maximal run of equal non-zero cells is one or more groups: its true count is >= k
            i = 0
            while i < len(sent):
                j = i + 1
                while j < len(sent) and sent[i] > 0 and np.isclose(sent[j], sent[i]):
                    j += 1
                if sent[i] > 0:
                    assert raw[i:j].sum() >= k and sent[i:j].sum() == pytest.approx(raw[i:j].sum())
                i = j


def test_site_histogram_does_not_show_the_extreme_patients_bins() -> None:
    """Groups that start at the first occupied bin show where the lowest-risk patient is (and the last group's end
    the highest); groups that reach the underflow and overflow cells do not: the outliers can move to the clamps
    without changing what is sent."""
    for k in (2, 5):
        rng = np.random.default_rng(k)
        risks = np.sort(rng.normal(0.0, 1.0, 30))
        moved = risks.copy()
        moved[0], moved[-1] = RISK_HIST_LOW - 3, RISK_HIST_HIGH + 3  # still the lowest and the highest
        sent = site_risk_histogram(risks, min_patients=k)
        assert site_risk_histogram(moved, min_patients=k) == sent
        values = list(sent.values())
        assert values[0] > 0 and values[-1] > 0  # the end groups reach the underflow and overflow cells


def test_quantiles_of_pooled_site_histograms_match_the_pooled_sample() -> None:
    """Three sites' histograms summed by the evaluation pooling give the quantiles of the union of their patients
    (numpy on the raw scores, which never leave the sites) within one bin width from the 10th to the 90th
    percentile; beyond, outwards."""
    rng = np.random.default_rng(3)
    sites = [rng.normal(-1.0, 1.5, 400), rng.normal(0.5, 1.0, 250), rng.normal(2.0, 2.0, 150)]
    replies = []
    for s in sites:
        reply = {k: 0 for k in EVAL_COUNT_KEYS}
        reply.update(site_risk_histogram(s))
        replies.append(reply)
    pooled = pool_eval_counts(replies)
    counts = np.array([pooled[k] for k in RISK_HIST_KEYS])
    assert counts.sum() == pytest.approx(800)
    q = quantiles_from_histogram(counts)
    ref = np.percentile(np.concatenate(sites), np.arange(1, 100))
    width = (RISK_HIST_HIGH - RISK_HIST_LOW) / RISK_HIST_BINS
    assert np.all(np.diff(q) >= 0)
    assert np.max(np.abs(q - ref)[9:90]) < width  # percentiles 10 to 90
    # the tails: each site's first and last groups reach the clamps, so its few extreme patients are spread outwards
    assert np.all(q[:9] <= ref[:9] + width) and np.all(q[90:] >= ref[90:] - width)


def test_reference_file_and_percentile(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    risks = rng.normal(0.0, 1.0, 2000)
    path = tmp_path / RISK_REFERENCE_JSON
    write_risk_reference(path, risk_histogram(risks), n_sites=3, source="test")
    text = path.read_text()
    assert "quantiles" in text and "histogram" in text
    ref = load_risk_reference(path)
    assert ref.n_patients == 2000 and ref.n_sites == 3 and len(ref.quantiles) == 99
    assert abs(percentile_of(0.0, ref) - 50) < 3
    assert abs(percentile_of(1.0, ref) - 84.1) < 3
    assert percentile_of(-50.0, ref) == 1.0 and percentile_of(50.0, ref) == 99.0
    ps = [percentile_of(x, ref) for x in np.linspace(-3, 3, 31)]
    assert np.all(np.diff(ps) >= 0)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="bad.json"):
        load_risk_reference(tmp_path / "bad.json")


def test_server_writes_the_reference_from_the_last_round(tmp_path: Path) -> None:
    row = {"round": 3, "eval_sites": 2.0, **{k: 0.0 for k in RISK_HIST_KEYS}}
    path, why = write_risk_reference_from_history(tmp_path, [row])
    assert path is None and "round 3 has no pooled risk histogram" in why  # every site below the minimum count
    assert not (tmp_path / RISK_REFERENCE_JSON).exists()
    row2 = dict(row, **site_risk_histogram(np.linspace(-2, 2, 30)))
    path, why = write_risk_reference_from_history(tmp_path, [row, row2])
    assert path is not None and "30 training patients of 2 site(s)" in why
    ref = load_risk_reference(path)
    assert ref.n_patients == 30 and ref.n_sites == 2 and "round 3" in ref.source
    # the same run resumed and ended in a round without a histogram: the earlier model's reference is removed
    gone, why = write_risk_reference_from_history(tmp_path, [row, row2, dict(row, round=4)])
    assert gone is None and "round 4" in why and "(an earlier model's)" in why
    assert not path.exists()


# ----------------------------------------------------------------------------------------------------------------------
# synthetic patient folders
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from strpnet_core.synth import generate_cohort

    out = tmp_path_factory.mktemp("predict-cohort")
    generate_cohort(out, sites=1, patients=[2], preset="ci", seed=SEED, png=False, progress=False)
    return out


def _event_patient(cohort: Path) -> str:
    rows = (cohort / "site-01" / "outcomes.csv").read_text().splitlines()[1:]
    events = [r.split(",")[0] for r in rows if r.split(",")[1] == "1"]
    assert events, "the seeded cohort must hold a patient with a recurrence"
    return events[0]


def _copy_patient(cohort: Path, pid: str, dest: Path) -> Path:
    """A raw folder holding only ``pid``: its scan folders and its scan_dates.csv rows (no outcomes)."""
    site = cohort / "site-01"
    dest.mkdir(parents=True)
    for d in site.glob(f"{pid}-*"):
        shutil.copytree(d, dest / d.name)
    lines = (site / "scan_dates.csv").read_text().splitlines()
    rows = [ln for ln in lines[1:] if ln.startswith(f"{pid},")]
    (dest / "scan_dates.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    return dest


def test_bad_patient_folder_gives_a_clear_error(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pid = _event_patient(cohort)
    folder = _copy_patient(cohort, pid, tmp_path / "patient")
    record, _, problems = select_patient(folder)
    assert record.patient_id == pid and record.event is None and problems == []
    # a damaged follow-up scan is dropped and named (also when the patient is chosen with --patient)
    scans = sorted(d for d in folder.iterdir() if d.is_dir())
    assert len(scans) >= 2
    t2w = next(scans[-1].glob("*-t2w.nii.gz"))
    intact = t2w.read_bytes()
    t2w.write_bytes(b"not an image")
    for chosen in (None, pid):
        dropped, _, problems = select_patient(folder, chosen)
        assert len(dropped.scans) == len(record.scans) - 1
        assert any(t2w.name in p for p in problems), problems
    t2w.write_bytes(intact)
    flair = next((folder / f"{pid}-000").glob("*-t2f.nii.gz"))
    flair.write_bytes(flair.read_bytes()[:200])  # truncated pre-op FLAIR
    with pytest.raises(PredictError, match=rf"{pid}-000-t2f\.nii\.gz"):
        select_patient(folder)
    with pytest.raises(PredictError, match="no usable patient"):
        select_patient(tmp_path)  # no scan folder at all
    with pytest.raises(PredictError, match="--patient"):
        select_patient(cohort / "site-01")  # two patients
    model = tmp_path / "model.pt"
    model.write_bytes(b"not a model")
    rc = cli.main(["predict", str(folder), "--model", str(model), "--out", str(tmp_path / "o")])
    assert rc == 2 and "model.pt" in capsys.readouterr().err
    with pytest.raises(PredictError, match="missing.pt"):
        predict_patient(folder, tmp_path / "missing.pt", tmp_path / "o")


# ----------------------------------------------------------------------------------------------------------------------
# end to end (integration)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Preprocess the patient with a recurrence, train a tiny ST-RPNet on it (seeded, ``strpnet train``), and write
    a risk reference from a few scores."""
    from strpnet_core.preprocessing.pipeline import preprocess_patient
    from strpnet_core.site import validate_site

    root = tmp_path_factory.mktemp("predict-run")
    cache = root / "cache"
    pid = _event_patient(cohort)
    index = validate_site(cohort / "site-01", require_outcomes=True, check_voxels=False)
    record = next(r for r in index.patients if r.patient_id == pid)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)
    res = preprocess_patient(record, site_name=index.site_name, out_dir=cache, preset="ci", seed=0)
    assert res.status == "ok", res.error
    run = root / "run"
    rc = cli.main(["train", "--cache", str(cache), "--out", str(run), "--epochs", str(TRAIN_EPOCHS),
                   "--lr", str(TRAIN_LR), "--model-widths", *TRAIN_WIDTHS, "--lstm-hidden", "8", "--dropout", "0",
                   "--seed", str(TRAIN_SEED), "--w-cox", "0.1", "--pos-weight", "100", "--num-threads", "1",
                   "--no-progress"])
    assert rc == 0
    # A reference from a spread of scores (a single training patient is below any sensible minimum count).
    write_risk_reference(run / RISK_REFERENCE_JSON, risk_histogram(np.linspace(-3, 3, 50)), n_sites=1, source="test")
    return {"cache": cache, "run": run, "model": run / "final_model.pt"}


@pytest.fixture(scope="module")
def predicted(cohort: Path, trained: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Predict the event patient through the API, reusing the training cache (no second preprocessing)."""
    pid = _event_patient(cohort)
    out = tmp_path_factory.mktemp("predict-out")
    res = predict_patient(cohort / "site-01", trained["model"], out, patient_id=pid, cache_dir=trained["cache"])
    return {"pid": pid, "res": res, "out": out}


@pytest.mark.integration
def test_outputs_have_the_input_t1c_geometry(cohort: Path, predicted: dict) -> None:
    pid, res = predicted["pid"], predicted["res"]
    t1c = cohort / "site-01" / f"{pid}-000" / f"{pid}-000-t1c.nii.gz"
    ref_nib, ref_itk = nib.load(t1c), sitk.ReadImage(str(t1c))
    for path, dtype in ((res.prob_path, np.float32), (res.mask_path, np.uint8)):
        img = nib.load(path)
        assert img.shape == ref_nib.shape
        np.testing.assert_array_equal(img.affine, ref_nib.affine)
        assert img.get_data_dtype() == dtype
        itk = sitk.ReadImage(str(path))
        assert itk.GetSize() == ref_itk.GetSize()
        assert itk.GetOrigin() == ref_itk.GetOrigin() and itk.GetSpacing() == ref_itk.GetSpacing()
        assert itk.GetDirection() == ref_itk.GetDirection()
    prob = np.asarray(nib.load(res.prob_path).dataobj)
    mask = np.asarray(nib.load(res.mask_path).dataobj)
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    np.testing.assert_array_equal(mask, (prob > res.threshold).astype(np.uint8))


@pytest.mark.integration
def test_map_round_trips_to_the_model_grid(predicted: dict, trained: dict) -> None:
    """The original-space map resampled back onto the model grid equals the model-grid map (ci: the grid's voxels
    are T1c voxels, so up to float rounding)."""
    from strpnet_core.cache import cache_path, load_cached_patient
    from strpnet_core.training import load_trained_model

    patient = load_cached_patient(cache_path(trained["cache"], predicted["pid"]))
    model, cfg, _ = load_trained_model(trained["model"])
    on_grid, risk, _ = run_model(model, cfg, patient, "auto")
    assert risk == pytest.approx(predicted["res"].risk, abs=1e-5)
    grid, _ = grid_from_geometry(patient.geometry)
    back = resample_to_grid(sitk.ReadImage(str(predicted["res"].prob_path)), grid)
    inside = patient.brain_mask > 0
    assert on_grid[inside].max() > 0.05
    np.testing.assert_allclose(back, on_grid, atol=1e-5)


@pytest.mark.integration
def test_map_covers_the_true_recurrence_better_than_chance(cohort: Path, predicted: dict) -> None:
    from strpnet_core.metrics import iso_volume_coverage

    pid, res = predicted["pid"], predicted["res"]
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(res.prob_path)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "site-01" / "recurrence" /
                                                      f"{pid}-recurrence.nii.gz"))) > 0
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "truth" / "site-01" / pid /
                                                      f"{pid}-000-brainmask.nii.gz"))) > 0
    truth &= brain
    inside, rest = float(prob[truth].mean()), float(prob[brain & ~truth].mean())
    coverage = iso_volume_coverage(prob, truth, brain)
    chance = truth.sum() / brain.sum()
    # The same map mirrored along a voxel axis (what a wrong inverse mapping would write) is off the recurrence.
    mirrored = [float(prob[:, :, ::-1][truth].mean()), float(prob[::-1][truth].mean())]
    print(f"mean p inside the true recurrence {inside:.3f}, rest of brain {rest:.3f}, inside when mirrored "
          f"{mirrored[0]:.3f} (x) / {mirrored[1]:.3f} (z); iso-volume coverage {coverage:.3f} (chance "
          f"{chance:.4f}); risk {res.risk:.3f}, percentile {res.percentile}")
    assert inside > 1.5 * rest
    assert max(mirrored) < 0.75 * inside


@pytest.mark.integration
def test_cli_end_to_end_writes_the_four_outputs(cohort: Path, trained: dict, predicted: dict, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """A fresh output folder: validation, preprocessing, inference and the four files, through ``strpnet``."""
    pid = predicted["pid"]
    folder = _copy_patient(cohort, pid, tmp_path / "patient")
    out = tmp_path / "out"
    rc = cli.main(["predict", str(folder), "--model", str(trained["model"]), "--out", str(out), "--device", "auto",
                   "--threshold", "0.4"])
    assert rc == 0, capsys.readouterr().err
    assert "percentile" in capsys.readouterr().out
    for suffix in (PROB_SUFFIX, MASK_SUFFIX, JSON_SUFFIX, PNG_SUFFIX):
        assert (out / f"{pid}{suffix}").is_file(), suffix
    summary = json.loads((out / f"{pid}{JSON_SUFFIX}").read_text())
    assert summary["threshold"] == 0.4 and summary["preset"] == "ci"
    assert len(summary["model_sha256"]) == 64
    ref = load_risk_reference(trained["run"] / RISK_REFERENCE_JSON)
    assert summary["risk_percentile"] == pytest.approx(percentile_of(summary["risk_score"], ref))
    # Same preprocessing settings and seed as the training cache: the same map as the API run that reused it.
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{pid}{PROB_SUFFIX}")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted["res"].prob_path)))
    assert np.abs(a - b).max() < 0.05
    png = (out / f"{pid}{PNG_SUFFIX}").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    pixels = mpimg.imread(out / f"{pid}{PNG_SUFFIX}")
    assert pixels.shape[0] > 200 and float(pixels[..., :3].std()) > 0.05  # not blank
    # Without a reference next to the model the percentile is null, with a note. The earlier prediction in the same
    # folder is replaced only with --force.
    shutil.copy(trained["model"], tmp_path / "model.pt")
    again = ["predict", str(folder), "--model", str(tmp_path / "model.pt"), "--out", str(out), "--preset", "ci"]
    assert cli.main(again) == 2 and "use --force" in capsys.readouterr().err
    assert json.loads((out / f"{pid}{JSON_SUFFIX}").read_text()) == summary  # untouched
    rc = cli.main([*again, "--force"])
    assert rc == 0
    summary = json.loads((out / f"{pid}{JSON_SUFFIX}").read_text())
    assert summary["risk_percentile"] is None and "no risk reference" in summary["risk_percentile_note"]
