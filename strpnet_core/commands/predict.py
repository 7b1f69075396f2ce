"""``strpnet predict``: one new patient's raw folder + a trained model -> recurrence map in the patient's pre-op T1c
geometry, binary map, risk score and percentile, overview PNG (logic in ``strpnet_core.predict``)."""

from __future__ import annotations

import argparse
import sys

from strpnet_core.presets import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand to ``strpnet``."""
    from ..predict import DEFAULT_THRESHOLD

    p = subparsers.add_parser(
        "predict",
        help="predict where and how soon one patient's tumour recurs",
        description="Validate and preprocess one patient's raw longitudinal folder (site layout: <id>-<ttt>/ scan "
        "folders and scan_dates.csv), run a trained model, and write into OUT_DIR: the recurrence probability map "
        "and the binary map as NIfTI in the geometry of the patient's pre-op T1c (same affine and shape: overlays "
        "in any viewer), a JSON with the risk score, its percentile among the training sites' patients, the "
        "threshold and the model's SHA-256, and a PNG of orthogonal slices. See docs/predict.md.",
    )
    p.add_argument("patient_dir", metavar="PATIENT_DIR", help="the patient's raw folder (site layout)")
    p.add_argument("--model", required=True, metavar="MODEL_FILE",
                   help="final_model.pt of a federated run or of strpnet train")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"binary map = probability > T (default {DEFAULT_THRESHOLD}, the cut of the federated Dice)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--risk-reference", metavar="F", default=None,
                   help="risk_reference.json (default: the one next to MODEL_FILE; without it no percentile)")
    p.add_argument("--patient", default=None, metavar="ID", help="the patient, when PATIENT_DIR holds several")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="resolution preset (default: the model's, from its run folder)")
    p.add_argument("--seed", type=int, default=0, help="preprocessing seed (default 0)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="preprocessed cache folder to reuse or fill (default OUT_DIR/preprocessed)")
    p.add_argument("--force", action="store_true", help="replace an earlier prediction of the patient in OUT_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``strpnet predict``; returns the exit code (2 on an input error)."""
    from ..predict import PredictError, predict_patient

    try:
        res = predict_patient(
            args.patient_dir, args.model, args.out, threshold=args.threshold, device=args.device,
            risk_reference=args.risk_reference, patient_id=args.patient, preset=args.preset, seed=args.seed,
            cache_dir=args.cache, force=args.force,
        )
    except PredictError as exc:
        print(f"strpnet predict: error: {exc}", file=sys.stderr)
        return 2
    s = res.summary
    pct = "n/a (no risk reference)" if res.percentile is None else f"{res.percentile:.1f}"
    print(f"patient {res.patient_id}: risk score {res.risk:.4f}, percentile {pct}; "
          f"predicted volume {s['predicted_volume_ml']:.1f} ml at probability > {res.threshold:g} "
          f"(max {s['max_probability']:.3f}); device {s['device']}")
    for path in (res.prob_path, res.mask_path, res.json_path, res.png_path):
        print(f"wrote {path}")
    return 0
