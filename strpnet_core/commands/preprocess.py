"""``strpnet preprocess SITE_DIR --out CACHE_DIR [--workers K] [--preset ci|demo|brats] [--seed S]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..presets import PRESETS

#: Preset used when neither ``--preset`` nor the site's ``site.json`` names one (real data: the 2 mm model grid).
DEFAULT_PRESET = "demo"


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
    p.add_argument("--workers", type=int, default=None, metavar="K",
                   help="patients processed in parallel (default: one per core, at most one per 2 GB of available "
                   "memory; each patient runs its registrations on one thread, so the output is the same for any K)")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="model grid preset (default: the preset a synthetic site's site.json records, else demo)")
    p.add_argument("--seed", type=int, default=0, help="registration sampling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Preprocess a site; print the per-patient table; exit 1 when no patient could be preprocessed."""
    from ..preprocessing.pipeline import preprocess_site
    from ..site import NoUsablePatientError

    if not Path(args.site_dir).is_dir():  # before anything is created under --out
        print(f"{args.site_dir}: site folder missing (nothing preprocessed)", file=sys.stderr)
        return 2
    preset, source = (args.preset, "--preset") if args.preset else site_preset(args.site_dir)
    print(f"preset {preset} ({source})")
    report = preprocess_site(
        args.site_dir, args.out, workers=args.workers, preset=preset, seed=args.seed, progress=not args.no_progress
    )
    print(report.table())
    print(f"{len(report.ok)} of {len(report.results) + len(report.excluded)} patient(s) preprocessed into "
          f"{report.out_dir} (settings {report.settings_hash}): {len(report.excluded)} excluded by validation, "
          f"{len(report.failed)} failed; {len(report.validation_problems)} validation problem(s)")
    if not report.ok:
        print(NoUsablePatientError(report.site_name, report.rejected, report.report_path), file=sys.stderr)
        return 1
    return 0


def site_preset(site_dir: str | Path) -> tuple[str, str]:
    """The preset to preprocess ``site_dir`` with when none is given, and where it comes from.

    A synthetic site (``strpnet synth``) records the preset it was generated at in ``site.json`` (``"preset"``);
    preprocessing it at another grid would silently mismatch the federation's model. Real sites record none:
    :data:`DEFAULT_PRESET`. An unreadable ``site.json`` or an unknown name also gives the default (the validator
    reports the file).
    """
    from ..contract import SITE_JSON

    path = Path(site_dir) / SITE_JSON
    try:
        recorded = json.loads(path.read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded in PRESETS:
        return recorded, f"recorded in {path}"
    return DEFAULT_PRESET, "default"
