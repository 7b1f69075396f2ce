"""``strpnet preprocess SITE_DIR --out CACHE_DIR [--workers K] [--preset ci|demo|brats] [--seed S]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``preprocess`` subcommand."""
    p = subparsers.add_parser(
        "preprocess",
        help="co-register, skull-strip, bias-correct and z-score a site into a per-patient cache",
        description="Validate SITE_DIR, then per patient: register every modality and timepoint to the pre-op T1c, "
        "extract the brain, N4-correct, resample once onto the model grid, z-score, and write CACHE_DIR/<patient>.npz "
        "with QC records (<patient>.qc.json, .qc.png). Finished patients are skipped (resumable).",
    )
    p.add_argument("site_dir", metavar="SITE_DIR", help="raw site folder (see docs/data-format.md)")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="output cache folder")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="patients processed in parallel (default 1)")
    p.add_argument("--preset", default="demo", choices=("ci", "demo", "brats"), help="model grid preset (default demo)")
    p.add_argument("--seed", type=int, default=0, help="registration sampling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Preprocess a site; print the per-patient table; exit 1 when no patient could be preprocessed."""
    from ..preprocessing.pipeline import preprocess_site

    report = preprocess_site(
        args.site_dir, args.out, workers=args.workers, preset=args.preset, seed=args.seed, progress=not args.no_progress
    )
    print(report.table())
    print(f"{len(report.ok)} of {len(report.results)} patient(s) preprocessed into {report.out_dir}"
          f" (settings {report.settings_hash}); {len(report.validation_problems)} validation problem(s)")
    return 0 if report.ok else 1
