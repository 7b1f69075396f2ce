"""Synthetic-cohort generation speed and quality: prints a table (never asserts times).

Usage::

    python benchmarks/bench_synth.py --preset demo --sites 4 --patients 20 --workers 2   # the documented target
    python benchmarks/bench_synth.py --preset ci --sites 1 --patients 3                  # a quick look

Reports wall time, seconds per patient, patients, events, oracle C-index, and the C-index of a one-number image
baseline measured on the written pre-op images (FLAIR-halo thickness: ``cbrt(V_flair) - cbrt(V_t1c)`` with the
FLAIR and T1c hyperintense volumes: voxels of the true brain mask above 1.3 x the 60th percentile of the image's
brain intensities, each image divided by its true bias field first).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def preop_halo(out: Path, site: str, pid: str) -> float:
    """FLAIR-halo thickness from the written pre-op images and the true brain mask (equivalent-sphere radii, mm)."""
    truth = out / "truth" / site / pid
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(truth / f"{pid}-000-brainmask.nii.gz"))) > 0
    vols = []
    for mod in ("t2f", "t1c"):
        img = sitk.ReadImage(str(out / site / f"{pid}-000" / f"{pid}-000-{mod}.nii.gz"), sitk.sitkFloat32)
        bias = sitk.ReadImage(str(truth / f"{pid}-000-{mod}-bias.nii.gz"), sitk.sitkFloat32)
        a = sitk.GetArrayFromImage(img / bias)[mask]
        wm_level = np.percentile(a, 60)  # parenchyma dominates the brain
        vols.append(float((a > 1.3 * wm_level).sum()) * img.GetSpacing()[0] ** 3)
    return float(np.cbrt(vols[0]) - np.cbrt(vols[1]))


def main() -> None:
    """Run the benchmark and print one table row."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ci")
    p.add_argument("--sites", type=int, default=1)
    p.add_argument("--patients", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", action="store_true")
    p.add_argument("--out", default=None, help="keep the cohort here (default: a temporary folder)")
    args = p.parse_args()
    from lifelines.utils import concordance_index

    from strpnet_core.synth import generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        t0 = time.perf_counter()
        s = generate_cohort(out, sites=args.sites, patients=args.patients, preset=args.preset, seed=args.seed,
                            workers=args.workers, progress=False, png=args.png)
        wall = time.perf_counter() - t0
        halo = np.array([preop_halo(out, r.site, r.patient_id) for r in s.patients])
        t = np.array([r.time_days for r in s.patients])
        e = np.array([r.event for r in s.patients])
        c_halo = concordance_index(t, -halo, e) if e.sum() else float("nan")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        row = {"preset": args.preset, "sites": args.sites, "patients": s.n_patients, "events": s.n_events,
               "workers": args.workers, "png": args.png, "wall_s": round(wall, 1),
               "s_per_patient": round(wall / max(s.n_patients, 1), 2), "oracle_c": round(s.oracle_c_index, 3),
               "halo_baseline_c": round(float(c_halo), 3), "disk_mib": round(size, 1)}
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
