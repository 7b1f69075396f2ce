"""Preprocessing benchmark: per-step seconds per timepoint and accuracy against the synthetic truth.

    python benchmarks/bench_preprocessing.py --preset demo [--patients 3] [--threads 2] [--seed 0]

Generates a small synthetic cohort (``strpnet synth``) at the preset (or reuses ``--cohort DIR``), preprocesses
every site, and prints

- seconds per timepoint for each step (read, brain, register_modalities, n4, register_longitudinal, resample),
- registration error vs truth (mean over the moving image's brain voxels y of |T(S(y)) - y|, mm) for the
  longitudinal T1c and the other modalities,
- N4 (the pipeline's settings): correlation of the estimated and true log-bias inside the true brain mask, also
  restricted to images whose true log-bias varies enough for a correlation to mean something (std in the brain
  >= 0.08), and the RMS of the residual ``(l - mean l) - (t - mean t)`` (l, t: estimated, true log-bias in the brain),
- white-matter coefficient of variation (std / mean inside the true WM region) of the bias-free image
  ``(I - offset) / B``, the written (biased) image I and the N4-corrected image (the N4 scores come from
  ``strpnet_core.synth.truth_regions.score_bias_correction``),
- brain extraction Dice vs the true mask (skull-on sites; the pipeline's atlas settings), z-score check on the cache.

``--cohort DIR --max-patients N`` takes the first N patients of every site of an existing cohort.
``--slice-mm T`` preprocesses a copy of the cohort whose images are 2D-acquisition-like: blurred across z (Gaussian,
FWHM = T) and resampled to T mm along z, in-plane spacing kept (docs/preprocessing.md, "Anisotropic scans"); the
errors are still against the generator's true transforms; N4 is scored only on images on the truth's grid (the
true bias is on the original grid).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _truth_tx(path: Path) -> sitk.Transform:
    return sitk.ReadTransform(str(path))


def _reslice_cohort(cohort: Path, out: Path, thickness_mm: float) -> Path:
    """A copy of ``cohort``'s site folders (made once; written to ``out.tmp``, then renamed) with every scan image
    ``I`` replaced by ``resample_z(G_T * I)``: ``G_T`` a Gaussian along z of FWHM ``T`` (sigma = T / 2.3548),
    sampled every ``T`` mm along z from the same origin, linear interpolation.  Tables, ``site.json`` and recurrence
    masks are copied unchanged."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for site in sorted(p for p in cohort.iterdir() if p.name.startswith("site-")):
        shutil.copytree(site, tmp / site.name)
        for f in (tmp / site.name).glob("*/*.nii.gz"):
            if f.parent.name == "recurrence":
                continue
            img = sitk.ReadImage(str(f))
            sp, size = list(img.GetSpacing()), list(img.GetSize())
            blurred = sitk.RecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), sigma=thickness_mm / 2.3548, direction=2)
            nz = max(1, int(size[2] * sp[2] / thickness_mm))
            sitk.WriteImage(sitk.Resample(blurred, size[:2] + [nz], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                                          sp[:2] + [thickness_mm], img.GetDirection(), 0.0, img.GetPixelID()), str(f))
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--sites", type=int, default=1)
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cohort", type=Path, default=None, help="existing synthetic cohort (else generated)")
    ap.add_argument("--max-patients", type=int, default=None, help="first N patients of each site (with --cohort)")
    ap.add_argument("--slice-mm", type=float, default=None,
                    help="preprocess a copy with T mm slices along z (blurred and resliced; see above)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_preprocessing"))
    args = ap.parse_args(argv)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)

    from strpnet_core.preprocessing.bias import flair_lesion_mask, n4_correct
    from strpnet_core.preprocessing.brain import brain_mask
    from strpnet_core.preprocessing.pipeline import PipelineSettings, preprocess_patient
    from strpnet_core.preprocessing.qc import dice
    from strpnet_core.preprocessing.registration import RegistrationError, mean_displacement_error
    from strpnet_core.site import validate_site

    cohort = args.cohort
    if cohort is None:
        from strpnet_core.cli import main as cli

        cohort = args.work / f"cohort-{args.preset}"
        if not (cohort / "truth" / "cohort.json").exists():
            cli(["synth", "--out", str(cohort), "--sites", str(args.sites), "--patients", str(args.patients),
                 "--preset", args.preset, "--seed", str(args.seed), "--no-png", "--no-progress", "--force"])
    settings = PipelineSettings.from_preset(args.preset)
    steps: dict[str, list[float]] = {}
    reg_long, reg_mod, n4_corr, n4_corr_varied, n4_resid, dices, zchk = [], [], [], [], [], [], []
    brain_failures: list[str] = []
    excluded: list[str] = []  # scans the pipeline excluded (QC)
    wm_cv: dict[str, list[float]] = {"bias-free (I - offset) / B": [], "written (biased) I": [], "N4-corrected": []}
    from strpnet_core.synth.truth_regions import score_bias_correction, white_matter_probability

    truth_root = cohort / "truth"
    if args.slice_mm:
        cohort = _reslice_cohort(cohort, args.work / f"{cohort.name}-slices-{args.slice_mm:g}mm", args.slice_mm)
        print(f"images resliced to {args.slice_mm:g} mm along z: {cohort}", flush=True)
    cohort_truth = json.loads((truth_root / "cohort.json").read_text())
    preset = cohort_truth["preset"]
    site_profiles = {s["name"]: s for s in cohort_truth["sites"]}
    t_all = time.perf_counter()
    for site_dir in sorted(p for p in cohort.iterdir() if p.name.startswith("site-")):
        sliced = f"-slices-{args.slice_mm:g}mm" if args.slice_mm else ""
        out = args.work / f"cache-{args.preset}{sliced}" / site_dir.name
        index = validate_site(site_dir, require_outcomes=False, check_voxels=False)
        truth = truth_root / site_dir.name
        for rec in index.patients[: args.max_patients]:
            tdir = truth / rec.patient_id
            info = json.loads((tdir / "truth.json").read_text())
            pwm_ref = white_matter_probability(info, preset)
            offset = float(site_profiles[site_dir.name]["intensity_offset"])
            est: dict = {}
            r = preprocess_patient(rec, site_name=index.site_name, out_dir=out, preset=args.preset, seed=args.seed,
                                   transforms_out=est)
            print(f"{rec.patient_id}: {r.status} {r.seconds:.1f} s {r.error or ''}", flush=True)
            qc = json.loads((out / f"{r.patient_id}.qc.json").read_text())
            for s in qc["scans"]:
                for k, v in s.get("seconds", {}).items():
                    steps.setdefault(k, []).append(v)
                if not s.get("included", True):
                    excluded.append(f"{rec.patient_id} {s['timepoint']}: {s.get('reason')}")
            for scan in rec.scans:
                tm = sitk.ReadImage(str(tdir / f"{rec.patient_id}-{scan.timepoint}-brainmask.nii.gz"))
                lesion = None  # the FLAIR-bright lesion the pipeline leaves out of its N4 fits
                if settings.n4_lesion_mads is not None:
                    flair = sitk.ReadImage(str(scan.images["t2f"]), sitk.sitkFloat32)
                    lesion = flair_lesion_mask(flair, sitk.Resample(tm, flair, sitk.Transform(),
                                                                    sitk.sitkNearestNeighbor, 0),
                                               mads=settings.n4_lesion_mads)
                for m, path in scan.images.items():
                    tfile = tdir / f"{rec.patient_id}-{scan.timepoint}-{m}.tfm"
                    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
                    mmask = sitk.Resample(tm, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
                    if tfile.exists() and (scan.timepoint, m) in est and (scan.timepoint != "000" or m != "t1c"):
                        err = mean_displacement_error(est[(scan.timepoint, m)], _truth_tx(tfile), mmask)
                        (reg_long if m == "t1c" else reg_mod).append(err)
                    bias_file = tdir / f"{rec.patient_id}-{scan.timepoint}-{m}-bias.nii.gz"
                    bias_img = sitk.ReadImage(str(bias_file)) if bias_file.exists() else None
                    # N4 is scored on the truth's own grid only (not on a resliced or resampled copy)
                    if bias_img is not None and bias_img.GetSize() == img.GetSize():
                        corr_img, lb = n4_correct(img, mmask, fit_spacing_mm=settings.n4_fit_spacing_mm,
                                                  iterations=settings.n4_iterations,
                                                  control_points=settings.n4_control_points,
                                                  fit_erode_mm=settings.n4_fit_erode_mm, exclude=lesion)
                        mk = sitk.GetArrayFromImage(mmask) > 0
                        true_bias = sitk.GetArrayFromImage(bias_img)
                        sc = score_bias_correction(img, corr_img, lb, mk, true_bias, offset, _truth_tx(tfile), info,
                                                   pwm_ref)
                        n4_corr.append(sc.corr)
                        if sc.true_log_std >= 0.08:
                            n4_corr_varied.append(sc.corr)
                        n4_resid.append(sc.residual_rms)
                        if sc.wm_voxels >= 20:
                            for key, cv in zip(wm_cv, (sc.cv_clean, sc.cv_written, sc.cv_corrected)):
                                wm_cv[key].append(cv)
                t1c = sitk.ReadImage(str(scan.images["t1c"]), sitk.sitkFloat32)
                try:
                    bm, method = brain_mask(t1c, seed=args.seed, settings=settings.brain_linear)
                except (RegistrationError, ValueError) as exc:  # counted, not scored
                    brain_failures.append(f"{rec.patient_id} {scan.timepoint}: {exc}")
                    continue
                if method == "atlas":
                    tm_t1c = sitk.Resample(tm, t1c, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
                    dices.append(dice(sitk.GetArrayFromImage(bm), sitk.GetArrayFromImage(tm_t1c)))
        from strpnet_core.cache import list_cache, load_cached_patient

        for f in list_cache(out):
            p = load_cached_patient(f)
            m = p.brain_mask > 0
            x = p.images.astype(np.float32)
            zchk.append(max(float(np.abs(x[:, :, m].mean(-1)).max()), float(np.abs(x[:, :, m].std(-1) - 1).max()),
                            float(np.abs(x[:, :, ~m]).max())))
    n_tp = len(steps.get("read", []))
    print(f"\npreset {args.preset}: {n_tp} timepoints, {time.perf_counter() - t_all:.0f} s including the accuracy checks")
    print(f"{'step':<24}{'mean s/timepoint':>18}{'max':>8}")
    for k in ("read", "brain", "register_modalities", "n4", "register_longitudinal", "resample"):
        v = steps.get(k, [0.0])
        print(f"{k:<24}{np.mean(v):>18.2f}{np.max(v):>8.2f}")
    print(f"{'total':<24}{sum(np.mean(v) for v in steps.values()):>18.2f}")

    def fmt(v: list[float]) -> str:
        return f"mean {np.mean(v):.3f} min {np.min(v):.3f} max {np.max(v):.3f} (n={len(v)})" if v else "n/a"

    print(f"scans excluded by the pipeline: {len(excluded)}" + "".join(f"\n  {e}" for e in excluded))
    print(f"registration error T1c -> pre-op (mm): {fmt(reg_long)}")
    print(f"registration error other modalities (mm): {fmt(reg_mod)}")
    print(f"N4 corr(estimated, true log-bias): {fmt(n4_corr)}")
    print(f"N4 corr, images with true log-bias std >= 0.08 in the brain: {fmt(n4_corr_varied)}")
    print(f"N4 residual log-bias RMS (mean-free): {fmt(n4_resid)}")
    print("white-matter CV (std / mean in the true WM region), per image:")
    for key, v in wm_cv.items():
        print(f"  {key:<28}{fmt(v)}")
    if wm_cv["N4-corrected"]:
        ratio = np.asarray(wm_cv["N4-corrected"]) / np.asarray(wm_cv["bias-free (I - offset) / B"])
        print(f"  N4 / bias-free ratio        mean {ratio.mean():.3f} max {ratio.max():.3f}")
    print(f"brain extraction Dice (skull-on scans): {fmt(dices)}")
    print(f"brain extraction failures: {len(brain_failures)}" + "".join(f"\n  {f}" for f in brain_failures))
    print(f"z-score max deviation (|mean|, |std-1|, |background|): {fmt(zchk)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
