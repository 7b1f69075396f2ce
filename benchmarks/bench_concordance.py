"""Speed of ``strpnet_core.metrics.concordance_counts`` against lifelines' ``concordance_index``.

Prints a table: n, our time, lifelines' time on the same data (skipped above ``--lifelines-max``), their ratio, and
whether both C-indices agree to 1e-9. Each timing is the best of ``--repeats`` runs (``time.perf_counter``).

    python benchmarks/bench_concordance.py                  # n = 1e3, 1e4, 1e5
    python benchmarks/bench_concordance.py --sizes 1000 --repeats 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from lifelines.utils import concordance_index as lifelines_cindex

from strpnet_core.metrics import concordance_counts


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall-clock time of ``repeats`` calls of ``fn`` and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risks with ties (rounded), integer-day times with ties, ~40% censoring."""
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 2)
    time_days = np.ceil(rng.exponential(365.0, size=n) * np.exp(-0.5 * risk))
    event = (rng.random(n) < 0.6).astype(np.int64)
    return risk, time_days, event


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lifelines-max", type=int, default=100_000, help="largest n timed with lifelines")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    header = f"{'n':>9} | {'ours (s)':>10} | {'lifelines (s)':>13} | {'ratio':>7} | {'C-index':>9} | agree"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        risk, time_days, event = make_data(n, args.seed)
        t_ours, counts = best_time(lambda: concordance_counts(risk, time_days, event), args.repeats)
        c_ours = counts.c_index  # type: ignore[union-attr]
        if n <= args.lifelines_max:
            t_ll, c_ll = best_time(lambda: lifelines_cindex(time_days, -risk, event), args.repeats)
            ll_col, ratio_col = f"{t_ll:13.4f}", f"{t_ll / t_ours:7.1f}"
            agree = "yes" if abs(c_ours - float(c_ll)) <= 1e-9 else "NO"  # type: ignore[arg-type]
        else:
            ll_col, ratio_col, agree = f"{'skipped':>13}", f"{'-':>7}", "-"
        print(f"{n:>9} | {t_ours:10.4f} | {ll_col} | {ratio_col} | {c_ours:9.6f} | {agree}")


if __name__ == "__main__":
    main()
