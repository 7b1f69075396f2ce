"""Differential privacy vs utility: federated C-index with dp = off and with Flower's server-side fixed clipping at a
few noise multipliers (prints a table; never asserts).

Sites are tiny ci-preset caches written directly with a learnable signal (a bright blob whose intensity drives the
time to recurrence: tests/sim_fixtures.make_site_caches), so the C-index means something; the same seed, cohort
and model for every row. The noise standard deviation added to the averaged weights is z * C / m (z = noise
multiplier, C = clipping norm, m = accepted replies of the round).

    .venv/bin/python benchmarks/bench_privacy.py [--sites 4] [--patients 10] [--rounds 3] [--clip 0.5]
        [--multipliers 0.01,0.1,1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sim_fixtures import make_site_caches  # noqa: E402  (tests/sim_fixtures.py: the learnable site caches)
from strpnet_core.commands.simulate import simulate  # noqa: E402

TINY = {"val-fraction": 0.3, "local-epochs": 2, "lr": 0.003, "num-threads": 1, "model.widths": "4,8",
        "model.lstm-hidden": 8, "model.risk-hidden": 8}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clip", type=float, default=0.5, help="dp-clipping-norm C")
    ap.add_argument("--multipliers", default="0.01,0.1,1.0", help="dp-noise-multiplier values z")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        caches = make_site_caches(Path(tmp) / "caches", sites=args.sites, patients=args.patients, seed=args.seed)
        settings = [("off", 0.0)] + [("server-fixed", float(z)) for z in args.multipliers.split(",")]
        for mode, z in settings:
            run_dir = Path(tmp) / f"run-{mode}-{z}"
            over = {**TINY, "dp": mode, "dp-noise-multiplier": z, "dp-clipping-norm": args.clip}
            t0 = time.monotonic()
            simulate(run_dir, data=None, cache=caches, sites=args.sites, rounds=args.rounds, preset="ci",
                     seed=args.seed, overrides=over, timeout_s=1800, progress=False)
            hist = json.loads((run_dir / "metrics.json").read_text())
            final = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
            norm = float(sum(float(torch.sum(v.double() ** 2)) for v in final.values()) ** 0.5)
            rows.append((mode, z, args.clip, z * args.clip / args.sites, hist[-1].get("c_index"),
                         hist[-1].get("comparable"), hist[-1].get("eval_loss"), norm, time.monotonic() - t0))
    print(f"\n{args.sites} sites x {args.patients} patients (ci, 16^3, tiny model), {args.rounds} rounds, "
          f"seed {args.seed}")
    print(f"{'dp':>13} {'z':>6} {'C':>5} {'noise sd':>9} {'C-index':>8} {'pairs':>6} {'eval loss':>10} "
          f"{'|w|':>8} {'s':>6}")
    for mode, z, c, sd, ci, pairs, loss, norm, secs in rows:
        def f(v: object, spec: str) -> str:
            return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)
        print(f"{mode:>13} {z:>6g} {c:>5g} {sd:>9.4f} {f(ci, '.3f'):>8} {f(pairs, '.0f'):>6} {f(loss, '.4f'):>10} "
              f"{norm:>8.2f} {secs:>6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
