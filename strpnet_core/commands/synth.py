"""``strpnet synth``: generate a synthetic BraTS-like longitudinal multi-site cohort (data contract + truth)."""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from strpnet_core.presets import PRESETS

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand."""
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic multi-site cohort",
        description="Generate a synthetic BraTS-like longitudinal glioblastoma cohort: OUT/site-NN in the data "
        "contract and OUT/truth (transforms, bias fields, brain masks, growth parameters, true risk).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--patients", default="10",
                   help="patients per site: one number M (site sizes differ around M: multipliers 0.6-1.4) "
                   "or a comma-separated count per site (default 10)")
    p.add_argument("--preset", default="ci", choices=tuple(PRESETS), help="resolution preset (default ci)")
    p.add_argument("--seed", type=int, default=0, help="master seed: same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--png", dest="png", action="store_true", default=None,
                   help="draw truth/<site>/<patient>/overview.png (default: on for demo and brats, off for ci)")
    g.add_argument("--no-png", dest="png", action="store_false", help="skip the overview PNGs (faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="replace the site-NN folders and truth/ of an earlier cohort in --out (refused otherwise: "
                   "files of two cohorts must not mix)")
    p.set_defaults(func=run)


def _clear_earlier_cohort(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force``; with ``force`` remove what ``strpnet synth`` writes there
    (``site-NN`` folders and ``truth/``), and refuse anything else it holds.

    Raises
    ------
    ValueError
        Naming the folder and what it holds.
    """
    import shutil

    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    ours = [e for e in entries if e.is_dir() and (e.name == "truth" or re.fullmatch(r"site-\d+", e.name))]
    if not force:
        raise ValueError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0].name}): give an empty "
                         f"folder, or --force to replace an earlier cohort there")
    others = [e.name for e in entries if e not in ours]
    if others:
        raise ValueError(f"--out {out} holds files that strpnet synth did not write ({', '.join(others[:5])}); "
                         f"--force only replaces site-NN folders and truth/")
    for e in ours:
        shutil.rmtree(e)


def run(args: argparse.Namespace) -> int:
    """Run ``strpnet synth``; returns the exit code."""
    from ..synth import generate_cohort

    t0 = time.perf_counter()
    try:
        _clear_earlier_cohort(Path(args.out), args.force)
        summary = generate_cohort(args.out, sites=args.sites, patients=args.patients, preset=args.preset,
                                  seed=args.seed, workers=args.workers, progress=not args.no_progress, png=args.png)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    sizes = ", ".join(f"{s['name']}={s['n_patients']}" for s in summary.sites)
    print(f"wrote {summary.n_patients} patients ({summary.n_events} events) in {len(summary.sites)} sites "
          f"[{sizes}] to {summary.out_dir} in {time.perf_counter() - t0:.1f} s; "
          f"oracle C-index {summary.oracle_c_index:.3f}")
    return 0
