"""Image registration with SimpleITK: rigid / affine / B-spline, Mattes mutual information, multi-resolution.

Convention (ITK): every transform returned here maps a physical point ``x`` of the FIXED image to the physical
point ``T(x)`` of the MOVING image, so ``sitk.Resample(moving, fixed_grid, T)`` brings the moving image onto the
fixed grid.  Composition: ``compose(A, B)(x) = A(B(x))``.

The optimiser settings are those verified to converge in ``/work/shared/DESIGN.md`` (MOMENTS initialiser,
RegularStepGradientDescent lr 2.0, min step 1e-3, relaxation 0.8, 5 % random sampling with a fixed seed, shrink
4/2/1 with smoothing sigmas 2/1/0 mm, scales from physical shift).  Lower learning rates stall at 5-7 mm.
The B-spline stage runs only on the coarse levels (mesh refinement ×1, ×2) with sparse sampling, after the
affine stage (its result is the moving initial transform).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .resample import isotropic_copy
from .threads import one_itk_thread


#: Default minimum number of metric samples per resolution level.
MIN_SAMPLES = 20000


class RegistrationError(RuntimeError):
    """A registration that raised, diverged or produced an unusable transform."""


@dataclass(frozen=True)
class LinearSettings:
    """Settings of one rigid or affine stage (see module docstring).

    Each level draws ``max(sampling_percentage * N_l, min_samples)`` random samples (at most all ``N_l`` voxels of
    the level inside the fixed mask, ``N_l = N / s_l^3`` at shrink factor ``s_l``)."""

    histogram_bins: int = 50
    sampling_percentage: float = 0.05
    learning_rate: float = 2.0
    min_step: float = 1e-3
    iterations: int = 300
    relaxation: float = 0.8
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    min_samples: int = MIN_SAMPLES


@dataclass(frozen=True)
class BSplineSettings:
    """Settings of the hierarchical B-spline stage.

    Level ``i`` fits a cubic B-spline of control-point spacing ``control_point_spacing_mm[i]`` on the images
    shrunk to about ``level_voxel_mm[i]`` voxels (smoothed with sigma = half of it), with L-BFGS-B (no
    parameter scales needed) on ``sampling_percentage`` random samples (at least ``MIN_SAMPLES`` per level), at
    most ``iterations`` L-BFGS-B iterations (4x as many metric evaluations) per level.  15 iterations: on demo
    follow-ups (2 mm, 6 scans, interleaved A/B) 30 -> 15 halved the stage (14.2 -> 8.1 CPU s) at the same error
    vs truth (0.865 -> 0.854 mm); 10 iterations or 5-10 k samples per level cost 0.05-0.08 mm, a 6 mm second level
    0.2 mm.  Mesh refinement is done by composition:
    level ``i + 1`` is a finer B-spline fitted on top of the previous levels (to the moving image warped by them) (ITK's in-place mesh refinement
    cannot be combined with L-BFGS-B, and gradient descent with physical-shift scales is ~20x slower).
    """

    control_point_spacing_mm: tuple[float, ...] = (80.0, 40.0)
    level_voxel_mm: tuple[float, ...] = (8.0, 4.0)
    histogram_bins: int = 32
    sampling_percentage: float = 0.10
    iterations: int = 15


@dataclass(frozen=True)
class DemonsSettings:
    """Settings of the dense refinement stage (symmetric-forces demons, see :func:`register_demons`).

    ``sigma_mm``: standard deviation (mm) of the Gaussian that regularises the displacement field after every
    iteration; ``iterations``: number of demons iterations.  Measured on ci follow-up T1c against the truth (4 mm,
    the N4-corrected images of the pipeline, after its rigid + affine): on 9 scans of the seed 11/21 cohorts
    (affine 1.22-2.31 mm) sigma 2 mm took the mean error 27 % down (1 and 1.5 mm: less, 3 mm 20 %, 4 mm 16 %) and
    worsened 1 scan (1.22 -> 1.28 mm); on the 6 of seed 7 sigma 2 mm 18 %, 3 mm 24 %; 50 and 100-300 iterations
    give the same; diffeomorphic demons is no better than symmetric forces.  1-3 CPU s per follow-up at 4 mm.
    """

    sigma_mm: float = 2.0
    iterations: int = 50
    #: Modalities whose demons forces are averaged (equal weights), each pair z-scored in its brain mask; other
    #: modalities than the T1c enter in their own scan's T1c space (through the within-scan rigid). The ci preset
    #: uses ("t1c", "t2w"): mean error vs truth on ci cohorts of seeds 7 / 11 / 21 (6 / 12 / 12 follow-ups, 2026-12-07)
    #: 1.057 / 1.333 / 1.215 mm with the T1c alone, 0.980 / 1.227 / 1.087 with the T2w added, 0.991 / 1.260 / - with
    #: all four modalities; with T1c + T2w a sigma of 1.5 mm gave 1.148 / 1.239, 3 mm 0.937 / 1.365.
    channels: tuple[str, ...] = ("t1c",)


@dataclass
class RegistrationResult:
    """A transform (fixed point -> moving point), the final metric value (Mattes MI: lower = better, negative),
    the optimiser's stop condition and per-stage seconds/metrics."""

    transform: sitk.Transform
    metric: float
    stop: str
    seconds: float
    stages: dict[str, dict[str, float | str]] = field(default_factory=dict)
    #: :func:`evaluate_metric` of ``transform`` (comparable across transforms and scans); set by
    #: :func:`register_longitudinal`, NaN elsewhere.
    evaluated: float = float("nan")


def _physical_min_shrink(img: sitk.Image, shrinks: tuple[int, ...], min_size: int = 8) -> list[int]:
    """Cap shrink factors so every level keeps at least ``min_size`` voxels along each axis."""
    size = min(img.GetSize())
    return [max(1, min(int(s), size // min_size)) for s in shrinks]


def _isotropic(image: sitk.Image | None, *, mask: bool = False) -> sitk.Image | None:
    """:func:`~strpnet_core.preprocessing.resample.isotropic_copy` of an optional image."""
    return None if image is None else isotropic_copy(image, mask=mask)


def _working_inputs(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None
) -> tuple[sitk.Image, sitk.Image, sitk.Image | None, sitk.Image | None]:
    """What a registration works on: float32 isotropic copies of anisotropic images and their masks (the
    inputs themselves when isotropic)."""
    return (_as_float(isotropic_copy(fixed)), _as_float(isotropic_copy(moving)), _isotropic(fixed_mask, mask=True),
            _isotropic(moving_mask, mask=True))


def sampling_fractions(n_voxels: float, shrinks: list[int] | tuple[int, ...], sampling: float,
                       min_samples: int) -> list[float]:
    """Fraction of a level's voxels that the metric samples, per level: ``min(1, max(p, n_min / N_l))`` with
    ``N_l = N / s_l^3`` the voxels (inside the fixed mask) at shrink factor ``s_l``, ``p`` = ``sampling`` and
    ``n_min`` = ``min_samples``: at least ``n_min`` samples (or every voxel) on coarse levels and low-resolution
    scans, where ``p N_l`` alone would be too few."""
    return [min(1.0, max(float(sampling), min_samples * s**3 / n_voxels)) for s in shrinks]


def _method(
    fixed: sitk.Image,
    *,
    bins: int,
    sampling: float,
    seed: int,
    shrinks: tuple[int, ...],
    sigmas: tuple[float, ...],
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    min_samples: int = MIN_SAMPLES,
) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    levels = _physical_min_shrink(fixed, shrinks)
    n_vox = float(np.prod(fixed.GetSize()))
    if fixed_mask is not None:
        n_vox = max(1.0, float(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))))
    per_level = sampling_fractions(n_vox, levels, sampling, min_samples)
    reg.SetMetricSamplingPercentagePerLevel(per_level, int(seed) % (2**31 - 1) or 1)
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetShrinkFactorsPerLevel(levels)
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _run_linear(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    settings: LinearSettings,
    seed: int,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    moving_initial: sitk.Transform | None = None,
) -> tuple[sitk.Transform, float, str]:
    reg = _method(
        fixed,
        bins=settings.histogram_bins,
        sampling=settings.sampling_percentage,
        seed=seed,
        shrinks=settings.shrink_factors,
        sigmas=settings.smoothing_sigmas_mm,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        min_samples=settings.min_samples,
    )
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate,
        minStep=settings.min_step,
        numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    if moving_initial is not None:
        reg.SetMovingInitialTransform(moving_initial)
    reg.SetInitialTransform(transform, inPlace=True)
    with one_itk_thread():
        reg.Execute(fixed, moving)
    return transform, float(reg.GetMetricValue()), reg.GetOptimizerStopConditionDescription()


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    settings: LinearSettings = LinearSettings(),
    seed: int = 0,
    initial: sitk.Transform | None = None,
    init: str = "moments",
) -> RegistrationResult:
    """Rigid registration maximising Mattes mutual information.

    Finds the rotation ``R`` and translation ``t`` of ``T(x) = R (x - c) + c + t`` minimising
    ``-MI(F(x), M(T(x)))`` over random samples (``settings.sampling_percentage`` of the fixed voxels, seeded
    by ``seed``) inside ``fixed_mask``.  Start: ``initial`` (a rigid transform) when given; else ``init``:
    ``"moments"`` matches the centres of mass (for scans taken in different sessions), ``"identity"`` starts at
    ``T = id`` with the rotation centre ``c`` at the fixed mask's (else image's) geometric centre (for modalities
    of one session: their centres of mass are biased by the tumour/oedema, which is bright in some contrasts only).

    Raises
    ------
    RegistrationError
        When SimpleITK raises or the metric is not finite.
    """
    t0 = time.perf_counter()
    fixed_f, moving_f, fixed_mask, moving_mask = _working_inputs(fixed, moving, fixed_mask, moving_mask)
    if initial is None and init == "identity":
        tx = sitk.Euler3DTransform()
        tx.SetCenter(_geometric_centre(fixed_mask if fixed_mask is not None else fixed_f))
    elif initial is None:
        if init != "moments":
            raise ValueError(f"register_rigid: unknown init {init!r} (moments or identity)")
        tx = sitk.CenteredTransformInitializer(
            fixed_f, moving_f, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        tx = sitk.Euler3DTransform(tx)
    else:
        tx = sitk.Euler3DTransform(initial)
    try:
        tx, metric, stop = _run_linear(fixed_f, moving_f, tx, settings, seed, fixed_mask, moving_mask)
    except RuntimeError as exc:
        raise RegistrationError(f"rigid registration failed: {exc}") from exc
    _check_metric(metric, "rigid")
    secs = time.perf_counter() - t0
    return RegistrationResult(tx, metric, stop, secs, {"rigid": {"metric": metric, "seconds": secs, "stop": stop}})


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    rigid: sitk.Euler3DTransform,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    settings: LinearSettings = LinearSettings(),
    seed: int = 0,
) -> RegistrationResult:
    """Affine registration ``T(x) = A (x - c) + c + t`` initialised from a rigid result (same maths as
    :func:`register_rigid`, 12 parameters)."""
    t0 = time.perf_counter()
    fixed_f, moving_f, fixed_mask, moving_mask = _working_inputs(fixed, moving, fixed_mask, moving_mask)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(rigid.GetCenter())
    aff.SetMatrix(rigid.GetMatrix())
    aff.SetTranslation(rigid.GetTranslation())
    try:
        aff, metric, stop = _run_linear(fixed_f, moving_f, aff, settings, seed + 1, fixed_mask, moving_mask)
    except RuntimeError as exc:
        raise RegistrationError(f"affine registration failed: {exc}") from exc
    _check_metric(metric, "affine")
    det = float(np.linalg.det(np.asarray(aff.GetMatrix()).reshape(3, 3)))
    if not 0.5 <= det <= 2.0:
        raise RegistrationError(f"affine registration diverged: det(A) = {det:.3f} (volume change > 2x)")
    secs = time.perf_counter() - t0
    return RegistrationResult(aff, metric, stop, secs, {"affine": {"metric": metric, "seconds": secs, "stop": stop}})


def register_bspline(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    linear: sitk.Transform,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    settings: BSplineSettings = BSplineSettings(),
    seed: int = 0,
) -> RegistrationResult:
    """Free-form deformation on top of a linear transform ``L``: ``T = L ∘ (id + u_1) ∘ ... ∘ (id + u_K)`` with
    each ``u_k`` a cubic B-spline (coarse to fine control-point spacing), each fitted by L-BFGS-B minimising
    ``-MI(F(x), M(T(x)))`` over seeded random samples on a coarse image level (see :class:`BSplineSettings`).

    Returns the composite transform; ``metric`` is that of the last level (optimiser samples)."""
    t0 = time.perf_counter()
    fixed_f, moving_f, fixed_mask, moving_mask = _working_inputs(fixed, moving, fixed_mask, moving_mask)
    current: sitk.Transform = linear
    parts: list[sitk.Transform] = [linear]
    metric, stop = float("nan"), ""
    spacing = min(fixed_f.GetSpacing())
    for level, (cp, vox) in enumerate(zip(settings.control_point_spacing_mm, settings.level_voxel_mm)):
        extent = [sz * sp for sz, sp in zip(fixed_f.GetSize(), fixed_f.GetSpacing())]
        mesh = [max(1, int(round(e / cp))) for e in extent]
        bs = sitk.BSplineTransformInitializer(fixed_f, mesh, order=3)
        shrink = max(1, int(round(vox / spacing)))
        reg = _method(
            fixed_f,
            bins=settings.histogram_bins,
            sampling=settings.sampling_percentage,
            seed=seed + 2 + level,
            shrinks=(shrink,),
            sigmas=(vox / 2.0 if shrink > 1 else 0.0,),
            fixed_mask=fixed_mask,
            # level > 0 fits to the moving image warped onto the fixed grid: its mask goes the same way
            moving_mask=moving_mask if level == 0 or moving_mask is None else
            sitk.Resample(moving_mask, fixed_f, current, sitk.sitkNearestNeighbor, 0),
        )
        reg.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5,
            numberOfIterations=settings.iterations,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=4 * settings.iterations,
            costFunctionConvergenceFactor=1e7,
        )
        if level == 0:
            target = moving_f
            reg.SetMovingInitialTransform(current)
        else:
            # ITK cannot differentiate through a B-spline moving-initial transform: fit the finer level to the
            # moving image warped by the levels so far (an intermediate image used for the fit only; the
            # output is still resampled once through the composite).
            target = sitk.Resample(moving_f, fixed_f, current, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        reg.SetInitialTransform(bs, inPlace=True)
        try:
            with one_itk_thread():
                reg.Execute(fixed_f, target)
        except RuntimeError as exc:
            raise RegistrationError(f"B-spline registration (level {level}) failed: {exc}") from exc
        metric = float(reg.GetMetricValue())
        _check_metric(metric, "B-spline")
        stop = reg.GetOptimizerStopConditionDescription()
        parts.append(bs)
        current = compose(*parts)
    secs = time.perf_counter() - t0
    return RegistrationResult(current, metric, stop, secs, {"bspline": {"metric": metric, "seconds": secs, "stop": stop}})


def _zscore_in(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """``(I - mean) / std`` inside ``mask`` (same grid), 0 outside; float32."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    out = np.zeros_like(arr)
    values = arr[inside]
    if values.size < 2 or float(values.std()) == 0.0:
        raise RegistrationError("demons: the brain mask holds no intensity variation to register")
    out[inside] = (values - values.mean()) / values.std()
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(image)
    return img


def register_demons(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    linear: sitk.Transform,
    fixed_mask: sitk.Image,
    moving_mask: sitk.Image,
    settings: DemonsSettings = DemonsSettings(),
    extra: Sequence[tuple[sitk.Image, sitk.Image]] = (),
) -> RegistrationResult:
    """Dense refinement of a same-modality registration: ``T = L ∘ (id + u)`` with ``u`` a displacement field on
    the fixed grid.

    Both images are z-scored inside their own brain masks (intensities must be comparable: demons matches them,
    it does not learn a joint histogram like MI), the moving one is resampled once through ``L`` onto the fixed
    grid (``M'``), and ITK's symmetric-forces demons iterates

        u <- G_sigma * (u + du),   du = (F - M'(id + u)) J / (|J|^2 + (F - M'(id + u))^2 / K),
        J = (grad F + grad M'(id + u)) / 2,

    (``G_sigma``: Gaussian of ``settings.sigma_mm``, K: the mean squared voxel spacing).  The metric reported is
    the filter's final mean squared difference (lower = better; not comparable with Mattes MI).

    ``extra``: further channels, pairs (image on the fixed grid, image on the moving grid) aligned with ``fixed``
    and ``moving`` (e.g. the T2w of each scan in its T1c space).  Then every iteration averages the channels'
    updates, ``u <- G_sigma * (u + mean_c du_c)`` (multichannel demons, equal weights: ITK runs one iteration per
    channel from the current field, and the mean of the smoothed fields is the smoothed mean, the smoothing being
    linear), and the metric is the mean over channels.

    Raises
    ------
    RegistrationError
        A mask without intensity variation, or an ITK failure.
    """
    t0 = time.perf_counter()
    fixed, moving = isotropic_copy(fixed), isotropic_copy(moving)
    fixed_mask, moving_mask = isotropic_copy(fixed_mask, mask=True), isotropic_copy(moving_mask, mask=True)
    extra = [(isotropic_copy(fi), isotropic_copy(mi)) for fi, mi in extra]
    fixed_f = _as_float(fixed)
    pairs = [(_zscore_in(_as_float(fi), fixed_mask),
              sitk.Resample(_zscore_in(_as_float(mi), moving_mask), fixed_f, linear, sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32)) for fi, mi in [(fixed, moving), *extra]]

    def demons_filter(iterations: int) -> sitk.FastSymmetricForcesDemonsRegistrationFilter:
        d = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        d.SetNumberOfIterations(iterations)
        d.SetSmoothDisplacementField(True)
        d.SetStandardDeviations(float(settings.sigma_mm))
        d.SetUseImageSpacing(True)
        return d

    try:
        if len(pairs) == 1:
            demons = demons_filter(int(settings.iterations))
            field_img = demons.Execute(*pairs[0])
            metric = float(demons.GetMetric())
            stop = f"{demons.GetElapsedIterations()} iterations"
        else:
            field_img = None
            for _ in range(int(settings.iterations)):
                fields, metrics = [], []
                for f, m in pairs:
                    d = demons_filter(1)
                    out = d.Execute(f, m) if field_img is None else d.Execute(f, m, field_img)
                    fields.append(sitk.GetArrayViewFromImage(out).astype(np.float64))
                    metrics.append(float(d.GetMetric()))
                field_img = sitk.GetImageFromArray(np.mean(fields, axis=0), isVector=True)
                field_img.CopyInformation(fixed_f)
            metric = float(np.mean(metrics))
            stop = f"{int(settings.iterations)} iterations, {len(pairs)} channels"
    except RuntimeError as exc:
        raise RegistrationError(f"demons registration failed: {exc}") from exc
    _check_metric(metric, "demons")
    dense = sitk.DisplacementFieldTransform(sitk.Cast(field_img, sitk.sitkVectorFloat64))
    secs = time.perf_counter() - t0
    return RegistrationResult(compose(linear, dense), metric, stop, secs,
                              {"demons": {"metric": metric, "seconds": secs, "stop": stop}})


def _holds_displacement_field(transform: sitk.Transform) -> bool:
    """Whether ``transform`` is, or (nested) composes, a displacement field."""
    if transform.GetTransformEnum() == sitk.sitkDisplacementField:
        return True
    if transform.GetTransformEnum() == sitk.sitkComposite:
        comp = sitk.CompositeTransform(transform)
        return any(_holds_displacement_field(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms()))
    return False


def evaluate_metric(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    fixed_mask: sitk.Image | None = None,
    bins: int = 50,
    sampling_percentage: float = 0.2,
    seed: int = 12345,
) -> float:
    """Mattes MI ``-MI(F(x), M(T(x)))`` at full resolution, on a FIXED seeded random sample: values of different
    transforms (or scans of one patient) are comparable.  Lower is better."""
    reg = _method(
        _as_float(fixed), bins=bins, sampling=sampling_percentage, seed=seed, shrinks=(1,), sigmas=(0.0,),
        fixed_mask=fixed_mask, moving_mask=None,
    )
    if _holds_displacement_field(transform):
        # ITK's v4 metrics accept a dense field only as the transform itself (or the last of a composite) on the
        # fixed image's grid: tabulate the whole chain there (the same values at every fixed sample).
        transform = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
            transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(),
            fixed.GetDirection()))
    reg.SetInitialTransform(transform)
    try:
        with one_itk_thread():
            value = float(reg.MetricEvaluate(_as_float(fixed), _as_float(moving)))
    except RuntimeError as exc:
        raise RegistrationError(f"metric evaluation failed: {exc}") from exc
    return value


def register_longitudinal(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    rigid: LinearSettings = LinearSettings(),
    affine: LinearSettings | None = LinearSettings(),
    bspline: BSplineSettings | None = BSplineSettings(),
    demons: DemonsSettings | None = None,
    moving_brain: sitk.Image | None = None,
    seed: int = 0,
    demons_extra: Sequence[tuple[sitk.Image, sitk.Image]] = (),
) -> RegistrationResult:
    """Rigid -> affine -> B-spline -> demons (each optional after rigid) registration of a follow-up T1c (moving)
    to the pre-op T1c (fixed).  The B-spline and the demons results are each kept only when they lower
    :func:`evaluate_metric` (a common seeded sample); otherwise the previous transform is returned.  The demons
    stage (:func:`register_demons`, with the further channels ``demons_extra``) needs both brain masks
    (``fixed_mask``, ``moving_brain``) to normalise the intensities.  The metric reported is the optimiser's value
    of the last kept stage; per-stage values are in ``stages``; ``evaluated`` is :func:`evaluate_metric` of the
    returned transform.  Anisotropic images (and masks) are registered on isotropic copies
    (:func:`~strpnet_core.preprocessing.resample.isotropic_copy`, made once here for all stages)."""
    t0 = time.perf_counter()
    fixed, moving = isotropic_copy(fixed), isotropic_copy(moving)
    fixed_mask, moving_mask, moving_brain = (_isotropic(m, mask=True) for m in (fixed_mask, moving_mask, moving_brain))
    demons_extra = [(isotropic_copy(fi), isotropic_copy(mi)) for fi, mi in demons_extra]
    res = register_rigid(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, settings=rigid, seed=seed)
    stages = dict(res.stages)
    tx: sitk.Transform = res.transform
    metric, stop = res.metric, res.stop
    if affine is not None:
        r = register_affine(fixed, moving, rigid=res.transform, fixed_mask=fixed_mask, moving_mask=moving_mask,
                            settings=affine, seed=seed)
        stages.update(r.stages)
        tx, metric, stop = r.transform, r.metric, r.stop
    if bspline is not None:
        r = register_bspline(fixed, moving, linear=tx, fixed_mask=fixed_mask, moving_mask=moving_mask,
                             settings=bspline, seed=seed)
        # Keep the deformation only when it improves the metric on a common fixed sample.
        before = evaluate_metric(fixed, moving, tx, fixed_mask=fixed_mask)
        after = evaluate_metric(fixed, moving, r.transform, fixed_mask=fixed_mask)
        r.stages["bspline"].update({"eval_before": before, "eval_after": after, "accepted": str(after < before)})
        stages.update(r.stages)
        if after < before:
            tx, metric, stop = r.transform, r.metric, r.stop
        evaluated = min(before, after)
    else:
        evaluated = evaluate_metric(fixed, moving, tx, fixed_mask=fixed_mask)
    if demons is not None:
        if fixed_mask is None or moving_brain is None:
            raise ValueError("register_longitudinal: the demons stage needs fixed_mask and moving_brain")
        r = register_demons(fixed, moving, linear=tx, fixed_mask=fixed_mask, moving_mask=moving_brain,
                            settings=demons, extra=demons_extra)
        after = evaluate_metric(fixed, moving, r.transform, fixed_mask=fixed_mask)
        r.stages["demons"].update({"eval_before": evaluated, "eval_after": after, "accepted": str(after < evaluated)})
        stages.update(r.stages)
        if after < evaluated:
            tx, metric, stop, evaluated = r.transform, r.metric, r.stop, after
    return RegistrationResult(tx, metric, stop, time.perf_counter() - t0, stages, evaluated)


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """``compose(A, B, C)(x) = A(B(C(x)))``: the rightmost transform is applied first."""
    comp = sitk.CompositeTransform(3)
    # SimpleITK's CompositeTransform applies the LAST added transform first.
    for t in transforms:
        comp.AddTransform(t)
    return comp


def mean_displacement_error(
    estimated: sitk.Transform, truth: sitk.Transform, moving_mask: sitk.Image, max_points: int = 20000, seed: int = 0
) -> float:
    """Registration error against a known truth, in mm.

    ``truth`` (S) maps a point ``y`` of the moving image to the fixed (reference) space; ``estimated`` (T) maps
    fixed to moving.  Error = mean over the moving image's mask voxels ``y`` of ``|T(S(y)) - y|``
    (a random subset of at most ``max_points`` voxels, seeded).
    """
    arr = sitk.GetArrayViewFromImage(moving_mask)
    idx = np.argwhere(arr > 0)
    if len(idx) == 0:
        raise ValueError("mean_displacement_error: empty mask")
    if len(idx) > max_points:
        idx = idx[np.random.default_rng(seed).choice(len(idx), max_points, replace=False)]
    errs = np.empty(len(idx))
    for i, (z, y, x) in enumerate(idx):
        p = moving_mask.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        q = estimated.TransformPoint(truth.TransformPoint(p))
        errs[i] = math.dist(p, q)
    return float(errs.mean())


def _geometric_centre(img: sitk.Image) -> tuple[float, float, float]:
    """Physical centre of the bounding box of the non-zero voxels of ``img`` (of the whole grid when empty)."""
    nz = np.argwhere(sitk.GetArrayViewFromImage(img) != 0)
    if len(nz) == 0:
        idx = [(s - 1) / 2.0 for s in img.GetSize()]
    else:
        idx = ((nz.min(0) + nz.max(0)) / 2.0)[::-1].tolist()
    return tuple(img.TransformContinuousIndexToPhysicalPoint([float(i) for i in idx]))  # type: ignore[return-value]


def _as_float(img: sitk.Image) -> sitk.Image:
    return img if img.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(img, sitk.sitkFloat32)


def _check_metric(metric: float, stage: str) -> None:
    if not math.isfinite(metric):
        raise RegistrationError(f"{stage} registration diverged: final metric {metric}")
