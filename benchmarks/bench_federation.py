"""Federation benchmark: prints tables (never asserts timings).

1. Per round: the slowest site's local training time vs the round's wall time (Flower + evaluation overhead).
2. Bytes per round per site vs the model size (ArrayRecord payloads: the global model down for train and evaluate,
   the site's model up after training; metric records are a few hundred bytes).
3. Simulation with 2 / 4 / 8 sites: wall time and peak resident memory of the whole process tree (SuperLink,
   ServerApp, Ray workers).

Sites are tiny caches written directly (no synth/preprocessing), so the numbers measure the federation itself.

    .venv/bin/python benchmarks/bench_federation.py [--sites 2,4,8] [--rounds 2] [--patients 4] [--size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient  # noqa: E402
from strpnet_core.commands.simulate import simulate  # noqa: E402


def write_caches(root: Path, sites: int, patients: int, size: int, seed: int = 0) -> Path:
    """``root/site-0k/*.npz``: tiny random patients (T=2, 4 modalities, size^3)."""
    rng = np.random.default_rng(seed)
    for s in range(sites):
        site = f"site-{s + 1:02d}"
        for i in range(patients):
            blob = np.zeros((size,) * 3, dtype=np.uint8)
            blob[2:7, 2:7, 2:7] = 1
            images = rng.normal(0, 0.3, (2, 4, size, size, size)).astype(np.float32)
            event = int(rng.random() < 0.7)
            p = CachedPatient(patient_id=f"{site}-{i:03d}", site=site, images=images,
                              days=np.array([0.0, 90.0], dtype=np.float32), timepoints=["000", "001"],
                              brain_mask=np.ones((size,) * 3, dtype=np.uint8), recurrence=blob if event else None,
                              event=event, time=float(rng.integers(60, 900)), meta={"preset": "ci"})
            save_cached_patient(cache_path(root / site, p.patient_id), p)
    return root


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the process tree's RSS every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="2,4,8", help="comma-separated site counts (default 2,4,8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--patients", type=int, default=4, help="patients per site (default 4)")
    ap.add_argument("--size", type=int, default=16, help="grid edge of the tiny caches (default 16)")
    ap.add_argument("-c", "--run-config", action="append", default=[], help="run-config override KEY=VALUE")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    from strpnet_core.commands.simulate import parse_overrides

    overrides = {"val-fraction": 0.5, **parse_overrides(args.run_config)}
    counts = [int(x) for x in args.sites.split(",")]
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-federation-"))
    results = []
    for n in counts:
        caches = write_caches(base / f"caches-{n}", n, args.patients, args.size)
        run_dir = base / f"run-{n}"
        t0 = time.monotonic()
        with PeakMemory() as mem:
            simulate(run_dir, data=None, cache=caches, sites=n, rounds=args.rounds, preset="ci",
                     overrides=overrides, timeout_s=1800, progress=False)
        wall = time.monotonic() - t0
        rows = json.loads((run_dir / "metrics.json").read_text())
        results.append((n, wall, mem.peak, rows))

    print("\n1. round wall time vs slowest site's local training (s)")
    print(f"{'sites':>5} {'round':>5} {'round wall':>10} {'slowest site':>12} {'mean site':>9} {'overhead':>8}")
    for n, _, _, rows in results:
        for r in rows:
            slow, mean = r.get("train_seconds_max") or 0.0, r.get("train_seconds") or 0.0
            print(f"{n:>5} {r['round']:>5} {r['round_seconds']:>10.1f} {slow:>12.1f} {mean:>9.1f} "
                  f"{r['round_seconds'] - slow:>8.1f}")

    print("\n2. payload bytes per round per site (ArrayRecord) vs model size")
    print(f"{'sites':>5} {'model bytes':>12} {'down/site':>10} {'up/site':>10} {'total/round':>12}")
    for n, _, _, rows in results:
        mb = rows[0]["model_bytes"]
        down, up = 2 * mb, mb  # global model for train + evaluate; trained model back
        print(f"{n:>5} {mb:>12,} {down:>10,} {up:>10,} {n * (down + up):>12,}")

    print(f"\n3. simulation ({args.rounds} rounds, {args.patients} patients/site, {args.size}^3 caches)")
    print(f"{'sites':>5} {'wall s':>8} {'s/round':>8} {'peak RSS MB':>12}")
    for n, wall, peak, rows in results:
        print(f"{n:>5} {wall:>8.1f} {np.mean([r['round_seconds'] for r in rows]):>8.1f} {peak / 2**20:>12.0f}")
    print(f"\nruns in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
