"""Cohort orchestration: per-patient generation (seeded, parallel) and the site tables, truth and oracle C-index.

Seeds: site profiles from ``SeedSequence(seed, spawn_key=(0,))``; patient j of site i from
``SeedSequence(seed, spawn_key=(1, i, j))``, split into independent streams (anatomy, biology, schedule, appearance,
acquisition). Results therefore do not depend on the number of workers or the order of completion.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import contract
from ..console import die_with_parent
from ..fsutil import atomic_write_json
from .acquisition import ScanSampler, acquire, affine_of, compose, rigid, scan_transform
from .anatomy import add_head, build_anatomy, sample_deformation
from .appearance import patient_texture, render_clean
from .fields import block_mean, upsample_block
from .io import write_array, write_csv, write_transform
from .settings import FOV_CENTRE_LPS, get_settings
from .site_effects import BIAS_QUANTUM, SiteProfile, sample_site_profile, site_sizes
from .timeline import FollowUp, GrowthTooSlow, sample_biology, simulate_course

log = logging.getLogger(__name__)
TRUTH_DIR = "truth"


@dataclass(frozen=True)
class PatientRecord:
    """What the cohort tables and the oracle need from one generated patient."""

    site: str
    patient_id: str
    event: int
    time_days: float
    scan_days: tuple[int, ...]
    true_risk: float
    event_time_uncensored: float | None
    censor_time: float
    preop_enhancing_ml: float
    preop_flair_ml: float


@dataclass
class CohortSummary:
    """Result of :func:`generate_cohort` (also written to ``OUT/truth/cohort.json``)."""

    out_dir: Path
    preset: str
    seed: int
    sites: list[dict]
    patients: list[PatientRecord] = field(repr=False)
    n_patients: int = 0
    n_events: int = 0
    oracle_c_index: float = float("nan")

    def to_dict(self) -> dict:
        """JSON-ready dictionary (patients listed without per-voxel data)."""
        return {
            "preset": self.preset,
            "seed": self.seed,
            "n_patients": self.n_patients,
            "n_events": self.n_events,
            "oracle_c_index": self.oracle_c_index,
            "sites": self.sites,
            "patients": [asdict(p) for p in self.patients],
        }


def patient_id(site_index: int, j: int) -> str:
    """Patient identifier ``SYN<site:02d>-<j+1:04d>`` (unique across sites; BraTS-like folder ``<id>-<ttt>``)."""
    return f"SYN{site_index:02d}-{j + 1:04d}"


def parse_patient_counts(patients: int | str | list[int], n_sites: int, seed: int) -> list[int]:
    """Per-site patient counts.

    A single number M gives non-IID sizes around M (:func:`site_sizes`: multipliers evenly spaced on [0.6, 1.4],
    shuffled by the seed); a comma-separated string or list gives the counts explicitly (one per site).
    """
    if isinstance(patients, str):
        parts = [p for p in patients.split(",") if p.strip()]
        patients = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
    if isinstance(patients, (list, tuple)):
        if len(patients) != n_sites:
            raise ValueError(f"{len(patients)} patient counts given for {n_sites} sites")
        counts = [int(p) for p in patients]
    else:
        counts = site_sizes(n_sites, int(patients), np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))))
    if any(c < 1 for c in counts):
        raise ValueError(f"every site needs at least one patient, got {counts}")
    return counts


def sample_sites(n_sites: int, counts: list[int], scan_spacing: float, seed: int) -> list[SiteProfile]:
    """The site profiles of a cohort (seeded by ``seed`` only)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    return [sample_site_profile(i + 1, counts[i], scan_spacing, rng) for i in range(n_sites)]


def fill_cavity(c: np.ndarray, cavity: np.ndarray | None) -> np.ndarray:
    """Copy into every cavity voxel the density of its nearest non-cavity voxel.

    Interpolating the coarse density onto the scan grid would otherwise pull the density at the cavity wall
    towards the cavity's 0 and erase thin shells of tumour there; the cavity itself is drawn from its own mask.
    """
    if cavity is None or not cavity.any() or cavity.all():
        return c
    idx = ndimage.distance_transform_edt(cavity, return_distances=False, return_indices=True)
    return c[tuple(idx)]


def _timepoint(k: int) -> str:
    return f"{k:03d}"


def generate_patient(out_dir: str | os.PathLike[str], site: SiteProfile, j: int, preset: str, seed: int,
                     png: bool = False) -> PatientRecord:
    """Generate patient ``j`` (0-based) of ``site``: its scans, recurrence mask and truth files.

    Writes ``OUT/<site>/<id>-<ttt>/...``, ``OUT/<site>/recurrence/<id>-recurrence.nii.gz`` (event = 1) and
    ``OUT/truth/<site>/<id>/...``; the site tables are written by :func:`generate_cohort`.
    """
    out = Path(out_dir)
    st = get_settings(preset)
    grid, f = st.grid, st.growth_factor
    pid = patient_id(site.index, j)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed, spawn_key=(1, site.index, j)).spawn(5)]
    r_anat, r_bio, r_sched, r_look, r_acq = streams
    deformation = sample_deformation(r_anat)
    anat = build_anatomy(grid, deformation, st.anatomy_resolution, FOV_CENTRE_LPS)
    if site.skull:
        add_head(anat, grid.spacing, r_anat)
    gm_c, wm_c = block_mean(anat.p_gm, f), block_mean(anat.p_wm, f)
    tissue_c = (block_mean(anat.brain.astype(np.float32), f) >= 0.5) & (gm_c + wm_c >= 0.5)
    h_c = st.growth_grid.spacing
    for _attempt in range(20):
        bio = sample_biology(r_bio, tissue_c, wm_c, h_c, site.aggressiveness)
        follow = FollowUp(float(site.followup_interval_days), site.followup_days * float(r_sched.uniform(0.5, 1.0)),
                          float(r_sched.exponential(site.loss_mean_days)))
        try:
            course = simulate_course(wm_c, gm_c, tissue_c, h_c, bio, follow, st.max_timepoints, st.dt_max_days, r_sched)
            break
        except GrowthTooSlow:
            continue
    else:  # pragma: no cover - 20 rejections in a row do not happen with the configured ranges
        raise RuntimeError(f"{pid}: could not draw growth parameters that reach diagnosis")

    rim_mm = float(r_look.uniform(3.0, 6.0))
    texture = patient_texture(r_look, grid.shape, grid.spacing)
    support_ref = (anat.brain | (anat.head > 0)) if site.skull else anat.brain
    site_dir, truth = out / site.name, out / TRUTH_DIR / site.name / pid
    days = [int(round(d)) for d in course.scan_days]
    vox_ml = grid.spacing**3 / 1000.0
    preop_c = upsample_block(course.densities[0], f, grid.shape)
    volumes = (float((preop_c >= bio.theta_t1c).sum() * vox_ml), float((preop_c >= bio.theta_flair).sum() * vox_ml))
    cav_ref = upsample_block(course.cavity.astype(np.float32), f, grid.shape) if course.cavity is not None else None
    cav_ref = np.clip(cav_ref, 0.0, 1.0) if cav_ref is not None else None
    for k, (c_coarse, cav) in enumerate(zip(course.densities, course.cavities)):
        ttt = _timepoint(k)
        c_ref = preop_c if k == 0 else upsample_block(fill_cavity(c_coarse, cav), f, grid.shape)
        cavity = cav_ref if cav is not None else None
        scan_parts = [] if k == 0 else scan_transform(r_acq, grid, site)  # [R_scan, W_scan]
        sampler = ScanSampler(grid, scan_parts[1] if scan_parts else None)
        scan_dir = site_dir / contract.scan_dir_name(pid, ttt)
        for mod in contract.MODALITIES:
            mod_part = [] if (k == 0 and mod == contract.REFERENCE_MODALITY) else [
                rigid(r_acq, site.modality_rot_deg, site.modality_shift_mm)]
            s = compose(mod_part + scan_parts)  # S = R_mod o R_scan o W_scan
            affine = affine_of(mod_part + scan_parts[:1])
            clean = render_clean(mod, anat, c_ref, cavity, bio.theta_t1c, bio.theta_flair, rim_mm, grid.spacing,
                                 texture, site.skull)
            acq = acquire(clean, support_ref, grid, sampler, affine, site, r_acq)
            write_array(acq.image, grid.spacing, grid.origin, scan_dir / contract.scan_file_name(pid, ttt, mod))
            write_array(acq.bias, grid.spacing, grid.origin, truth / f"{pid}-{ttt}-{mod}-bias.nii.gz",
                        slope=BIAS_QUANTUM)
            write_transform(s, truth / f"{pid}-{ttt}-{mod}.tfm")
            if mod == contract.REFERENCE_MODALITY:
                mask = acq.support if acq.support is not None else (
                    sampler.sample(anat.brain.astype(np.float32), affine, order=0) > 0.5)
                write_array(mask.astype(np.uint8), grid.spacing, grid.origin, truth / f"{pid}-{ttt}-brainmask.nii.gz")
    rec_ml = 0.0
    if course.event:
        # The label is the event criterion's own set (coarse c >= theta_T1c outside the cavity, in parenchyma),
        # carried block-wise onto the scan grid so that its volume is the detected one.
        coarse_label = (course.recurrence_density >= bio.theta_t1c) & ~course.cavity & tissue_c
        label = upsample_block(coarse_label.astype(np.float32), f, grid.shape, order=0) > 0.5
        label &= anat.brain
        if cav_ref is not None:
            label &= cav_ref < 0.5
        rec_ml = float(label.sum() * vox_ml)
        write_array(label.astype(np.uint8), grid.spacing, grid.origin,
                    site_dir / contract.RECURRENCE_DIR / contract.recurrence_file_name(pid))
    seed_lps = [grid.origin[a] + st.growth_grid.spacing * bio.seed_index[2 - a] + 0.5 * (f - 1) * grid.spacing
                for a in range(3)]
    atomic_write_json(truth / "truth.json", {
        "patient_id": pid, "site": site.name, "preset": preset, "seed": seed, "patient_index": j,
        "d_white_mm2_per_day": bio.growth.d_white, "d_grey_mm2_per_day": bio.growth.d_white / 10.0,
        "rho_per_day": bio.growth.rho, "seed_index_growth_grid_zyx": list(bio.seed_index), "seed_point_lps_mm": seed_lps,
        "growth_spacing_mm": h_c, "diagnosis_diameter_mm": bio.diag_diameter_mm,
        "diagnosis_growth_days": course.extra["diagnosis_growth_days"],
        "theta_t1c": bio.theta_t1c, "theta_flair": bio.theta_flair, "resection_margin_mm": bio.margin_mm,
        "necrosis_rim_mm": rim_mm, "surgery_day": bio.surgery_day,
        "therapy_day": bio.surgery_day + bio.postop_delay + bio.therapy_delay,
        "therapy_log_kill": bio.log_kill, "therapy_rho_factor": bio.rho_factor,
        "true_risk": course.true_risk, "true_risk_definition": "-log(noise-free time to recurrence in days)",
        "noise_free_time_days": course.noise_free_time, "event_time_uncensored_days": course.event_time,
        "censor_time_days": course.censor_time, "event": course.event, "time_days": course.time,
        "scan_days": days, "preop_enhancing_ml": volumes[0], "preop_flair_ml": volumes[1],
        "recurrence_ml": rec_ml, "anatomy_deformation": deformation,
    })
    if png:
        from .render import render_patient_overview

        render_patient_overview(out, site.name, pid, truth / "overview.png")
    return PatientRecord(site.name, pid, course.event, course.time, tuple(days), course.true_risk, course.event_time,
                         course.censor_time, volumes[0], volumes[1])


def _worker_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a killed generation leaves no worker running
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run(args: tuple) -> PatientRecord:
    return generate_patient(*args)


def oracle_c_index(records: list[PatientRecord]) -> float:
    """Harrell's C of the true risk against the observed outcomes (higher risk = earlier recurrence)."""
    risk = np.array([r.true_risk for r in records])
    time = np.array([r.time_days for r in records])
    event = np.array([r.event for r in records])
    if event.sum() == 0 or len(records) < 2:
        return float("nan")
    try:
        from ..metrics import concordance_index  # the project's own, when present

        return float(concordance_index(risk, time, event))
    except Exception:  # noqa: BLE001 - fall back to the reference implementation
        from lifelines.utils import concordance_index as ll_c

        return float(ll_c(time, -risk, event))


def generate_cohort(out_dir: str | os.PathLike[str], *, sites: int, patients: int | str | list[int], preset: str,
                    seed: int, workers: int = 1, progress: bool = True, png: bool | None = None) -> CohortSummary:
    """Generate a synthetic multi-site cohort in the data contract, with its truth kept apart.

    Parameters
    ----------
    out_dir:
        Output folder; sites go to ``OUT/site-01 ...``, the truth to ``OUT/truth``.
    sites:
        Number of sites (>= 1).
    patients:
        Patients per site: one number (non-IID sizes around it, see :func:`parse_patient_counts`) or one per site.
    preset:
        ``ci``, ``demo`` or ``brats``.
    seed:
        Master seed: the same seed gives the same bytes, whatever ``workers``.
    workers:
        Processes generating patients in parallel.
    progress:
        Show a tqdm progress bar.
    png:
        Draw ``truth/<site>/<patient>/overview.png``; default: the preset's setting (off for ci).

    Returns
    -------
    CohortSummary
        Per-patient records and the oracle C-index of the true risk.
    """
    if sites < 1:
        raise ValueError(f"need at least one site, got {sites}")
    st = get_settings(preset)
    png = st.render_png if png is None else bool(png)
    out = Path(out_dir)
    counts = parse_patient_counts(patients, sites, seed)
    profiles = sample_sites(sites, counts, st.preset.scan_spacing_mm, seed)
    tasks = [(str(out), p, j, st.preset.name, int(seed), png) for p in profiles for j in range(p.n_patients)]
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="synth patients", unit="patient", disable=not progress)
    records: list[PatientRecord] = []
    if workers <= 1:
        for t in tasks:
            records.append(_run(t))
            bar.update()
    else:
        with cf.ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                                    initargs=(os.getpid(),)) as pool:
            for fut in cf.as_completed([pool.submit(_run, t) for t in tasks]):
                records.append(fut.result())
                bar.update()
    bar.close()
    records.sort(key=lambda r: (r.site, r.patient_id))
    for p in profiles:
        mine = [r for r in records if r.site == p.name]
        write_csv(out / p.name / contract.SCAN_DATES_CSV, contract.SCAN_DATES_COLUMNS,
                  [(r.patient_id, _timepoint(k), d) for r in mine for k, d in enumerate(r.scan_days)])
        write_csv(out / p.name / contract.OUTCOMES_CSV, contract.OUTCOMES_COLUMNS,
                  [(r.patient_id, r.event, f"{r.time_days:.1f}") for r in mine])
        atomic_write_json(out / p.name / contract.SITE_JSON, {"site_name": p.name, "synthetic": True,
                                                              "preset": st.preset.name})
    summary = CohortSummary(out, st.preset.name, int(seed), [p.to_dict() for p in profiles], records,
                            n_patients=len(records), n_events=int(sum(r.event for r in records)),
                            oracle_c_index=oracle_c_index(records))
    atomic_write_json(out / TRUTH_DIR / "cohort.json", summary.to_dict())
    return summary
