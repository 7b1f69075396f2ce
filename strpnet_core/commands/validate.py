"""``strpnet validate SITE_DIR``: check a raw site folder and print one line per case (OK / EXCLUDED and why)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..fsutil import atomic_write_json
from ..site import ERROR, SiteIndex, validate_site


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` subcommand to ``strpnet``."""
    p = subparsers.add_parser(
        "validate",
        help="check a raw site folder: one line per case, OK or the reason it is excluded",
        description="Check a raw site folder (docs/data-format.md). Prints a table of cases (OK / EXCLUDED with the "
        "reason), every problem found and a summary. Exit code 1 when no case is usable.",
    )
    p.add_argument("site_dir", metavar="SITE_DIR", help="the site folder")
    p.add_argument("--no-voxels", action="store_true", help="read headers only (fast; misses truncation, NaN, ...)")
    p.add_argument("--require-recurrence", action="store_true", help="exclude event=1 patients without a valid mask")
    p.add_argument("--no-outcomes", action="store_true", help="inference data: do not require outcomes.csv")
    p.add_argument("--json", metavar="OUT.json", help="also write the full result as JSON")
    p.set_defaults(func=run)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def print_report(index: SiteIndex, out: TextIO | None = None) -> None:
    """Print the case table, the problems and the summary line of ``index`` (to ``out``, default stdout)."""
    out = out if out is not None else sys.stdout
    rows = [("patient", "scans", "event", "time", "status", "reason")]
    for rec in index.patients:
        dropped = [p for p in index.patient_problems(rec.patient_id) if p.level == ERROR]
        more = f" (+{len(dropped) - 1} more)" if len(dropped) > 1 else ""
        reason = f"dropped {dropped[0]}{more}" if dropped else ""
        rows.append((rec.patient_id, str(len(rec.scans)), _fmt(rec.event), _fmt(rec.time_days), "OK", reason))
    for pid, problems in index.excluded.items():
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        rows.append((pid, "-", "-", "-", "EXCLUDED", f"{problems[0]}{more}" if problems else ""))
    rows[1:] = sorted(rows[1:])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5], file=out)
    if index.problems:
        print(f"\nproblems ({len(index.problems)}):", file=out)
        for p in index.problems:
            print(f"  {p}", file=out)
    s = index.summary()
    print(
        f"\nsite {s['site_name']}: {s['usable']} usable, {s['excluded']} excluded, {s['events']} events, "
        f"{s['scans']} scans; {s['errors']} error(s), {s['warnings']} warning(s)",
        file=out,
    )


def run(args: argparse.Namespace) -> int:
    """Validate ``args.site_dir``, print the report, write ``--json``; 1 when no case is usable."""
    index = validate_site(
        args.site_dir,
        require_outcomes=not args.no_outcomes,
        require_recurrence=args.require_recurrence,
        check_voxels=not args.no_voxels,
        progress=sys.stderr.isatty(),
    )
    print_report(index)
    if args.json:
        atomic_write_json(args.json, index.to_dict())
    return 0 if index.patients else 1
