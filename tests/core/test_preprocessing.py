"""Preprocessing: z-score, registration, N4, brain extraction, model grid, QC flags (phantoms on MNI152 at 4 mm)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from strpnet_core.preprocessing import z_score_normalize
from strpnet_core.preprocessing.bias import n4_correct
from strpnet_core.preprocessing.brain import _atlas, brain_mask, stripped_mask
from strpnet_core.preprocessing.pipeline import longest_first
from strpnet_core.preprocessing.qc import metric_flags, robust_z
from strpnet_core.preprocessing.registration import (
    BSplineSettings,
    DemonsSettings,
    LinearSettings,
    mean_displacement_error,
    register_bspline,
    register_longitudinal,
    register_rigid,
    sampling_fractions,
)
from strpnet_core.preprocessing.resample import ANISOTROPY_LIMIT, grid_geometry, isotropic_copy, model_grid
from strpnet_core.preprocessing.threads import itk_threads

sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)
SP = 4.0


@pytest.fixture(scope="module")
def ref() -> tuple[sitk.Image, sitk.Image]:
    t1, mask = _atlas(2)
    size = [int(round(sz * sp / SP)) for sz, sp in zip(t1.GetSize(), t1.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([SP] * 3)
    grid.SetDirection(t1.GetDirection())
    grid.SetOrigin(t1.GetOrigin())
    img = sitk.Resample(sitk.SmoothingRecursiveGaussian(t1, SP / 2.5), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    m = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = sitk.GetArrayFromImage(img) * 1000.0
    arr[sitk.GetArrayViewFromImage(m) == 0] = 0
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    return out, m


def _truth(ref: sitk.Image, seed: int) -> sitk.Transform:
    rng = np.random.default_rng(seed)
    centre = ref.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ref.GetSize()])
    eul = sitk.Euler3DTransform(centre, *np.deg2rad(rng.uniform(-6, 6, 3)))
    aff = sitk.AffineTransform(3)
    aff.SetCenter(centre)
    aff.SetMatrix((np.asarray(eul.GetMatrix()).reshape(3, 3) @ np.diag(1 + rng.uniform(-0.03, 0.03, 3))).ravel().tolist())
    aff.SetTranslation(rng.uniform(-8, 8, 3).tolist())
    bs = sitk.BSplineTransformInitializer(ref, [3, 3, 3], 3)
    bs.SetParameters(rng.normal(0, 2.0, bs.GetNumberOfParameters()).tolist())
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(aff)
    comp.AddTransform(bs)
    return comp


def test_z_score_normalize() -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(300, 40, (10, 12, 14))
    mask = np.zeros(vol.shape, bool)
    mask[2:8, 3:9, 4:10] = True
    z = z_score_normalize(vol, mask)
    v = vol[mask]
    np.testing.assert_allclose(z[mask], (v - v.mean()) / v.std(), rtol=1e-6, atol=1e-6)  # voxel by voxel, in place
    assert abs(z[mask].mean()) < 1e-5 and abs(z[mask].std() - 1) < 1e-5
    assert np.all(z[~mask] == 0) and np.isfinite(z).all()
    with_nan = vol.copy()
    with_nan[5, 5, 5] = np.nan  # inside the mask
    with pytest.raises(ValueError, match="non-finite"):
        z_score_normalize(with_nan, mask)
    with_nan[0, 0, 0] = np.inf  # outside the mask only: ignored
    with_nan[5, 5, 5] = 1.0
    assert np.isfinite(z_score_normalize(with_nan, mask)).all()
    with pytest.raises(ValueError, match="empty"):
        z_score_normalize(vol, np.zeros_like(mask))
    with pytest.raises(ValueError, match="standard deviation"):
        z_score_normalize(np.full(vol.shape, 5.0), mask)
    with pytest.raises(ValueError, match="shape"):
        z_score_normalize(vol, mask[:-1])


def test_registration_recovers_known_transform_and_is_deterministic(ref) -> None:
    img, m = ref
    S = _truth(img, 1)
    moving = sitk.Resample(img, img, S, sitk.sitkLinear, 0.0)
    mmask = sitk.Resample(m, img, S, sitk.sitkNearestNeighbor, 0)
    bs = BSplineSettings((80.0,), (8.0,))
    r1 = register_longitudinal(img, moving, fixed_mask=m, bspline=bs, seed=3)
    err = mean_displacement_error(r1.transform, S, mmask)
    assert err <= 1.0 and err < SP / 2
    # Seeded sampling, and the registrations run on one ITK thread whatever the process's setting (ITK's threaded
    # Mattes MI sums in a varying order: on 2 threads two runs differed by ~1e-6 mm here): bit-identical.
    with itk_threads(2):
        runs = [register_longitudinal(img, moving, fixed_mask=m, bspline=bs, seed=3) for _ in range(2)]
    p = [(1.0, 2.0, 3.0), (-20.0, 10.0, 5.0), (30.0, -40.0, 12.0)]
    for r in runs:
        assert [r.transform.TransformPoint(q) for q in p] == [r1.transform.TransformPoint(q) for q in p]


def test_sampling_fractions_keep_at_least_min_samples() -> None:
    n = 200_000.0  # voxels inside the fixed mask at full resolution
    fr = sampling_fractions(n, (4, 2, 1), 0.05, 5000)
    samples = [f * n / s**3 for f, s in zip(fr, (4, 2, 1))]
    assert fr[0] == 1.0  # 3 125 voxels at shrink 4: all of them
    assert samples[1] == pytest.approx(5000)  # 25 000 voxels: 5 % would be 1 250
    assert samples[2] == pytest.approx(0.05 * n)  # 10 000 = 5 % of 200 000 > 5 000
    assert sampling_fractions(n, (2,), 0.05, 20_000) == [pytest.approx(0.8)]


def test_rigid_with_fewer_samples_recovers_a_known_pose(ref) -> None:
    """The within-scan / longitudinal linear settings of demo and brats draw 5 000 samples per level."""
    img, m = ref
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    S = sitk.Euler3DTransform(centre, *np.deg2rad([3.0, -4.0, 2.0]), (4.0, -3.0, 2.5))
    moving = sitk.Resample(img, img, S, sitk.sitkLinear, 0.0)
    mmask = sitk.Resample(m, img, S, sitk.sitkNearestNeighbor, 0)
    r = register_rigid(img, moving, fixed_mask=m, settings=LinearSettings(min_samples=5000), seed=2)
    assert mean_displacement_error(r.transform, S, mmask) < 0.5


def test_longest_first_starts_patients_with_most_scans() -> None:
    class Rec:
        def __init__(self, pid: str, n: int) -> None:
            self.patient_id, self.scans = pid, [object()] * n

    recs = [Rec(p, n) for p, n in (("a", 3), ("b", 2), ("c", 4), ("d", 2), ("e", 3))]
    assert [r.patient_id for r in longest_first(recs)] == ["c", "a", "e", "b", "d"]
    assert longest_first([]) == []


def test_demons_refines_a_warp_that_affine_leaves(ref) -> None:
    """A smooth warp (B-spline, 3 mm std per node on a ~70 mm mesh) on a 4 mm image: rigid + affine leave part of
    it; the demons stage (ci's refinement) recovers most of the rest, is accepted by the MI check and is
    deterministic."""
    img, m = ref
    rng = np.random.default_rng(5)
    warp = sitk.BSplineTransformInitializer(img, [3, 3, 3], 3)
    warp.SetParameters(rng.normal(0, 3.0, warp.GetNumberOfParameters()).tolist())
    moving = sitk.Resample(img, img, warp, sitk.sitkLinear, 0.0)
    mmask = sitk.Resample(m, img, warp, sitk.sitkNearestNeighbor, 0)
    linear = register_longitudinal(img, moving, fixed_mask=m, bspline=None, seed=3)
    dense = register_longitudinal(img, moving, fixed_mask=m, bspline=None, demons=DemonsSettings(),
                                  moving_brain=mmask, seed=3)
    err_linear = mean_displacement_error(linear.transform, warp, mmask)
    err_dense = mean_displacement_error(dense.transform, warp, mmask)
    assert dense.stages["demons"]["accepted"] == "True" and dense.evaluated < linear.evaluated
    assert err_dense < 0.6 * err_linear and err_dense < 1.0, (err_linear, err_dense)
    again = register_longitudinal(img, moving, fixed_mask=m, bspline=None, demons=DemonsSettings(),
                                  moving_brain=mmask, seed=3)
    q = (5.0, -10.0, 12.0)
    assert np.allclose(dense.transform.TransformPoint(q), again.transform.TransformPoint(q), atol=0.05)
    with pytest.raises(ValueError, match="moving_brain"):
        register_longitudinal(img, moving, fixed_mask=m, bspline=None, demons=DemonsSettings(), seed=3)


def test_multichannel_demons_averages_the_channels_forces(ref) -> None:
    """The same warp seen by a second contrast (an inverted, smoothed copy, like a T2w of the T1c's anatomy): the
    multichannel stage recovers it too; a channel that repeats the first gives exactly the single-channel field
    (the mean of equal updates), and the extra channels run as one per iteration."""
    from strpnet_core.preprocessing.registration import register_demons

    img, m = ref
    rng = np.random.default_rng(5)
    warp = sitk.BSplineTransformInitializer(img, [3, 3, 3], 3)
    warp.SetParameters(rng.normal(0, 3.0, warp.GetNumberOfParameters()).tolist())
    other = sitk.SmoothingRecursiveGaussian(sitk.Cast(m, sitk.sitkFloat32) * 1000.0 - img, 2.0)
    moving, moving_other = (sitk.Resample(x, img, warp, sitk.sitkLinear, 0.0) for x in (img, other))
    mmask = sitk.Resample(m, img, warp, sitk.sitkNearestNeighbor, 0)
    linear = register_longitudinal(img, moving, fixed_mask=m, bspline=None, seed=3).transform
    settings = DemonsSettings(iterations=20)
    one = register_demons(img, moving, linear=linear, fixed_mask=m, moving_mask=mmask, settings=settings)
    same = register_demons(img, moving, linear=linear, fixed_mask=m, moving_mask=mmask, settings=settings,
                           extra=[(img, moving)])
    two = register_demons(img, moving, linear=linear, fixed_mask=m, moving_mask=mmask, settings=settings,
                          extra=[(other, moving_other)])
    q = (5.0, -10.0, 12.0)
    assert np.allclose(one.transform.TransformPoint(q), same.transform.TransformPoint(q), atol=1e-6)
    assert "2 channels" in two.stop
    err = [mean_displacement_error(t, warp, mmask) for t in (linear, one.transform, two.transform)]
    assert err[2] < 0.7 * err[0], err


def test_n4_fit_grid_is_about_8_mm_along_every_axis() -> None:
    from strpnet_core.preprocessing.bias import fit_shrink

    assert fit_shrink((2.0, 2.0, 2.0), (120, 120, 78), 8.0) == [4, 4, 4]
    assert fit_shrink((1.0, 1.0, 5.0), (240, 240, 30), 8.0) == [8, 8, 2]  # thick slices: 10 mm, not 40
    assert fit_shrink((1.0, 1.0, 1.0), (240, 240, 40), 8.0) == [8, 8, 5]  # >= 8 voxels kept along each axis
    assert fit_shrink((4.0, 4.0, 4.0), (60, 60, 39), 8.0, shrink=3) == [3, 3, 3]


def test_n4_recovers_bias(ref) -> None:
    """A scanner-like field (as the synth generator draws it: exp(b n), n a unit smooth random field of 120 mm
    correlation, b = 0.3) is recovered inside the brain and the WM spread goes back near its clean value."""
    from strpnet_core.synth.fields import smooth_noise

    img, m = ref
    arr = sitk.GetArrayFromImage(img)
    log_true = 0.3 * smooth_noise(np.random.default_rng(5), arr.shape, SP, 120.0)
    biased = sitk.GetImageFromArray((arr * np.exp(log_true)).astype(np.float32))
    biased.CopyInformation(img)
    corrected, log_est = n4_correct(biased, m)
    mk = sitk.GetArrayViewFromImage(m) > 0
    assert np.corrcoef(sitk.GetArrayFromImage(log_est)[mk], log_true[mk])[0, 1] >= 0.85
    wm = mk & (arr > np.percentile(arr[mk], 80))
    cv = lambda a: a[wm].std() / a[wm].mean()  # noqa: E731
    c = sitk.GetArrayFromImage(corrected)
    assert cv(c) < cv(arr * np.exp(log_true))
    assert cv(c) <= 1.15 * cv(arr)


def test_brain_extraction_stripped_and_skull(ref) -> None:
    img, m = ref
    sm = stripped_mask(img)
    assert sm is not None
    mk = sitk.GetArrayFromImage(m) > 0
    a = sitk.GetArrayFromImage(sm) > 0
    assert 2 * (a & mk).sum() / (a.sum() + mk.sum()) > 0.97
    # Skull-on: CSF rim, bone, bright scalp, noisy background.
    rng = np.random.default_rng(0)
    arr = sitk.GetArrayFromImage(img)
    med = float(np.median(arr[mk]))
    d = lambda mm: ndimage.binary_dilation(mk, iterations=max(1, round(mm / SP)))  # noqa: E731
    arr[d(4) & ~mk] = 0.15 * med
    arr[d(8) & ~d(4)] = 0.1 * med
    arr[d(16) & ~d(8)] = 1.3 * med
    arr = arr + np.abs(rng.normal(0, 0.02 * med, arr.shape))
    skull = sitk.GetImageFromArray(arr.astype(np.float32))
    skull.CopyInformation(img)
    assert stripped_mask(skull) is None
    bm, how = brain_mask(skull, seed=0)
    b = sitk.GetArrayFromImage(bm) > 0
    assert how == "atlas"
    assert 2 * (b & mk).sum() / (b.sum() + mk.sum()) >= 0.97


def test_model_grid_centred_on_brain(ref) -> None:
    img, m = ref
    g = model_grid(img, m, 4.0, (48, 48, 48))
    assert g.GetSize() == (48, 48, 48) and g.GetDirection() == img.GetDirection()
    nz = np.argwhere(sitk.GetArrayViewFromImage(m) > 0)
    centre = m.TransformContinuousIndexToPhysicalPoint(((nz.min(0) + nz.max(0)) / 2)[::-1].tolist())
    gc = g.TransformContinuousIndexToPhysicalPoint([23.5] * 3)
    assert np.allclose(centre, gc, atol=img.GetSpacing()[0] / 2 + 1e-6)  # snapped to the reference lattice
    assert np.allclose(img.TransformPhysicalPointToContinuousIndex(g.GetOrigin()),
                       np.round(img.TransformPhysicalPointToContinuousIndex(g.GetOrigin())), atol=1e-6)
    geo = grid_geometry(g, img)
    assert set(geo) == {"grid_origin", "grid_spacing", "grid_direction", "grid_size", "reference_origin",
                        "reference_spacing", "reference_direction", "reference_size"}
    with pytest.raises(ValueError, match="empty"):
        model_grid(img, m * 0, 4.0, (16, 16, 16))


def test_qc_flags() -> None:
    assert np.all(robust_z([-0.5, -0.6]) == 0)
    peers = [-0.6, -0.55, -0.62, -0.05]
    assert metric_flags(peers[3], peers, 3)
    assert not metric_flags(peers[0], peers, 0)
    assert metric_flags(float("nan"), peers, 0)
    with_nan = [*peers, float("nan")]  # a diverged peer does not hide the bad one
    assert metric_flags(with_nan[3], with_nan, 3) and not metric_flags(with_nan[0], with_nan, 0)


def test_refinement_band_is_in_mm_along_every_axis() -> None:
    """The atlas refinement's band (``distance_mm``) is Euclidean in mm with each axis' spacing: on a 1 x 1 x 5 mm
    grid a 6 mm band spans 6 voxels in-plane but one 5 mm slice (a voxel-count band from the smallest spacing, as
    before, spanned 6 slices = 30 mm), and it matches a brute-force distance check."""
    from strpnet_core.preprocessing.brain import distance_mm

    mask = np.zeros((9, 21, 21), bool)  # (z, y, x)
    mask[4, 10, 10] = True
    band = distance_mm(mask, (1.0, 1.0, 5.0)) <= 6.0
    assert band[4, 10, 4:17].all() and not band[4, 10, 3] and not band[4, 10, 17]  # x: 6 voxels = 6 mm each way
    assert band[3:6, 10, 10].all() and not band[2, 10, 10] and not band[6, 10, 10]  # z: 1 slice = 5 mm each way
    z, y, x = np.indices(mask.shape)
    dist = np.sqrt(((z - 4) * 5.0) ** 2 + (y - 10.0) ** 2 + (x - 10.0) ** 2)
    np.testing.assert_array_equal(band, dist <= 6.0)


def test_refinement_opening_is_in_mm_along_every_axis() -> None:
    """The opening's ball spans 2 smallest spacings in mm: on isotropic voxels it opens exactly as the 6-neighbour
    cross iterated twice did; on a 1 x 1 x 5 mm grid it stays within the slice (the voxel cross spanned 10 mm across
    slices and removed a 3-slice-thick plate that is 15 mm thick)."""
    from strpnet_core.preprocessing.brain import opening_ball

    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((30, 40, 36)), 2) > 0.5
    cross = ndimage.generate_binary_structure(3, 1)
    np.testing.assert_array_equal(ndimage.binary_opening(blobs, opening_ball((2.0, 2.0, 2.0))),
                                  ndimage.binary_opening(blobs, cross, iterations=2))
    ball = opening_ball((1.0, 1.0, 5.0))
    assert ball.shape == (1, 5, 5) and ball.sum() == 13  # the in-plane diamond of radius 2 mm
    plate = np.zeros((9, 20, 20), bool)
    plate[3:6, 2:18, 2:18] = True
    assert ndimage.binary_opening(plate, ball).sum() == plate.sum() - 3 * 4 * 3  # only the in-plane corners go
    assert not ndimage.binary_opening(plate, cross, iterations=2).any()


def test_default_workers_fill_the_cores_within_memory(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One worker per core and patient, at most one per WORKER_MEMORY_BYTES of available memory, at least one."""
    from strpnet_core.preprocessing import pipeline

    gib = 1024**3
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 8)
    monkeypatch.setattr(pipeline, "_available_memory", lambda: 64 * gib)
    assert pipeline.default_workers(20) == 8
    assert pipeline.default_workers(3) == 3
    assert pipeline.default_workers(0) == 1
    monkeypatch.setattr(pipeline, "_available_memory", lambda: 5 * gib)  # 2 GiB per worker: 2
    assert pipeline.default_workers(20) == 2
    monkeypatch.setattr(pipeline, "_available_memory", lambda: gib // 2)
    assert pipeline.default_workers(20) == 1
    monkeypatch.setattr(pipeline, "_available_memory", lambda: None)  # unknown: cores only
    assert pipeline.default_workers(20) == 8


def test_bspline_finer_levels_use_the_moving_mask_in_the_warped_space(ref) -> None:
    """Level > 0 fits to the moving image resampled onto the fixed grid, so a moving mask must be mapped there too.
    The moving image lies 200 mm away (its origin shifted; ``linear`` is that translation): a mask left in the
    moving space would cover none of the fixed grid's samples at level 1 (ITK: too few samples)."""
    img, m = ref
    shift = (200.0, 0.0, 0.0)
    moving, mmask = sitk.Image(img), sitk.Image(m)
    for im in (moving, mmask):
        im.SetOrigin(tuple(o + d for o, d in zip(img.GetOrigin(), shift)))
    linear = sitk.TranslationTransform(3, shift)
    res = register_bspline(img, moving, linear=linear, fixed_mask=m, moving_mask=mmask,
                           settings=BSplineSettings((80.0, 40.0), (8.0, 4.0)))
    truth = sitk.TranslationTransform(3, tuple(-d for d in shift))  # moving point -> fixed point
    assert mean_displacement_error(res.transform, truth, mmask) < 0.5


def _thick_slices(image: sitk.Image, thickness_mm: float) -> sitk.Image:
    """A 2D-acquisition-like copy: blurred across the slices (Gaussian of FWHM ``thickness_mm``) and sampled every
    ``thickness_mm`` along z, in-plane spacing kept."""
    blur = sitk.SmoothingRecursiveGaussian(image, [0.01, 0.01, thickness_mm / 2.355])
    sp, size = list(image.GetSpacing()), list(image.GetSize())
    size[2] = int(round(size[2] * sp[2] / thickness_mm))
    return sitk.Resample(blur, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [sp[0], sp[1], thickness_mm],
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def test_isotropic_copy_covers_the_same_box() -> None:
    img = sitk.Image([40, 30, 8], sitk.sitkFloat32)
    img.SetSpacing([1.0, 1.0, 5.0])
    img.SetOrigin([10.0, -20.0, 30.0])
    img.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.1).GetMatrix())
    arr = np.zeros((8, 30, 40), np.float32)
    arr[2:6, 10:20, 10:30] = 100.0
    src = sitk.GetImageFromArray(arr)
    src.CopyInformation(img)
    iso = isotropic_copy(src)
    assert iso.GetSpacing() == (1.0, 1.0, 1.0) and iso.GetSize() == (40, 30, 40)
    assert iso.GetPixelID() == sitk.sitkFloat32 and iso.GetDirection() == src.GetDirection()

    def corner(im: sitk.Image, far: bool) -> np.ndarray:  # outer corner of the first / last voxel's box
        idx = np.asarray(im.GetSize(), float) - 0.5 if far else np.full(3, -0.5)
        return np.asarray(im.TransformContinuousIndexToPhysicalPoint(idx.tolist()))

    for far in (False, True):
        assert np.allclose(corner(iso, far), corner(src, far), atol=1e-6)
    mask = isotropic_copy(sitk.Cast(src > 0, sitk.sitkUInt8), mask=True)
    values = sitk.GetArrayViewFromImage(mask)
    assert mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(values)) == {0, 1}
    # Same volume (ml) in the copy: slices 2..5 of 5 mm = 20 mm of z.
    assert values.sum() * 1.0 == pytest.approx(arr.astype(bool).sum() * 5.0, rel=0.05)
    near = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    near.SetSpacing([1.0, 1.0, 1.4])  # within ANISOTROPY_LIMIT: the very same image
    assert isotropic_copy(near) is near and ANISOTROPY_LIMIT == 1.5
    fine = sitk.Image([460, 400, 30], sitk.sitkFloat32)  # a 0.45 x 0.45 x 5 mm 2D acquisition
    fine.SetSpacing([0.45, 0.45, 5.0])
    copy = isotropic_copy(fine)  # at 1 mm, not 0.45 mm (11x the voxels)
    assert copy.GetSpacing() == (1.0, 1.0, 1.0) and copy.GetSize() == (207, 180, 150)
    for far in (False, True):
        assert np.allclose(corner(copy, far), corner(fine, far), atol=0.5)  # box to within half a voxel


def test_thick_slice_scans_register_on_isotropic_copies() -> None:
    """2 x 2 x 6 mm pre-op and follow-up (a known affine + B-spline warp apart): the pyramids shrink every axis by one
    factor, so on the native grids the 4 mm level had 24 mm between slices (error 0.34 mm here; on demo cohorts
    resliced to 6 mm 1.4-2.3 mm and a failed atlas fit); on the isotropic copies 0.10 mm."""
    t1, brain = _atlas(2)
    arr = sitk.GetArrayFromImage(t1) * 1000.0
    arr[sitk.GetArrayViewFromImage(brain) == 0] = 0
    ref = sitk.GetImageFromArray(arr.astype(np.float32))
    ref.CopyInformation(t1)
    S = _truth(ref, 1)
    fixed, moving = _thick_slices(ref, 6.0), _thick_slices(sitk.Resample(ref, ref, S, sitk.sitkBSpline, 0.0), 6.0)
    fmask = sitk.Resample(brain, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mmask = sitk.Resample(brain, moving, S, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    linear = LinearSettings(shrink_factors=(4, 2), smoothing_sigmas_mm=(4.0, 2.0), min_step=0.01, min_samples=5000)
    r = register_longitudinal(fixed, moving, fixed_mask=fmask, rigid=linear, affine=linear, bspline=BSplineSettings(),
                              seed=3)
    assert mean_displacement_error(r.transform, S, mmask) < 0.2


def test_n4_does_not_take_a_graded_oedema_for_bias(ref) -> None:
    """Oedema is FLAIR- and T2-bright with a graded edge over tens of mm, which N4 partly absorbs into its smooth
    field.  Left out of the fit (``flair_lesion_mask`` of the scan's FLAIR as ``exclude``), it no longer shapes the
    estimate: on a T2-like image (the template x (1 + 0.8 g), g a 20 mm Gaussian profile, no true bias) the
    estimated log-bias follows the lesion's profile far less (measured correlation 0.68 -> 0.40) and is nearly as
    flat as N4's estimate on the lesion-free phantom."""
    from strpnet_core.preprocessing.bias import flair_lesion_mask

    img, m = ref
    arr = sitk.GetArrayFromImage(img)
    mk = sitk.GetArrayViewFromImage(m) > 0
    centre = np.argwhere(mk).mean(0) + np.array([0, 6, 6])
    d2 = sum((np.indices(arr.shape)[a] - centre[a]) ** 2 for a in range(3)) * SP**2
    g = np.exp(-d2 / (2 * 20.0**2))

    def image(a: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(a.astype(np.float32))
        out.CopyInformation(img)
        return out

    lesion = flair_lesion_mask(image(arr * (1 + 1.5 * g)), m)
    assert lesion is not None
    la = sitk.GetArrayViewFromImage(lesion) > 0
    assert la[mk & (g > 0.5)].mean() > 0.9 and not la[mk & (g < 0.05)].any()  # the oedema's core, nothing far
    spread = {}
    for name, src, ex in (("flat", arr, None), ("kept", arr * (1 + 0.8 * g), None), ("left out", arr * (1 + 0.8 * g), lesion)):
        _, log_b = n4_correct(image(src), m, exclude=ex)
        est = sitk.GetArrayFromImage(log_b)[mk]
        spread[name] = (float(est.std()), float(np.corrcoef(est, np.log1p(0.8 * g[mk]))[0, 1]))
    assert spread["kept"][1] > 0.5 and spread["left out"][1] < 0.7 * spread["kept"][1]
    assert spread["left out"][0] < 1.25 * spread["flat"][0] < spread["kept"][0]
