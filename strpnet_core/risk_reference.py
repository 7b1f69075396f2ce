"""The training sites' risk distribution, shared as aggregates only, and the percentile of a new patient's risk.

Flow (federated run)::

    site s:   risks r_i of its training patients (final global model) -> counts h_s over fixed bins
              (federation.RISK_HIST_*), adjacent bins grouped from the underflow to the overflow bin so that each
              group holds >= k patients (k = RISK_HIST_MIN_PATIENTS, or the site's min-eval-patients when larger;
              all zeros when the site has fewer)
    server:   H = sum_s h_s (the evaluation pooling) -> quantiles q_1 .. q_99 -> RUN_DIR/risk_reference.json
    predict:  percentile of a new risk r among q_1 .. q_99

No per-patient risk leaves a site: only the counts of its training patients over groups of adjacent bins that tile
the whole range, each holding at least ``k`` patients (:func:`k_anonymous_counts`), which the server sums with the
other sites' counts; the reference file holds the pooled quantiles, the number of patients and the bin layout.

Quantiles of the pooled histogram use a piecewise-linear CDF: with bin edges ``e_0 < ... < e_K`` (``e_0 = LOW``,
``e_K = HIGH``), underflow count ``u``, bin counts ``c_k`` and total ``N``, ``F(e_k) = (u + sum_{j<=k} c_j) / N``
and ``F`` is linear inside each bin (uniform mass within a bin). The quantile ``q_p`` solves ``F(q_p) = p / 100``; it
is clamped to ``LOW`` (``HIGH``) when it falls in the underflow (overflow) mass. The resolution is the bin width
(0.5 with the defaults) where the sites' patients are dense, a site's group (wider) where they are sparse: each
site's first and last groups reach to the clamps ``LOW`` and ``HIGH``, which spreads the tails (the 1st and 99th
percentiles of a site of a few hundred patients move out by about 1 to 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .federation import (
    RISK_HIST_BINS,
    RISK_HIST_HIGH,
    RISK_HIST_KEYS,
    RISK_HIST_LOW,
    RISK_HIST_MIN_PATIENTS,
)
from .fsutil import atomic_write_json

log = logging.getLogger(__name__)

#: File name of the reference, next to the final model.
RISK_REFERENCE_JSON = "risk_reference.json"
#: Format tag of the reference file.
RISK_REFERENCE_FORMAT = "strpnet-risk-reference/1"
#: The quantile levels stored (percent).
QUANTILE_LEVELS: tuple[int, ...] = tuple(range(1, 100))

__all__ = [
    "QUANTILE_LEVELS",
    "RISK_REFERENCE_FORMAT",
    "RISK_REFERENCE_JSON",
    "RiskReference",
    "dataset_risks",
    "histogram_counts",
    "histogram_edges",
    "k_anonymous_counts",
    "load_risk_reference",
    "percentile_of",
    "quantiles_from_histogram",
    "risk_histogram",
    "site_risk_histogram",
    "write_risk_reference",
    "write_risk_reference_from_history",
]


def histogram_edges() -> np.ndarray:
    """The ``RISK_HIST_BINS + 1`` finite bin edges ``linspace(LOW, HIGH, BINS + 1)``."""
    return np.linspace(RISK_HIST_LOW, RISK_HIST_HIGH, RISK_HIST_BINS + 1)


def risk_histogram(risks: Any) -> np.ndarray:
    """Counts of ``risks`` in the fixed bins: ``[under, bin_1 .. bin_K, over]`` (int64, length ``K + 2``).

    ``under`` counts ``r < LOW``, bin k counts ``e_{k-1} <= r < e_k``, ``over`` counts ``r >= HIGH``.

    Raises
    ------
    ValueError
        A non-finite risk.
    """
    r = np.asarray(risks, dtype=np.float64).ravel()
    if not np.all(np.isfinite(r)):
        raise ValueError(f"risk_histogram: {int(np.count_nonzero(~np.isfinite(r)))} non-finite risk score(s)")
    idx = np.searchsorted(histogram_edges(), r, side="right")  # 0 = under, K + 1 = over
    return np.bincount(idx, minlength=RISK_HIST_BINS + 2).astype(np.int64)


def k_anonymous_counts(counts: Any, k: int) -> np.ndarray:
    """Histogram counts in which every cell stands for a group of at least ``k`` patients, the groups tiling all the
    cells from the underflow to the overflow cell.

    Groups of adjacent cells, left to right: a group starts right after the previous one (the first at cell 0,
    whether occupied or not) and closes at the first cell where its count ``c_g`` reaches ``k``; the cells after the
    last closed group (holding fewer than ``k``) join it, up to the last cell. Each of the ``n_g`` cells of a group
    reports ``c_g / n_g``; the total is kept. All zeros when the total is below ``k``.

    What a reader learns: each group's count (``>= k``) and its closing cells, i.e. the bins of the ``k``-th,
    ``(c_1 + k)``-th, ... lowest risks (order statistics with at least ``k`` patients at or below them and, but for
    the last, at least ``k`` above). The lowest and highest patients' bins are not shown: the first group reaches
    down to the underflow cell and the last up to the overflow cell (a grouping that starts at the first occupied
    bin, as this function did until 2026-12, shows the lowest patient's bin, and its last group's end the highest's).

    Parameters
    ----------
    counts:
        Non-negative counts ``[under, bin_1 .. bin_K, over]`` (:func:`risk_histogram`).
    k:
        Minimum number of patients per group, >= 1 (1 returns the counts unchanged, as float64).

    Returns
    -------
    np.ndarray
        float64 counts of the same length and total.
    """
    c = np.asarray(counts, dtype=np.float64)
    if k <= 1:
        return c.copy()
    out = np.zeros_like(c)
    if c.sum() < k:
        return out
    groups: list[list[int]] = [[]]
    for i in range(len(c)):
        groups[-1].append(i)
        if c[groups[-1]].sum() >= k:
            groups.append([])
    last = groups.pop()
    if last:  # the cells after the last closed group (fewer than k patients) join it
        groups[-1] += last
    for g in groups:
        out[g] = c[g].sum() / len(g)
    return out


def site_risk_histogram(risks: Any, *, min_patients: int = RISK_HIST_MIN_PATIENTS) -> dict[str, float]:
    """What a site sends: :data:`federation.RISK_HIST_KEYS` -> counts of its training patients' risks, grouped by
    :func:`k_anonymous_counts` with ``k = min_patients`` (all zeros below ``min_patients`` patients): a cell of
    fewer patients would come close to their individual (binned) scores.
    """
    counts = k_anonymous_counts(risk_histogram(risks), min_patients)
    return {k: float(v) for k, v in zip(RISK_HIST_KEYS, counts, strict=True)}


def histogram_counts(metrics: Mapping[str, Any]) -> np.ndarray | None:
    """The histogram held by a metrics mapping (a site reply, pooled metrics or a round row), or None when it lacks
    one of :data:`federation.RISK_HIST_KEYS`.

    Raises
    ------
    ValueError
        A negative or non-finite count (named).
    """
    if not all(k in metrics for k in RISK_HIST_KEYS):
        return None
    out = np.zeros(len(RISK_HIST_KEYS), dtype=np.float64)
    for i, k in enumerate(RISK_HIST_KEYS):
        v = metrics[k]
        if v is None or not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"risk histogram: invalid count {k} = {v!r}")
        out[i] = float(v)
    return out


def quantiles_from_histogram(counts: Any, levels: Sequence[float] = QUANTILE_LEVELS) -> np.ndarray:
    """Quantiles of the piecewise-linear CDF of a fixed-bin histogram (see the module docstring).

    Parameters
    ----------
    counts:
        ``[under, bin_1 .. bin_K, over]`` (length ``RISK_HIST_BINS + 2``), non-negative, total > 0.
    levels:
        Quantile levels in percent, in (0, 100).

    Returns
    -------
    np.ndarray
        One quantile per level (float64), non-decreasing, within ``[LOW, HIGH]``.

    Raises
    ------
    ValueError
        Wrong length, negative counts, empty histogram or a level outside (0, 100).
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    if c.shape != (RISK_HIST_BINS + 2,):
        raise ValueError(f"quantiles_from_histogram: expected {RISK_HIST_BINS + 2} counts, got {c.shape}")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("quantiles_from_histogram: counts must be finite and non-negative")
    total = float(c.sum())
    if total <= 0:
        raise ValueError("quantiles_from_histogram: empty histogram")
    lv = np.asarray(levels, dtype=np.float64)
    if np.any(lv <= 0) or np.any(lv >= 100):
        raise ValueError(f"quantiles_from_histogram: levels must be in (0, 100), got {levels!r}")
    edges = histogram_edges()
    cum = c[0] + np.concatenate([[0.0], np.cumsum(c[1:-1])])  # mass below each edge e_0 .. e_K
    out = np.empty(lv.shape)
    for i, p in enumerate(lv):
        target = p / 100.0 * total
        if target <= cum[0]:
            out[i] = edges[0]
        elif target > cum[-1]:
            out[i] = edges[-1]
        else:
            k = int(np.searchsorted(cum, target, side="left"))  # cum[k-1] < target <= cum[k]
            frac = (target - cum[k - 1]) / (cum[k] - cum[k - 1])
            out[i] = edges[k - 1] + frac * (edges[k] - edges[k - 1])
    return out


@dataclass(frozen=True)
class RiskReference:
    """The pooled risk distribution of the training sites (aggregates only).

    Attributes
    ----------
    levels, quantiles:
        Quantile levels (percent) and the risk at each.
    n_patients:
        Patients counted (sum over the contributing sites).
    n_sites:
        Sites evaluated in the round the histogram comes from (some may have sent zeros, being below the
        minimum count; None when unknown).
    source:
        Where it comes from (e.g. ``federated run, round 3``).
    """

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]
    n_patients: int
    n_sites: int | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON content of ``risk_reference.json``."""
        return {
            "format": RISK_REFERENCE_FORMAT,
            "levels_percent": list(self.levels),
            "quantiles": [float(q) for q in self.quantiles],
            "n_patients": int(self.n_patients),
            "n_sites": self.n_sites,
            "source": self.source,
            "histogram": {"low": RISK_HIST_LOW, "high": RISK_HIST_HIGH, "bins": RISK_HIST_BINS,
                          "min_patients_per_site": RISK_HIST_MIN_PATIENTS},
            "privacy": "pooled quantiles of the training sites' risk scores; each site sent only fixed-bin counts "
                       f"grouped by at least {RISK_HIST_MIN_PATIENTS} patients (more where the site's min-eval-"
                       "patients is larger; none when it had fewer); no per-patient value",
        }


def write_risk_reference(
    path: str | os.PathLike[str], counts: Any, *, n_sites: int | None = None, source: str = ""
) -> RiskReference:
    """Write the quantiles of a pooled histogram as ``risk_reference.json`` (atomically) and return them.

    Raises
    ------
    ValueError
        From :func:`quantiles_from_histogram` (e.g. an empty histogram).
    """
    c = np.asarray(counts, dtype=np.float64)
    q = quantiles_from_histogram(c)
    ref = RiskReference(tuple(float(x) for x in QUANTILE_LEVELS), tuple(float(x) for x in q),
                        int(round(float(c.sum()))), n_sites, source)
    atomic_write_json(path, ref.to_dict())
    return ref


def write_risk_reference_from_history(
    run_dir: str | os.PathLike[str], history: Sequence[Mapping[str, Any]]
) -> tuple[Path | None, str]:
    """Server side: write ``RUN_DIR/risk_reference.json`` from the pooled histogram of the last round's evaluation
    (the final global model's risks of the training patients).

    Returns ``(path, what was done)``, or ``(None, why not)`` when the last round has no histogram or an empty one
    (every site below the minimum count, or no evaluate reply): then predictions report no percentile, and a
    reference that an earlier end of the same run wrote (e.g. before a resume that stopped in another round) is
    removed (the reason says so), so that no reference of another model stays beside the final one. The caller
    shows the reason.
    """
    path = Path(run_dir) / RISK_REFERENCE_JSON
    last = history[-1] if history else {}
    counts = histogram_counts(last)
    if counts is None or counts.sum() <= 0:
        why = (f"round {last.get('round')} has no pooled risk histogram (every site had fewer than "
               f"{RISK_HIST_MIN_PATIENTS} training patients, or none was evaluated)" if history
               else "no round completed")
        if path.exists():
            path.unlink()
            why += f"; removed {path} (an earlier model's)"
        return None, why
    sites = last.get("eval_sites")
    ref = write_risk_reference(path, counts, n_sites=None if sites is None else int(sites),
                               source=f"federated run, round {last.get('round')}: training patients of the "
                               "evaluated sites")
    of = "" if ref.n_sites is None else f" of {ref.n_sites} site(s)"
    return path, f"{path}: {ref.n_patients} training patients{of}"


def load_risk_reference(path: str | os.PathLike[str]) -> RiskReference:
    """Read a ``risk_reference.json``.

    Raises
    ------
    ValueError
        Unreadable, another format, or quantiles that are not finite and non-decreasing (naming the file).
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{p}: unreadable risk reference ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict) or d.get("format") != RISK_REFERENCE_FORMAT:
        raise ValueError(f"{p}: not a {RISK_REFERENCE_FORMAT} file")
    try:
        levels = tuple(float(x) for x in d["levels_percent"])
        quantiles = tuple(float(x) for x in d["quantiles"])
        n = int(d["n_patients"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}: malformed risk reference ({type(exc).__name__}: {exc})") from None
    q = np.asarray(quantiles)
    if len(levels) != len(quantiles) or len(q) < 2 or not np.all(np.isfinite(q)) or np.any(np.diff(q) < 0) \
            or np.any(np.diff(levels) <= 0):
        raise ValueError(f"{p}: quantiles must be finite, non-decreasing and one per level")
    sites = d.get("n_sites")
    return RiskReference(levels, quantiles, n, None if sites is None else int(sites), str(d.get("source", "")))


def percentile_of(risk: float, ref: RiskReference) -> float:
    """Percentile (0-100) of ``risk`` in the reference distribution: linear interpolation between the stored
    quantiles ``(q_p, p)``; the mid-level of a run of equal quantiles equal to ``risk``; clamped to the lowest and
    highest stored level (1 and 99) outside them.

    Raises
    ------
    ValueError
        A non-finite ``risk``.
    """
    r = float(risk)
    if not math.isfinite(r):
        raise ValueError(f"percentile_of: risk must be finite, got {risk!r}")
    q = np.asarray(ref.quantiles)
    lv = np.asarray(ref.levels)
    lo = int(np.searchsorted(q, r, side="left"))
    hi = int(np.searchsorted(q, r, side="right"))
    if hi > lo:  # r equals quantiles lo .. hi-1
        return float((lv[lo] + lv[hi - 1]) / 2.0)
    if lo == 0:
        return float(lv[0])
    if lo == len(q):
        return float(lv[-1])
    frac = (r - q[lo - 1]) / (q[lo] - q[lo - 1])
    return float(lv[lo - 1] + frac * (lv[lo] - lv[lo - 1]))


def dataset_risks(model: Any, dataset: Any, cfg: Any) -> np.ndarray:
    """Risk scores (float64, dataset order) of every patient of ``dataset`` with ``model`` in eval mode on
    ``cfg``'s device and precision (``training.predict_batch``). Stays on the site."""
    from torch.utils.data import DataLoader

    from .dataset import collate_patients
    from .training import predict_batch, select_device

    n = len(dataset)
    if n == 0:
        return np.zeros(0)
    model.to(select_device(cfg.device))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0,
                        collate_fn=collate_patients)
    out = [predict_batch(model, batch, cfg)[1].double().numpy() for batch in loader]
    return np.concatenate(out)

