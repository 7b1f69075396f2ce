"""``strpnet report RUN_DIR``: an HTML page with PNG plots for a federated run (``strpnet_core.report``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="HTML report of a federated run (per-round and per-site metrics, test-set Kaplan-Meier, overlays)",
        description="Write RUN_DIR/report/report.html with PNG plots: the federated C-index, Dice and loss per round, "
        "each site's sample sizes and metrics (its own aggregate counts), and, with a test set of the coordinator's "
        "own held-out patients, the test C-index, Kaplan-Meier curves of the low/high predicted-risk groups with the "
        "log-rank p-value, and example overlays of the predicted recurrence map.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of strpnet simulate or flower-server")
    p.add_argument("--test-cache", metavar="DIR", help="preprocessed test patients with outcomes (strpnet preprocess; "
                   "default: the run's own test-cache, e.g. the coordinator test set of strpnet simulate)")
    p.add_argument("--test-data", metavar="SITE_DIR",
                   help="or a raw test site folder (preprocessed with the run's preset into OUT/test-cache)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/report)")
    p.add_argument("--overlays", type=int, default=3, help="example test patients drawn (default 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0, help="preprocessing seed of --test-data (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="preprocessing processes of --test-data (default: one per core within the available memory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``strpnet report``; 0 on success, 2 on an unusable run directory or test set."""
    from ..report import ReportError, format_value, write_report

    try:
        res = write_report(
            Path(args.run_dir), out_dir=args.out, test_cache=args.test_cache, test_data=args.test_data,
            n_overlays=args.overlays, device=args.device, seed=args.seed, workers=args.workers,
        )
    except ReportError as exc:
        print(f"strpnet report: error: {exc}", file=sys.stderr)
        return 2
    if res.test is not None:
        t = res.test
        print(f"test set: {t.n_patients} patients ({t.n_events} events), C-index {format_value(t.c_index)}, "
              f"Dice {format_value(t.dice)}, log-rank p {format_value(t.logrank_p, '.3g')}")
    print(f"report: {res.html} ({len(res.images)} images)")
    return 0
