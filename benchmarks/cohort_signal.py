"""How well can anything rank a synthetic cohort's patients? Harrell's C-index of truth quantities vs the outcome.

    python benchmarks/cohort_signal.py COHORT_DIR [COHORT_DIR ...]

For each cohort made by ``strpnet synth`` (or ``strpnet simulate``'s ``RUN_DIR/data``), reads every patient's
``truth/<site>/<patient>/truth.json`` and prints the C-index (``strpnet_core.metrics.concordance_index``: a pair
``i, j`` with ``t_i < t_j`` and ``e_i = 1`` is concordant when ``r_i > r_j``, ties in ``r`` count 1/2) of:

- the generator's true risk (``-log`` of the noise-free time to recurrence: the oracle, an upper bound),
- hidden tumour biology: proliferation ``rho``, infiltration length ``L = sqrt(D / rho)``, margin over length
  ``-m / L``,
- what the pre-op images show: enhancing and FLAIR volumes, their ratio (FLAIR / enhancing grows with ``L``),
- what the schedule shows: growth time before diagnosis, the last scan's day, the number of scans.

Follow-up images (a residual that regrows) are not scored here: the gap between the pre-op image rows and the
oracle is what they and the hidden biology (therapy response, noise) hold.  Sign: every score is oriented so that a higher
value means an earlier recurrence in the generator's model (e.g. ``-m / L``: a small margin for the infiltration).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from strpnet_core.metrics import concordance_index


def _rows(cohort: Path) -> list[dict]:
    files = sorted((cohort / "truth").glob("site-*/*/truth.json"))
    if not files:
        raise SystemExit(f"{cohort}: no truth/site-*/<patient>/truth.json (not a synthetic cohort?)")
    return [json.loads(f.read_text()) for f in files]


def scores(rows: list[dict]) -> dict[str, np.ndarray]:
    """Named risk scores (higher = earlier recurrence expected) of the patients in ``rows``."""
    a = lambda key: np.array([float(r[key]) for r in rows])  # noqa: E731
    rho, length = a("rho_per_day"), np.sqrt(a("d_white_mm2_per_day") / a("rho_per_day"))
    enh, flair = a("preop_enhancing_ml"), a("preop_flair_ml")
    return {
        "true risk (oracle)": a("true_risk"),
        "rho (hidden)": rho,
        "L = sqrt(D / rho) (hidden)": length,
        "-margin / L (hidden)": -a("resection_margin_mm") / length,
        "pre-op enhancing ml (image)": enh,
        "pre-op FLAIR ml (image)": flair,
        "FLAIR / enhancing (image)": flair / np.maximum(enh, 1e-6),
        "-growth days before diagnosis": -a("diagnosis_growth_days"),
        "-last scan day": np.array([-float(r["scan_days"][-1]) for r in rows]),
        "-number of scans": np.array([-float(len(r["scan_days"])) for r in rows]),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cohorts", nargs="+", type=Path, metavar="COHORT_DIR",
                    help="a cohort of `strpnet synth` (or `strpnet simulate`'s RUN_DIR/data)")
    cohorts = ap.parse_args(argv).cohorts
    tables = []
    for c in cohorts:
        rows = _rows(c)
        t, e = np.array([r["time_days"] for r in rows]), np.array([r["event"] for r in rows])
        tables.append(({k: concordance_index(v, t, e) for k, v in scores(rows).items()}, len(rows), int(e.sum())))
    print(f"{'C-index vs observed outcome':<34}" + "".join(f"{c.name[-14:]:>16}" for c in cohorts))
    print(f"{'patients / events':<34}" + "".join(f"{f'{n} / {k}':>16}" for _, n, k in tables))
    for key in tables[0][0]:
        print(f"{key:<34}" + "".join(f"{tab[key]:>16.3f}" for tab, _, _ in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
