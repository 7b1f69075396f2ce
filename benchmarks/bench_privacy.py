"""Differential privacy vs utility: federated C-index with dp = off and with Flower's server-side fixed clipping at a
few noise multipliers (prints a table; never asserts).

Sites are tiny ci-preset caches written directly with a learnable signal (a bright blob whose intensity drives the
time to recurrence, the recipe of tests/server/conftest.py), so the C-index means something; the same seed, cohort
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient  # noqa: E402
from strpnet_core.commands.simulate import simulate  # noqa: E402

TINY = {"val-fraction": 0.3, "local-epochs": 2, "lr": 0.003, "num-threads": 1, "model.widths": "4,8",
        "model.lstm-hidden": 8, "model.risk-hidden": 8}


def write_learnable_caches(root: Path, sites: int, patients: int, size: int = 16, seed: int = 0) -> Path:
    """``root/site-0k/*.npz``: T=2, 4 modalities, size^3; blob intensity -> time to event (learnable risk)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for s in range(sites):
        site = f"site-{s + 1:02d}"
        for i in range(patients):
            c = rng.integers(size // 4, 3 * size // 4, 3)
            blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= (size / 6) ** 2
            strength = float(rng.uniform(0.5, 2.5))
            images = rng.normal(0, 0.3, (2, 4, size, size, size)).astype(np.float32)
            images[:, 1][:, blob] += strength
            event = int(rng.random() < 0.7)
            p = CachedPatient(patient_id=f"S{s + 1:02d}-{i:03d}", site=site, images=images,
                              days=np.array([0.0, 60.0 + i], dtype=np.float32), timepoints=["000", "001"],
                              brain_mask=np.ones((size,) * 3, dtype=np.uint8),
                              recurrence=blob.astype(np.uint8) if event else None, event=event,
                              time=float(np.clip(900 / strength + rng.normal(0, 40), 30, 1500)),
                              meta={"preset": "ci"})
            save_cached_patient(cache_path(root / site, p.patient_id), p)
    return root


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
        caches = write_learnable_caches(Path(tmp) / "caches", args.sites, args.patients, seed=args.seed)
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
