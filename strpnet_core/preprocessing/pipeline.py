"""The per-patient preprocessing pipeline and the site driver (process pool, resumable, deterministic).

Per patient (all transforms in ITK convention: fixed point -> moving point)::

    for each scan k:   read -> brain mask of the T1c (stripped input kept, else atlas) ->
                       N4 of every modality inside the brain mask -> rigid T1n/T2w/FLAIR -> T1c (R_{k,m},
                       identity start, on the N4-corrected images) ->
                       (k > 0) rigid -> affine -> B-spline of T1c_k -> pre-op T1c (L_k)
    model grid G:      centred on the pre-op brain mask's bounding box, pre-op T1c direction
    image_{k,m} on G = resample(N4(I_{k,m}), G, R_{k,m} ∘ L_k)   (one linear interpolation; L_k tabulated once
                       per follow-up as a displacement field on G, exact at G's voxels)
    -> z-score inside the pre-op brain mask on G -> cache file + QC record + QC figure

A follow-up scan whose registration fails or is flagged is excluded with a reason; a pre-op failure fails the
patient.  Every failure names the patient, scan, modality and step.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..cache import CACHE_SUFFIX, CachedPatient, cache_path, list_cache, save_cached_patient
from ..console import die_with_parent
from ..contract import FLAIR_MODALITY, MODALITIES, OUTCOMES_CSV, REFERENCE_MODALITY
from ..fsutil import atomic_write_json, private_dir, remove_stale_parts
from ..presets import Preset, get_preset
from .bias import LESION_MADS, flair_lesion_mask, n4_correct
from .brain import brain_mask as extract_brain
from .brain import stripped_mask
from .normalize import z_score_normalize
from .qc import MIN_MASK_DICE, dice, metric_flags, rigid_flags, write_qc_png
from .registration import (
    BSplineSettings,
    DemonsSettings,
    LinearSettings,
    RegistrationError,
    RegistrationResult,
    compose,
    evaluate_metric,
    register_longitudinal,
    register_rigid,
)
from .resample import (
    displacement_field_on_grid,
    field_of_view_on_grid,
    grid_geometry,
    isotropic_copy,
    model_grid,
    resample_mask_like,
    resample_to_grid,
)
from .threads import itk_threads

log = logging.getLogger(__name__)

#: Bump when the pipeline's output changes for the same settings (invalidates resumed caches).
PIPELINE_VERSION = 8  # 5: brain refinement band in mm (brain.distance_mm); 6: registration and N4 on one thread;
# 7: anisotropic scans registered on isotropic copies, brain opening in mm (isotropic scans: the same output as 6);
# 8: N4 fits leave out the FLAIR-bright lesion
STEPS: tuple[str, ...] = ("read", "brain", "register_modalities", "n4", "register_longitudinal", "resample")


@dataclass(frozen=True)
class PipelineSettings:
    """Everything that determines the output (configuration as data; hashed for resuming)."""

    preset: str
    grid_spacing_mm: float
    grid_shape: tuple[int, int, int]
    linear: LinearSettings = LinearSettings()
    #: Within-scan rigid: levels no finer than ~4 mm (a rigid fit of two images of one session needs no more:
    #: 0.5 mm error at 4 mm on the ci cohort); the full-resolution level costs ~4x more at 2 mm.
    modality_linear: LinearSettings = LinearSettings()
    #: Atlas brain extraction (skull-present scans): the 2 mm MNI template registered at 8 and 4 mm only; the
    #: intensity refinement that follows fixes the boundary, so the 2 mm level (2-3x the cost in two measurements,
    #: docs/preprocessing.md step 2) is not needed.
    brain_linear: LinearSettings = LinearSettings(shrink_factors=(4, 2), smoothing_sigmas_mm=(2.0, 1.0))
    bspline: BSplineSettings | None = BSplineSettings()
    #: Dense (demons) refinement of the longitudinal T1c registration: ci only (see :meth:`from_preset`).
    demons: DemonsSettings | None = None
    #: N4 fit grid ~8 mm (10 mm is ~40 % cheaper at 2 mm but its log-bias correlation vs truth was -0.02 on some
    #: demo patients: not taken).
    n4_fit_spacing_mm: float = 8.0
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    n4_control_points: int = 4
    #: N4 fits inside the brain mask eroded by this much (partial-volume border left out, see ``n4_correct``).
    n4_fit_erode_mm: float = 2.0
    #: N4 fits leave out the FLAIR-bright lesion, median + this many robust SDs (``bias.flair_lesion_mask``; None:
    #: keep it in): demo cohort of 4 sites, 92 images, log-bias correlation vs truth 0.815 -> 0.838 mean, pre-op
    #: scans 0.820 -> 0.857, minimum -0.09 -> 0.14 (docs/preprocessing.md).
    n4_lesion_mads: float | None = LESION_MADS
    image_dtype: str = "float16"

    @classmethod
    def from_preset(cls, preset: str | Preset) -> PipelineSettings:
        """Settings of a preset: ``ci`` (4 mm) is rigid + affine + demons (on the ci synth cohort every B-spline
        variant tried, 30-80 mm control points, L-BFGS-B or line-search gradient descent, made the error vs truth
        worse or no better: 1.58 -> 1.79 mm; symmetric-forces demons on the z-scored T1c cut it by about 30 %,
        see :class:`DemonsSettings`), ``demo``/``brats`` add two B-spline levels instead."""
        p = get_preset(preset) if isinstance(preset, str) else preset
        coarse = p.grid_spacing_mm >= 4
        bspline = None if coarse else BSplineSettings()
        # Demons forces of the T1c and the T2w averaged: 7-11 % lower error than the T1c alone (docs/preprocessing.md)
        demons = DemonsSettings(channels=("t1c", "t2w")) if coarse else None
        k = max(1, int(round(4.0 / p.scan_spacing_mm)))
        # On finer scans the levels stop at ~4 mm voxels, where a final step of 0.01 mm (physical-shift scales: a
        # unit step moves no voxel by more than 1 mm) is as good as 0.001 mm and takes ~25 % fewer iterations
        # (halving the step from 2.0 takes log(200)/log(1.25) = 24 instead of 34 direction reversals).
        # There, 5 000 samples per level fit the 6 (rigid) or 12 (affine) parameters about as well as 20 000: demo
        # (2026-12-06, 24 pre-op images of 8 patients / 12 follow-ups) within-scan error 0.250 -> 0.280 and 0.287 ->
        # 0.289 mm, longitudinal T1c after the B-spline 0.871 -> 0.873 mm, at ~30-35 % less CPU for the rigid fits.
        modality = LinearSettings() if k == 1 else LinearSettings(shrink_factors=(2 * k, k), smoothing_sigmas_mm=(4.0, 2.0),
                                                                  min_step=0.01, min_samples=5000)
        # Longitudinal rigid/affine: levels no finer than ~4 mm as well; the B-spline levels refine the alignment.
        return cls(preset=p.name, grid_spacing_mm=p.grid_spacing_mm, grid_shape=tuple(p.grid_shape), bspline=bspline,
                   demons=demons, modality_linear=modality, linear=modality)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, seed: int) -> str:
        """SHA-256 (16 hex digits) of the settings, the seed, the pipeline and package versions."""
        blob = json.dumps(
            {"settings": self.to_dict(), "seed": seed, "pipeline": PIPELINE_VERSION, "version": __version__},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PreprocessError(RuntimeError):
    """A patient-level failure, naming patient, scan, modality, file and step."""

    def __init__(self, patient_id: str, step: str, message: str, *, timepoint: str | None = None,
                 modality: str | None = None, path: str | os.PathLike[str] | None = None) -> None:
        self.patient_id, self.step, self.timepoint, self.modality = patient_id, step, timepoint, modality
        self.path = None if path is None else str(path)
        where = f"patient {patient_id}"
        if timepoint is not None:
            where += f", scan {timepoint}"
        if modality is not None:
            where += f", {modality}"
        if self.path is not None:
            where += f" ({self.path})"
        super().__init__(f"{where}, step {step}: {message}")


@dataclass
class PatientResult:
    """Outcome of one patient (picklable; no images)."""

    patient_id: str
    status: str  # "ok", "skipped" (resumed), "failed"
    seconds: float = 0.0
    timepoints: list[str] = field(default_factory=list)
    excluded_scans: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    cache_file: str | None = None


#: The site report :func:`preprocess_site` writes into the cache folder (validation problems and per-patient results).
REPORT_NAME = "preprocess_report.json"


@dataclass
class PreprocessReport:
    """Outcome of a site.

    Attributes
    ----------
    site_name, out_dir, settings_hash:
        The site, its cache folder and the settings hash of this run.
    results:
        One per patient that passed validation, in patient order (ok, skipped = done before, failed).
    validation_problems:
        Every validation problem, one line each (``path: reason``).
    excluded:
        Patients excluded by validation -> their problems (one line each).
    site_problems:
        Site-level validation errors (no patient concerned: folder empty, CSV unusable, ...).
    dropped:
        Usable patients -> the validation errors that dropped one of their scans (or a segmentation or mask).
    removed:
        Patients no longer in the site folder whose cache and QC files this run removed.
    """

    site_name: str
    out_dir: str
    settings_hash: str
    results: list[PatientResult]
    validation_problems: list[str] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    site_problems: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[PatientResult]:
        return [r for r in self.results if r.status in ("ok", "skipped")]

    @property
    def failed(self) -> list[PatientResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def rejected(self) -> int:
        """Patients not in the cache: excluded by validation plus failed in preprocessing."""
        return len(self.excluded) + len(self.failed)

    @property
    def report_path(self) -> Path:
        """The JSON report in the cache folder."""
        return Path(self.out_dir) / REPORT_NAME

    def table(self) -> str:
        """A plain-text table: patient, status, timepoints kept, excluded scans / error, seconds; then the patients
        validation excluded (first reason) and the site-level validation errors."""
        rows = [f"{'patient':<24} {'status':<8} {'T':>2} {'sec':>7}  notes"]
        for r in self.results:
            notes = r.error or "; ".join([*self.dropped.get(r.patient_id, []),
                                          *(f"{t}: {why}" for t, why in r.excluded_scans.items())])
            rows.append(f"{r.patient_id:<24} {r.status:<8} {len(r.timepoints):>2} {r.seconds:>7.1f}  {notes}")
        for pid, problems in sorted(self.excluded.items()):
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            first = problems[0] if problems else "excluded by validation"
            rows.append(f"{pid:<24} {'excluded':<8} {0:>2} {0.0:>7.1f}  {first}{more}")
        rows.extend(f"{pid:<24} {'removed':<8} {0:>2} {0.0:>7.1f}  no longer in the site folder: cache and QC "
                    "files removed" for pid in self.removed)
        rows.extend(f"site: {p}" for p in self.site_problems)
        return "\n".join(rows)


def qc_path(out_dir: str | os.PathLike[str], patient_id: str) -> Path:
    """``CACHE_DIR/<patient>.qc.json``."""
    return Path(out_dir) / f"{patient_id}.qc.json"


def input_hash(record: Any) -> str:
    """SHA-256 (16 hex digits) of what a patient's cache is made of: each scan's timepoint and day, each file's name,
    size and modification time (images and recurrence mask), the event and the time.

    A finished patient whose site added or replaced a scan or updated its outcome is due again (:func:`is_done`);
    moving the site folder keeps the hash, a copy that resets modification times does not.
    """
    def stat(path: Any) -> list[Any]:
        try:
            st = os.stat(path)
            return [Path(path).name, st.st_size, st.st_mtime_ns]
        except OSError:
            return [Path(path).name, None, None]

    doc = {"scans": [[s.timepoint, float(s.day), {m: stat(f) for m, f in sorted(s.images.items())}]
                     for s in record.scans],
           "recurrence": None if getattr(record, "recurrence", None) is None else stat(record.recurrence),
           "event": record.event, "time": record.time_days}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def is_done(out_dir: str | os.PathLike[str], record: Any, settings_hash: str) -> bool:
    """True when the patient's cache file exists and its QC record says ok with the same settings hash and the same
    :func:`input_hash` of ``record``."""
    cp, qp = cache_path(out_dir, record.patient_id), qc_path(out_dir, record.patient_id)
    if not (cp.exists() and qp.exists()):
        return False
    try:
        qc = json.loads(qp.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(qc, dict) and qc.get("status") == "ok" and qc.get("settings_hash") == settings_hash
            and qc.get("input_hash") == input_hash(record))


def _read(path: Path, patient_id: str, timepoint: str, modality: str) -> sitk.Image:
    try:
        from ..site import read_image_checked

        img = read_image_checked(path)
    except Exception as exc:  # ImageDefect, RuntimeError
        raise PreprocessError(patient_id, "read", str(exc), timepoint=timepoint, modality=modality, path=path) from exc
    out = sitk.Cast(img, sitk.sitkFloat32)
    if img.GetPixelID() == sitk.sitkFloat64 and not np.isfinite(sitk.GetArrayViewFromImage(out)).all():
        raise PreprocessError(patient_id, "read", "float64 voxel values beyond the float32 range "
                              "(|value| > 3.4e38)", timepoint=timepoint, modality=modality, path=path)
    return out


@dataclass
class _ScanWork:
    timepoint: str
    day: float
    corrected: dict[str, sitk.Image]
    mask: sitk.Image
    to_t1c: dict[str, sitk.Transform]
    qc: dict[str, Any]
    #: What the registrations of this scan work on: ``"t1c"`` and ``"mask"``, isotropic copies of anisotropic ones
    #: (``resample.isotropic_copy``; the images themselves otherwise), made once for the within-scan and the
    #: longitudinal fits.
    registration: dict[str, sitk.Image]


def _prepare_scan(patient_id: str, scan: Any, settings: PipelineSettings, seed: int) -> _ScanWork:
    """Read, brain mask, within-scan rigid registration and N4 of one scan (all in the scan's native spaces)."""
    tp = scan.timepoint
    steps: dict[str, float] = {}
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = {m: _read(Path(scan.images[m]), patient_id, tp, m) for m in MODALITIES}
    steps["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    t1c = raw[REFERENCE_MODALITY]
    try:
        mask, method = extract_brain(t1c, seed=seed, settings=settings.brain_linear)
    except Exception as exc:
        raise PreprocessError(patient_id, "brain", str(exc), timepoint=tp, modality=REFERENCE_MODALITY,
                              path=scan.images[REFERENCE_MODALITY]) from exc
    steps["brain"] = time.perf_counter() - t0

    # N4 before the within-scan registration: each image carries its own smooth bias field (up to +-40 %), which
    # MI happily "aligns" (3.5 mm error on the ci cohort without correction, 0.55 mm with it).  The modalities of
    # one session are misaligned by a few mm at most, so the T1c mask on each modality's grid (identity; the
    # modality's own non-zero region at skull-stripped sites) is a good enough N4 mask, and the FLAIR-bright
    # lesion (``flair_lesion_mask``) is left out of every modality's fit the same way.
    t0 = time.perf_counter()
    masks: dict[str, sitk.Image] = {REFERENCE_MODALITY: mask}
    for m in MODALITIES:
        if m != REFERENCE_MODALITY:
            own = stripped_mask(raw[m]) if method == "stripped" else None
            masks[m] = own if own is not None else resample_mask_like(mask, raw[m])
    lesion = None
    if settings.n4_lesion_mads is not None:
        try:
            lesion = flair_lesion_mask(raw[FLAIR_MODALITY], masks[FLAIR_MODALITY], mads=settings.n4_lesion_mads)
        except RuntimeError as exc:
            raise PreprocessError(patient_id, "n4", f"FLAIR lesion mask: {exc}", timepoint=tp,
                                  modality=FLAIR_MODALITY, path=scan.images[FLAIR_MODALITY]) from exc
    corrected: dict[str, sitk.Image] = {}
    for m in MODALITIES:
        try:
            corrected[m], _ = n4_correct(raw[m], masks[m], fit_spacing_mm=settings.n4_fit_spacing_mm,
                                         iterations=settings.n4_iterations, control_points=settings.n4_control_points,
                                         fit_erode_mm=settings.n4_fit_erode_mm, exclude=lesion)
        except (RuntimeError, ValueError) as exc:
            raise PreprocessError(patient_id, "n4", str(exc), timepoint=tp, modality=m, path=scan.images[m]) from exc
    steps["n4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    t1c_c = corrected[REFERENCE_MODALITY]
    registration = {"t1c": isotropic_copy(t1c_c), "mask": isotropic_copy(mask, mask=True)}
    to_t1c: dict[str, sitk.Transform] = {REFERENCE_MODALITY: sitk.Transform(3, sitk.sitkIdentity)}
    for m in MODALITIES:
        if m == REFERENCE_MODALITY:
            continue
        try:
            # Same session: start at the identity (centres of mass are biased by the tumour/oedema).
            res = register_rigid(registration["t1c"], corrected[m], fixed_mask=registration["mask"],
                                 settings=settings.modality_linear, seed=seed, init="identity")
            metrics[f"{m}_to_t1c"] = evaluate_metric(t1c_c, corrected[m], res.transform, fixed_mask=mask)
            rigid_problems = rigid_flags(res.transform.GetParameters()[:3], res.transform.GetTranslation())
        except RegistrationError as exc:
            raise PreprocessError(patient_id, "register_modalities", str(exc), timepoint=tp, modality=m,
                                  path=scan.images[m]) from exc
        if rigid_problems:
            raise PreprocessError(patient_id, "register_modalities", "diverged: " + "; ".join(rigid_problems),
                                  timepoint=tp, modality=m, path=scan.images[m])
        to_t1c[m] = res.transform
    steps["register_modalities"] = time.perf_counter() - t0
    qc = {"timepoint": tp, "day": float(scan.day), "brain_method": method, "seconds": steps, "metrics": metrics,
          "flags": [], "included": True, "reason": None}
    return _ScanWork(tp, float(scan.day), corrected, mask, to_t1c, qc, registration)


def _demons_channels(work: _ScanWork, settings: PipelineSettings) -> list[sitk.Image]:
    """The scan's N4-corrected images of the demons channels other than the T1c (``DemonsSettings.channels``), in
    its T1c space (through the within-scan rigid; for the registration only, not the cached images)."""
    if settings.demons is None:
        return []
    t1c = work.corrected[REFERENCE_MODALITY]
    return [sitk.Resample(work.corrected[m], t1c, work.to_t1c[m], sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            for m in settings.demons.channels if m != REFERENCE_MODALITY]


def _register_followup(pre: _ScanWork, pre_channels: list[sitk.Image], work: _ScanWork, settings: PipelineSettings,
                       seed: int) -> RegistrationResult:
    """``L_k``: the follow-up's T1c registered to the pre-op T1c with the preset's stages (``pre_channels``:
    :func:`_demons_channels` of the pre-op scan, computed once per patient)."""
    return register_longitudinal(pre.registration["t1c"], work.registration["t1c"],
                                 fixed_mask=pre.registration["mask"], rigid=settings.linear, affine=settings.linear,
                                 bspline=settings.bspline, demons=settings.demons,
                                 moving_brain=work.registration["mask"], seed=seed,
                                 demons_extra=list(zip(pre_channels, _demons_channels(work, settings))))


def _scan_on_grid(pid: str, work: _ScanWork, long_field: sitk.Transform, grid: sitk.Image, grid_mask: np.ndarray,
                  settings: PipelineSettings) -> np.ndarray:
    """The scan's four images on the model grid, each resampled once and z-scored in the brain:
    ``image_{k,m}(x) = z(N4(I_{k,m})(R_{k,m}(L_k(x))))`` (``long_field``: ``L_k`` tabulated on the grid), the mean
    and std over the brain voxels the image covers (a follow-up with a smaller field of view would otherwise count
    the resampler's zeros as tissue; uncovered brain voxels stay 0).  Records the ``resample`` seconds.

    Raises
    ------
    PreprocessError
        Step ``normalize``, naming the modality, when an image cannot be z-scored (e.g. constant in the brain).
    """
    t0 = time.perf_counter()
    out = np.zeros((len(MODALITIES), *settings.grid_shape), dtype=settings.image_dtype)
    try:
        for c, m in enumerate(MODALITIES):
            to_image = compose(work.to_t1c[m], long_field)
            arr = resample_to_grid(work.corrected[m], grid, to_image)
            seen = grid_mask & field_of_view_on_grid(work.corrected[m], grid, to_image)
            out[c] = z_score_normalize(arr, seen)
    except ValueError as exc:
        raise PreprocessError(pid, "normalize", str(exc), timepoint=work.timepoint, modality=m) from exc
    finally:
        work.qc["seconds"]["resample"] = time.perf_counter() - t0
    return out


def preprocess_patient(
    record: Any,
    *,
    site_name: str,
    out_dir: str | os.PathLike[str],
    preset: str | Preset | PipelineSettings = "demo",
    seed: int = 0,
    transforms_out: dict[tuple[str, str], sitk.Transform] | None = None,
) -> PatientResult:
    """Preprocess one patient (a ``strpnet_core.site.PatientRecord``) into ``out_dir``.

    Writes ``<patient>.npz`` (:func:`strpnet_core.cache.save_cached_patient`), ``<patient>.qc.json`` and
    ``<patient>.qc.png``.  Never raises for data problems: a failure is returned (status ``"failed"``, the error
    naming patient, scan, modality and step) and recorded in the QC JSON.

    ``transforms_out`` (in-process callers only): filled with the transform each kept image was resampled with,
    ``(timepoint, modality) -> R_{k,m} ∘ L_k`` (pre-op T1c point -> point of that image; the resampling went
    through ``L_k`` tabulated on the model grid, equal to it at every grid voxel), for accuracy checks against a
    known truth without running the registrations twice.
    """
    settings = preset if isinstance(preset, PipelineSettings) else PipelineSettings.from_preset(preset)
    shash = settings.hash(seed)
    out_dir = Path(out_dir)
    private_dir(out_dir)  # a new folder is closed to other users (preprocess_site warns about an open one)
    pid = record.patient_id
    t_start = time.perf_counter()
    qc: dict[str, Any] = {"patient_id": pid, "site": site_name, "settings_hash": shash,
                          "input_hash": input_hash(record), "seed": seed, "preset": settings.preset,
                          "settings": settings.to_dict(), "version": __version__, "scans": [], "status": "failed",
                          "error": None}
    try:
        result = _run_patient(record, site_name, out_dir, settings, seed, shash, qc, transforms_out)
    except Exception as exc:  # noqa: BLE001 - every failure is reported per patient
        if not isinstance(exc, PreprocessError):
            exc = PreprocessError(pid, "unexpected", f"{type(exc).__name__}: {exc}")
            qc["traceback"] = traceback.format_exc()
        qc["error"] = {"step": exc.step, "timepoint": exc.timepoint, "modality": exc.modality, "path": exc.path,
                       "message": str(exc)}
        qc["seconds_total"] = time.perf_counter() - t_start
        error = str(exc)
        try:
            cache_path(out_dir, pid).unlink(missing_ok=True)  # an earlier run's file must not stand for this failure
            atomic_write_json(qc_path(out_dir, pid), qc)
        except OSError as write_exc:  # e.g. a full disk: still this patient's failure only, never the site's
            error += f" (and its QC record could not be written: {write_exc})"
        log.warning("%s", error)
        return PatientResult(pid, "failed", qc["seconds_total"], error=error)
    result.seconds = time.perf_counter() - t_start
    return result


def _run_patient(record: Any, site_name: str, out_dir: Path, settings: PipelineSettings, seed: int, shash: str,
                 qc: dict[str, Any], transforms_out: dict[tuple[str, str], sitk.Transform] | None = None
                 ) -> PatientResult:
    pid = record.patient_id
    scans = list(record.scans)
    if not scans:
        raise PreprocessError(pid, "input", "no scan")
    rec_img = _recurrence_mask(record, qc)  # checked before the costly steps; a defective one is only dropped
    pre = _prepare_scan(pid, scans[0], settings, seed)
    qc["scans"].append(pre.qc)
    fixed, fixed_mask = pre.corrected[REFERENCE_MODALITY], pre.mask
    # The model grid depends on the pre-op scan only; follow-ups are checked and resampled on it.
    grid = model_grid(fixed, fixed_mask, settings.grid_spacing_mm, settings.grid_shape)
    grid_mask = resample_to_grid(fixed_mask, grid, label=True)
    if not grid_mask.any():
        raise PreprocessError(pid, "resample", "the brain mask is empty on the model grid")
    identity = sitk.Transform(3, sitk.sitkIdentity)
    pre_channels = _demons_channels(pre, settings)
    pre.qc["seconds"]["register_longitudinal"] = 0.0

    # Follow-ups: prepare, register and resample; failures exclude the scan (with its reason), never the patient.
    # Each follow-up's L_k (rigid ∘ affine ∘ B-splines) is tabulated once as a displacement field on the model
    # grid: the brain-mask overlap check and the four images are resampled through it (exact at grid voxels).
    # The images go onto the grid right after the registration and the full-resolution ones are let go, so memory
    # holds the pre-op scan and one follow-up at a time, whatever the number of scans.
    follow: list[tuple[_ScanWork, sitk.Transform, np.ndarray | None, float]] = []
    for scan in scans[1:]:
        try:
            work = _prepare_scan(pid, scan, settings, seed)
        except Exception as exc:  # noqa: BLE001 - a follow-up's failure excludes that scan, never the patient
            if not isinstance(exc, PreprocessError):
                exc = PreprocessError(pid, "unexpected", f"{type(exc).__name__}: {exc}", timepoint=scan.timepoint)
            qc["scans"].append({"timepoint": scan.timepoint, "day": float(scan.day), "included": False,
                                "reason": str(exc), "flags": [f"step {exc.step} failed"], "seconds": {}, "metrics": {}})
            continue
        qc["scans"].append(work.qc)
        t0 = time.perf_counter()
        try:
            res = _register_followup(pre, pre_channels, work, settings, seed)
            final = res.evaluated
            long_field = displacement_field_on_grid(res.transform, grid)
            overlap = dice(resample_to_grid(work.mask, grid, long_field, label=True), grid_mask)
        except (RegistrationError, RuntimeError) as exc:
            work.qc.update(included=False, reason=f"patient {pid}, scan {work.timepoint}, step register_longitudinal: {exc}")
            work.qc["flags"].append("registration failed")
            continue
        finally:
            work.qc["seconds"]["register_longitudinal"] = time.perf_counter() - t0
        work.qc["metrics"].update({"t1c_to_preop": final, "brain_mask_dice": overlap,
                                   "stages": res.stages})
        if overlap < MIN_MASK_DICE:
            work.qc["flags"].append(f"brain masks overlap poorly after registration (Dice {overlap:.3f} < {MIN_MASK_DICE})")
        on_grid: np.ndarray | None = None
        try:
            on_grid = _scan_on_grid(pid, work, long_field, grid, grid_mask, settings)
        except PreprocessError as exc:  # cannot be normalised (e.g. constant inside the brain): excluded
            work.qc.update(included=False, reason=str(exc))
            work.qc["flags"].append("step normalize failed")
        work.corrected.clear()
        work.registration.clear()
        follow.append((work, res.transform, on_grid, final))

    # Robust flags over the patient's comparable metrics (longitudinal; and per modality within scans).
    all_scans = [pre] + [w for w, *_ in follow]
    for m in MODALITIES:
        if m == REFERENCE_MODALITY:
            continue
        vals = [w.qc["metrics"][f"{m}_to_t1c"] for w in all_scans]
        for i, w in enumerate(all_scans):
            w.qc["flags"].extend(f"{m}->t1c: {f}" for f in metric_flags(vals[i], vals, i))
    long_vals = [f for *_, f in follow]
    for i, (w, *_, f) in enumerate(follow):
        w.qc["flags"].extend(f"t1c->pre-op: {x}" for x in metric_flags(f, long_vals, i))
    if pre.qc["flags"]:
        raise PreprocessError(pid, "register_modalities", "pre-op scan flagged: " + "; ".join(pre.qc["flags"]),
                              timepoint=pre.timepoint)
    # One resampling per image: image_{k,m} on G = N4(I_{k,m})(R_{k,m}(L_k(x))), L_k through its field. The pre-op
    # scan cannot be normalised: the patient fails.
    stack = [_scan_on_grid(pid, pre, identity, grid, grid_mask, settings)]
    kept: list[tuple[_ScanWork, sitk.Transform]] = [(pre, identity)]
    for w, tx, on_grid, _ in follow:
        if on_grid is None:
            continue  # excluded above, with its reason
        if w.qc["flags"]:
            w.qc.update(included=False, reason="; ".join(w.qc["flags"]))
        else:
            stack.append(on_grid)
            kept.append((w, tx))
    if transforms_out is not None:
        transforms_out.update({(w.timepoint, m): compose(w.to_t1c[m], tx) for w, tx in kept for m in MODALITIES})
    images = np.stack(stack)

    recurrence = None if rec_img is None else resample_to_grid(rec_img, grid, label=True)

    timepoints = [w.timepoint for w, *_ in kept]
    excluded = {s["timepoint"]: s["reason"] for s in qc["scans"] if not s["included"]}
    patient = CachedPatient(
        patient_id=pid,
        site=site_name,
        images=images,
        days=np.asarray([w.day for w, *_ in kept], dtype=np.float32),
        timepoints=timepoints,
        brain_mask=grid_mask,
        recurrence=recurrence,
        event=None if record.event is None else int(record.event),
        time=None if record.time_days is None else float(record.time_days),
        geometry=grid_geometry(grid, fixed),
        meta={"preset": settings.preset, "settings_hash": shash, "seed": seed, "version": __version__,
              "excluded_scans": excluded, "brain_method": pre.qc["brain_method"]},
    )
    cp = cache_path(out_dir, pid)
    # The QC record says "done" (is_done): an earlier run's record must not stand for this cache file if the run is
    # killed between the two writes, so it goes first and the new one is written last.
    qc_path(out_dir, pid).unlink(missing_ok=True)
    save_cached_patient(cp, patient)
    write_qc_png(out_dir / f"{pid}.qc.png", images, grid_mask, timepoints, f"{site_name} / {pid}")
    qc.update(status="ok", timepoints=timepoints, excluded_scans=excluded)
    qc["seconds_total"] = sum(sum(s.get("seconds", {}).values()) for s in qc["scans"])
    atomic_write_json(qc_path(out_dir, pid), qc)
    return PatientResult(pid, "ok", timepoints=timepoints, excluded_scans=excluded, cache_file=str(cp))


def _recurrence_mask(record: Any, qc: dict[str, Any]) -> sitk.Image | None:
    """The patient's recurrence mask, read and checked (readable, only 0 and 1, not empty), or None.

    The validator checks headers only on this path, so the voxels are checked here. A defective mask is dropped, as
    the validator drops it (the patient trains the risk only): the reason, naming the file, goes to the QC record
    (``recurrence_dropped``) and the log.
    """
    path = getattr(record, "recurrence", None)
    if path is None:
        return None
    from ..site import ImageDefect, check_binary_mask, read_image_checked

    try:
        img = read_image_checked(path, allow_constant=True)
        if check_binary_mask(path, img) == 0:
            raise ImageDefect(path, "empty recurrence mask (no voxel = 1)")
    except Exception as exc:  # ImageDefect, RuntimeError
        qc["recurrence_dropped"] = str(exc)
        log.warning("patient %s: recurrence mask dropped: %s", record.patient_id, exc)
        return None
    return img


def _skipped_result(out_dir: Path, patient_id: str) -> PatientResult:
    """The result of a patient done by an earlier run (timepoints and excluded scans from its QC record)."""
    try:
        qc = json.loads(qc_path(out_dir, patient_id).read_text())
    except (OSError, ValueError):
        qc = {}
    return PatientResult(patient_id, "skipped", timepoints=list(qc.get("timepoints") or []),
                         excluded_scans=dict(qc.get("excluded_scans") or {}),
                         cache_file=str(cache_path(out_dir, patient_id)))


def _worker_init(threads: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:  # a pool worker: stop with the parent (a killed run leaves no worker running)
        die_with_parent(parent_pid)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, threads))


def _worker(args: tuple[Any, str, str, PipelineSettings, int]) -> PatientResult:
    record, site_name, out_dir, settings, seed = args
    return preprocess_patient(record, site_name=site_name, out_dir=out_dir, preset=settings, seed=seed)


def _run_pool(jobs: list[tuple[Any, str, str, PipelineSettings, int]], workers: int, threads: int,
              results: dict[str, PatientResult], bar: Any, *, last_try: bool = False) -> list[Any]:
    """Run ``jobs`` in a spawned process pool, store each result; return the jobs a broken pool lost (none when
    ``last_try``: they are reported as crashed)."""
    lost: set[int] = set()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=(threads, os.getpid())) as ex:
        futures = {ex.submit(_worker, job): i for i, job in enumerate(jobs)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            pid = jobs[i][0].patient_id
            try:
                results[pid] = fut.result()
            except cf.process.BrokenProcessPool as exc:
                if not last_try:
                    lost.add(i)
                    continue
                results[pid] = PatientResult(pid, "failed", error=f"patient {pid}: its worker process died ({exc}); "
                                             f"killed for memory? run it alone with --workers 1 to see more")
            except Exception as exc:  # noqa: BLE001 - e.g. a job that cannot be sent to the worker
                results[pid] = PatientResult(pid, "failed", error=f"patient {pid}: worker failed: "
                                             f"{type(exc).__name__}: {exc}")
            bar.update(1)
    return [job for i, job in enumerate(jobs) if i in lost]


def longest_first(records: Sequence[Any]) -> list[Any]:
    """The order in which a pool of workers starts the patients: most scans first, patient order among equals.

    A patient's cost is about proportional to its number of scans ``n_i``.  Greedy list scheduling of jobs in
    decreasing cost on ``m`` workers (LPT) finishes within ``(4/3 - 1/(3m))`` of the optimal makespan; in patient
    order a long patient listed last can run alone while the other workers idle (demo site-03, 3-3-3-2-2-3 scans
    on 2 workers: 161 s in patient order, 139 s longest first, from its measured per-patient seconds).
    """
    return sorted(records, key=lambda rec: -len(rec.scans))


#: Memory budget of one preprocessing worker: a brats patient of 4 scans peaks at 1.14 GB (docs/performance.md).
WORKER_MEMORY_BYTES = 2 * 1024**3


def _available_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(n_patients: int) -> int:
    """Worker processes for ``n_patients`` patients to preprocess:
    ``max(1, min(cores, n_patients, MemAvailable // WORKER_MEMORY_BYTES))``.  Each worker preprocesses one patient
    at a time; registration and N4 run on one ITK thread each (``threads.py``), so patients are the parallelism."""
    n = min(usable_cores(), max(1, n_patients))
    avail = _available_memory()
    if avail is not None:
        n = min(n, avail // WORKER_MEMORY_BYTES)
    return max(1, int(n))


def preprocess_site(
    site_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    preset: str | Preset | PipelineSettings = "demo",
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> PreprocessReport:
    """Validate a site (``strpnet_core.site.validate_site``) and preprocess every usable patient into ``out_dir``.

    Patients already done with the same settings hash are skipped (resume); failed ones are tried again, and
    temporary files a killed earlier run left are removed (``fsutil.remove_stale_parts``; every file is written
    atomically, so a kill never leaves a partial file under a final name).  ``workers`` > 1 runs one patient per
    process (bounded memory; None: :func:`default_workers`); each process uses ``threads`` SimpleITK threads
    (default: cores // workers) for resampling and demons, registration and N4 run on one (``threads.py``).
    Results come back in patient order whatever the completion order; the output is bit-identical whatever
    ``workers``, ``threads`` or the order. A worker process that dies takes only its own patient.
    A patient is done when its cache file and QC record match the settings hash and :func:`input_hash` (scans,
    files and outcome): one whose site added a scan or updated its outcome is preprocessed again, and the cache
    file of a patient that now fails or is excluded by validation is removed.
    A defective case never stops the site: its reason (naming the file) is in the report, which is also written to
    ``out_dir/preprocess_report.json`` (:data:`REPORT_NAME`).
    """
    from tqdm import tqdm

    from ..site import ERROR, validate_site

    settings = preset if isinstance(preset, PipelineSettings) else PipelineSettings.from_preset(preset)
    shash = settings.hash(seed)
    out = Path(out_dir)
    if (warning := private_dir(out)) is not None:
        log.warning("%s", warning)
    for stale in remove_stale_parts(out):  # temporary files of a killed earlier run
        log.info("removed %s (left by a killed writer)", stale)
    # Outcomes are required (and scans after the recurrence dropped by the validator) when the site has them;
    # an inference site without outcomes.csv is preprocessed too.  Voxels are checked when each image is read.
    has_outcomes = (Path(site_dir) / OUTCOMES_CSV).exists()
    if not has_outcomes:
        log.warning("%s has no %s: preprocessed for inference only (training and evaluation leave out patients "
                    "without an outcome)", site_dir, OUTCOMES_CSV)
    index = validate_site(site_dir, require_outcomes=has_outcomes, check_voxels=False, progress=progress)
    problems = [str(p) for p in index.problems]
    results: dict[str, PatientResult] = {}
    todo = []
    for rec in index.patients:
        if is_done(out, rec, shash):
            results[rec.patient_id] = _skipped_result(out, rec.patient_id)
        else:
            todo.append(rec)
    bar = tqdm(total=len(index.patients), initial=len(results), desc=f"preprocess {index.site_name}",
               unit="patient", disable=not progress)
    jobs = [(rec, index.site_name, str(out), settings, seed) for rec in longest_first(todo)]
    workers = default_workers(len(jobs)) if workers is None else max(1, int(workers))
    threads = threads or max(1, usable_cores() // workers)
    if workers == 1 or len(jobs) <= 1:
        with itk_threads(threads):
            for job in jobs:
                r = _worker(job)
                results[r.patient_id] = r
                bar.update(1)
    else:
        # A worker that dies (killed for memory, a crash in native code) breaks the whole pool: every unfinished
        # patient's future fails with it. Those are run again one per fresh single-worker pool, so that a crash
        # then names its own patient and the others finish.
        again = _run_pool(jobs, workers, threads, results, bar)
        for job in again:
            _run_pool([job], 1, threads, results, bar, last_try=True)
    bar.close()
    ordered = [results[rec.patient_id] for rec in index.patients]
    # A patient rejected now (excluded by validation, or failed) must not be trained on an earlier run's file (nor
    # shown by its QC figure).
    for pid in [*index.excluded, *(r.patient_id for r in ordered if r.status == "failed")]:
        (out / f"{pid}.qc.png").unlink(missing_ok=True)
        if cache_path(out, pid).exists():
            cache_path(out, pid).unlink()
            log.warning("removed %s: the patient is now rejected", cache_path(out, pid))
    # Nor a patient whose folders are gone from the site (consent withdrawn, renamed): its files go too, unless
    # validation found no patient at all (an empty or unmounted site folder must not empty the cache).
    known = {rec.patient_id for rec in index.patients} | set(index.excluded)
    removed = []
    for f in list_cache(out) if known else []:
        pid = f.name[: -len(CACHE_SUFFIX)]
        if pid not in known:
            for path in (f, qc_path(out, pid), out / f"{pid}.qc.png"):
                path.unlink(missing_ok=True)
            removed.append(pid)
            log.warning("removed %s and its QC files: patient %s is no longer in %s", f, pid, site_dir)
    excluded = {pid: [str(p) for p in probs] for pid, probs in index.excluded.items()}
    site_problems = [str(p) for p in index.problems if p.patient_id is None and p.level == ERROR]
    dropped = {rec.patient_id: [str(p) for p in index.patient_problems(rec.patient_id) if p.level == ERROR]
               for rec in index.patients}
    report = PreprocessReport(index.site_name, str(out), shash, ordered, problems, excluded, site_problems,
                              {pid: v for pid, v in dropped.items() if v}, removed)
    atomic_write_json(report.report_path, {
        "site_name": report.site_name, "site_dir": str(site_dir), "settings_hash": shash, "preset": settings.preset,
        "seed": seed, "results": [dataclasses.asdict(r) for r in ordered], "excluded": excluded,
        "dropped": report.dropped, "removed": removed, "site_problems": site_problems,
        "validation_problems": problems,
        "summary": {"ok": len(report.ok), "failed": len(report.failed), "excluded": len(excluded)},
    })
    return report



def estimate_transforms(
    record: Any, *, preset: str | Preset | PipelineSettings = "demo", seed: int = 0
) -> dict[tuple[str, str], sitk.Transform]:
    """The transforms the pipeline resamples with, per (timepoint, modality): ``R_{k,m} ∘ L_k`` mapping a point
    of the pre-op T1c space to the scan's modality image (for QC, accuracy checks against a known truth and
    mapping results back).  Same steps and seeds as :func:`preprocess_patient`, without flagging or writing."""
    settings = preset if isinstance(preset, PipelineSettings) else PipelineSettings.from_preset(preset)
    scans = list(record.scans)
    pre = _prepare_scan(record.patient_id, scans[0], settings, seed)
    out = {(pre.timepoint, m): compose(pre.to_t1c[m], sitk.Transform(3, sitk.sitkIdentity)) for m in MODALITIES}
    pre_channels = _demons_channels(pre, settings)
    for scan in scans[1:]:
        w = _prepare_scan(record.patient_id, scan, settings, seed)
        res = _register_followup(pre, pre_channels, w, settings, seed)
        for m in MODALITIES:
            out[(w.timepoint, m)] = compose(w.to_t1c[m], res.transform)
    return out
