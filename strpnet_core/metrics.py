"""Evaluation metrics (numpy): concordance (Harrell, Uno), Dice, iso-volume coverage.

Every function accepts numpy arrays, Python sequences or torch tensors (converted with ``.detach().cpu()``).
Higher risk means earlier recurrence everywhere.

Federated use: a site sends only aggregates (:class:`ConcordanceCounts`, Dice intersection/denominator sums);
summing them over sites gives exactly the metric over all within-site pairs / voxels, and no per-patient value
leaves a site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "ConcordanceCounts",
    "concordance_counts",
    "concordance_index",
    "uno_concordance_index",
    "dice_counts",
    "dice_from_counts",
    "dice_score",
    "iso_volume_coverage",
]


# ----------------------------------------------------------------------------------------------------------------
# input helpers
# ----------------------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """Convert a torch tensor (any device, with or without grad), a sequence or an array to numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _survival_arrays(
    risk: Any, time: Any, event: Any, *, fn: str, names: tuple[str, str, str] = ("risk", "time", "event")
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert (risk, time, event) to float64, float64, bool 1-D arrays of one length."""
    r_name, t_name, e_name = names
    r = _to_numpy(risk)
    t = _to_numpy(time)
    e = _to_numpy(event)
    for name, a in ((r_name, r), (t_name, t), (e_name, e)):
        if a.ndim != 1:
            raise ValueError(f"{fn}: {name} must be 1-D, got shape {a.shape}")
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{fn}: {name} must be numeric or boolean, got dtype {a.dtype}")
    if not (len(r) == len(t) == len(e)):
        raise ValueError(f"{fn}: length mismatch: {r_name} {len(r)}, {t_name} {len(t)}, {e_name} {len(e)}")
    r = r.astype(np.float64)
    t = t.astype(np.float64)
    e_f = e.astype(np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError(f"{fn}: {r_name} contains NaN or inf")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{fn}: {t_name} contains NaN or inf")
    if np.any(t < 0):
        raise ValueError(f"{fn}: {t_name} contains negative values")
    if not np.all((e_f == 0) | (e_f == 1)):
        raise ValueError(f"{fn}: {e_name} must contain only 0 and 1 (or booleans)")
    return r, t, e_f.astype(bool)


# ----------------------------------------------------------------------------------------------------------------
# concordance
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConcordanceCounts:
    """Pair counts of Harrell's concordance; additive over disjoint sets of pairs (sites, batches).

    Attributes
    ----------
    concordant:
        Comparable pairs where the patient with the earlier event has the strictly higher risk.
    discordant:
        Comparable pairs where the patient with the earlier event has the strictly lower risk.
    tied_risk:
        Comparable pairs with exactly equal risks (count 1/2).
    comparable:
        All comparable pairs: ``concordant + discordant + tied_risk``.
    """

    concordant: int
    discordant: int
    tied_risk: int
    comparable: int

    _KEYS: ClassVar[tuple[str, ...]] = ("concordant", "discordant", "tied_risk", "comparable")

    def __post_init__(self) -> None:
        for key in self._KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"ConcordanceCounts: {key} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"ConcordanceCounts: {key} must be >= 0, got {value}")
            object.__setattr__(self, key, int(value))
        if self.concordant + self.discordant + self.tied_risk != self.comparable:
            raise ValueError(
                "ConcordanceCounts: comparable must equal concordant + discordant + tied_risk "
                f"({self.concordant} + {self.discordant} + {self.tied_risk} != {self.comparable})"
            )

    def __add__(self, other: ConcordanceCounts) -> ConcordanceCounts:
        if not isinstance(other, ConcordanceCounts):
            return NotImplemented
        return ConcordanceCounts(
            self.concordant + other.concordant,
            self.discordant + other.discordant,
            self.tied_risk + other.tied_risk,
            self.comparable + other.comparable,
        )

    @property
    def c_index(self) -> float:
        """Harrell's C = (concordant + tied_risk / 2) / comparable; ``nan`` when there is no comparable pair.

        ``nan`` (rather than an exception) lets a federation round with, e.g., no event at any site report
        "undefined" without failing; lifelines raises ``ZeroDivisionError`` in that case.
        """
        if self.comparable == 0:
            return float("nan")
        return (self.concordant + 0.5 * self.tied_risk) / self.comparable

    def to_dict(self) -> dict[str, int]:
        """Plain ``{name: int}`` mapping (e.g. for a Flower ``MetricRecord``)."""
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConcordanceCounts:
        """Inverse of :meth:`to_dict`; floats with integral values (as metric records may carry) are accepted.

        Raises
        ------
        ValueError
            A key is missing, or a value is not a non-negative integer.
        """
        values: dict[str, int] = {}
        for key in cls._KEYS:
            if key not in d:
                raise ValueError(f"ConcordanceCounts.from_dict: missing key {key!r}")
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"ConcordanceCounts.from_dict: {key} must be an integer, got {v!r}")
            if not np.isfinite(v) or float(v) != int(v):
                raise ValueError(f"ConcordanceCounts.from_dict: {key} must be an integer, got {v!r}")
            if v < 0:
                raise ValueError(f"ConcordanceCounts.from_dict: {key} must be >= 0, got {v!r}")
            values[key] = int(v)
        return cls(**values)


def _suffix_less_equal(values: np.ndarray, starts: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query q: counts of ``values[starts[q]:]`` strictly below / equal to ``queries[q]``.

    A wavelet matrix over the non-negative integer ``values`` (n of them, ``L = ceil(log2(max+1))`` bit levels):
    each level stably partitions the sequence by one bit (most significant first) and keeps the prefix counts of
    zeros, so a range ``[l, r)`` is followed down the levels in O(1) per level. Construction is O(n L), the queries
    O(m L), all vectorised; with ``values`` dense ranks, ``L = O(log n)``, hence O((n + m) log n) overall.
    """
    n = values.shape[0]
    m = queries.shape[0]
    less = np.zeros(m, dtype=np.int64)
    if n == 0 or m == 0:
        return less, np.zeros(m, dtype=np.int64)
    n_bits = max(1, int(values.max()).bit_length(), int(queries.max()).bit_length())
    cur = values.astype(np.int64)
    lo = starts.astype(np.int64).copy()
    hi = np.full(m, n, dtype=np.int64)
    for level in range(n_bits - 1, -1, -1):
        bit = (cur >> level) & 1
        zeros_prefix = np.concatenate(([0], np.cumsum(bit == 0)))
        n_zeros = int(zeros_prefix[-1])
        qbit = ((queries >> level) & 1).astype(bool)
        lo0 = zeros_prefix[lo]
        hi0 = zeros_prefix[hi]
        less += np.where(qbit, hi0 - lo0, 0)
        lo = np.where(qbit, n_zeros + (lo - lo0), lo0)
        hi = np.where(qbit, n_zeros + (hi - hi0), hi0)
        cur = np.concatenate((cur[bit == 0], cur[bit == 1]))
    return less, hi - lo


def _per_event_counts(
    r: np.ndarray, t: np.ndarray, e: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per event i: (index i, concordant_i, tied_i, comparable_i) over its comparable partners.

    The partners of an event i are ``C_i = {j : t_j > t_i} U {j : t_j = t_i, e_j = 0}``. Sorting by (time
    ascending, events before censored), ``C_i`` is the suffix starting at the first censored patient at time
    ``t_i`` (or the first later time), so the counts are suffix rank queries of ``r_i`` among dense risk ranks.
    """
    n = r.shape[0]
    order = np.lexsort((~e, t))  # primary: time ascending; secondary: events (False in ~e) first
    t_sorted = t[order]
    e_sorted = e[order]
    _, ranks = np.unique(r, return_inverse=True)  # dense ranks; exact equality = tie
    ranks = ranks.reshape(-1).astype(np.int64)
    ranks_sorted = ranks[order]
    ev_pos = np.flatnonzero(e_sorted)
    t_ev = t_sorted[ev_pos]  # ascending
    # the suffix starts right after the block of events tied at t_i (events precede censored at equal times)
    events_at_t = np.searchsorted(t_ev, t_ev, side="right") - np.searchsorted(t_ev, t_ev, side="left")
    starts = np.searchsorted(t_sorted, t_ev, side="left") + events_at_t
    less, equal = _suffix_less_equal(ranks_sorted, starts, ranks_sorted[ev_pos])
    comparable = n - starts
    return order[ev_pos], less, equal, comparable


def concordance_counts(risk: Any, time: Any, event: Any) -> ConcordanceCounts:
    """Harrell's concordance pair counts, in O(n log n), with lifelines' rules for ties.

    A pair (i, j) is comparable when patient i had the event and either ``time_i < time_j``, or
    ``time_i == time_j`` and j is censored (a censored patient at the event time was still at risk). Two events at
    the same time are not comparable; neither are two censored patients. A comparable pair is concordant when
    ``risk_i > risk_j``, discordant when ``risk_i < risk_j`` and tied when the risks are exactly equal. These are
    the rules of ``lifelines.utils.concordance_index(time, -risk, event)`` and of scikit-survival's
    ``concordance_index_censored`` (up to its 1e-8 risk-tie tolerance).

    Parameters
    ----------
    risk:
        (n,) predicted risk (log-hazard or any monotone function of it); higher = earlier event.
    time:
        (n,) non-negative time to event or censoring.
    event:
        (n,) 1 (or True) = event observed, 0 = censored.

    Returns
    -------
    ConcordanceCounts

    Raises
    ------
    ValueError
        Not 1-D, length mismatch, NaN/inf, negative time, or event values other than 0/1.
    """
    r, t, e = _survival_arrays(risk, time, event, fn="concordance_counts")
    _, less, equal, comparable = _per_event_counts(r, t, e)
    n_comp = int(comparable.sum())
    n_con = int(less.sum())
    n_tie = int(equal.sum())
    return ConcordanceCounts(n_con, n_comp - n_con - n_tie, n_tie, n_comp)


def concordance_index(risk: Any, time: Any, event: Any) -> float:
    """Harrell's C-index, ``(concordant + tied_risk / 2) / comparable`` (see :func:`concordance_counts`).

    Equals ``lifelines.utils.concordance_index(time, -risk, event)``; ``nan`` when no pair is comparable
    (e.g. no event).
    """
    return concordance_counts(risk, time, event).c_index


def _censoring_survival(train_time: np.ndarray, train_event: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Kaplan-Meier estimate of the censoring survival ``G(s) = P(C > s)`` at the points ``at``.

    ``G(s) = prod_{u_k <= s} (1 - c_k / (n_k - d_k))`` over the distinct training times ``u_k``, with ``n_k`` at
    risk (time >= u_k), ``d_k`` events and ``c_k`` censorings at ``u_k`` (events at a time precede censorings).
    """
    uniq, inv = np.unique(train_time, return_inverse=True)
    inv = inv.reshape(-1)
    d = np.bincount(inv, weights=train_event.astype(np.float64), minlength=uniq.size)
    total = np.bincount(inv, minlength=uniq.size).astype(np.float64)
    c = total - d
    at_risk = total[::-1].cumsum()[::-1]
    denom = at_risk - d
    ratio = np.divide(c, denom, out=np.zeros_like(c), where=c > 0)
    g = np.cumprod(1.0 - ratio)
    idx = np.searchsorted(uniq, at, side="right") - 1
    return np.where(idx >= 0, g[np.clip(idx, 0, None)], 1.0)


def uno_concordance_index(
    risk: Any,
    time: Any,
    event: Any,
    train_time: Any,
    train_event: Any,
    tau: float | None = None,
) -> float:
    """Uno's IPCW concordance index (Uno et al. 2011), as ``sksurv.metrics.concordance_index_ipcw``.

    With ``G`` the Kaplan-Meier censoring survival estimated on the training data and comparable sets ``C_i`` as in
    :func:`concordance_counts`::

        w_i = 1 / G(t_i)^2                 for events with t_i < tau (0 otherwise)
        C   = sum_i w_i * (#{j in C_i: r_j < r_i} + 1/2 #{j in C_i: r_j = r_i}) / sum_i w_i |C_i|

    It does not depend on the test censoring distribution (Harrell's C does). O(n log n).

    Parameters
    ----------
    risk, time, event:
        Test predictions and outcomes, (n,) each (see :func:`concordance_counts`).
    train_time, train_event:
        Training outcomes used only to estimate the censoring distribution.
    tau:
        Truncation time; events at or after ``tau`` get weight 0. ``None``: no truncation.

    Returns
    -------
    float
        Uno's C, ``nan`` when no weighted comparable pair exists.

    Raises
    ------
    ValueError
        Bad inputs as in :func:`concordance_counts` (also for ``train_time``/``train_event``); a non-positive or
        non-finite ``tau``; a test event time (below ``tau``) beyond the largest training time while the censoring
        survival there is still positive (G unknown: pass ``tau``); or ``G = 0`` at a test event time.
    """
    fn = "uno_concordance_index"
    r, t, e = _survival_arrays(risk, time, event, fn=fn)
    _, tt, te = _survival_arrays(
        np.zeros(len(_to_numpy(train_time))), train_time, train_event, fn=fn,
        names=("train_time", "train_time", "train_event"),
    )
    if tt.size == 0:
        raise ValueError(f"{fn}: train_time is empty")
    if tau is not None and (not np.isfinite(tau) or tau <= 0):
        raise ValueError(f"{fn}: tau must be a positive finite number, got {tau!r}")
    within = np.ones_like(e) if tau is None else t < tau
    weighted = e & within
    g_last = float(_censoring_survival(tt, te, np.array([tt.max()]))[0])
    if np.any(t[weighted] > tt.max()) and g_last > 0:
        raise ValueError(
            f"{fn}: time has event times beyond the largest train_time ({tt.max():g}); the censoring "
            "distribution is unknown there: pass tau"
        )
    g = _censoring_survival(tt, te, t[weighted])
    g = np.where(t[weighted] > tt.max(), 0.0, g)
    if np.any(g <= 0):
        raise ValueError(f"{fn}: censoring survival is zero at one or more event times in time (lower tau)")
    w = np.zeros(t.shape[0])
    w[weighted] = 1.0 / g**2
    idx, less, equal, comparable = _per_event_counts(r, t, e)
    wi = w[idx]
    den = float(np.sum(wi * comparable))
    if den == 0:
        return float("nan")
    return float(np.sum(wi * (less + 0.5 * equal)) / den)


# ----------------------------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------------------------
def _binary(a: Any, *, name: str, fn: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Convert a 0/1 (or boolean) array to bool, checking its shape against ``shape`` when given."""
    arr = _to_numpy(a)
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{fn}: {name} shape {arr.shape} does not match {shape}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{fn}: {name} must be boolean or numeric, got dtype {arr.dtype}")
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{fn}: {name} must be binary (0/1 or bool); threshold probabilities first")
    return arr.astype(bool)


def _binary_masks(pred_mask: Any, true_mask: Any, *, fn: str) -> tuple[np.ndarray, np.ndarray]:
    a = _binary(pred_mask, name="pred_mask", fn=fn)
    b = _binary(true_mask, name="true_mask", fn=fn, shape=a.shape)
    return a, b


def dice_counts(pred_mask: Any, true_mask: Any) -> tuple[int, int]:
    """Dice sufficient statistics ``(|A n B|, |A| + |B|)`` of binary masks A (prediction) and B (truth).

    Summing both over patients and sites and calling :func:`dice_from_counts` gives the pooled (global) Dice
    ``2 sum|A n B| / sum(|A| + |B|)``; nothing per patient needs to leave a site.

    Raises
    ------
    ValueError
        Shape mismatch, or a mask that is not binary.
    """
    a, b = _binary_masks(pred_mask, true_mask, fn="dice_counts")
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a)) + int(np.count_nonzero(b))


def dice_from_counts(intersection: int | float, denominator: int | float) -> float:
    """Dice ``2 I / D`` from (summed) :func:`dice_counts`; 1.0 when ``D = 0`` (both masks empty: perfect)."""
    if intersection < 0 or denominator < 0 or 2 * intersection > denominator:
        raise ValueError(
            f"dice_from_counts: need 0 <= 2*intersection <= denominator, got intersection={intersection}, "
            f"denominator={denominator}"
        )
    if denominator == 0:
        return 1.0
    return float(2.0 * intersection / denominator)


def dice_score(pred_mask: Any, true_mask: Any) -> float:
    """Dice coefficient ``2 |A n B| / (|A| + |B|)`` of two binary masks of the same shape.

    Empty-empty (both masks empty) is defined as 1.0: the prediction is exactly right. This matches
    ``monai.metrics.DiceMetric(ignore_empty=False)``; with MONAI's default ``ignore_empty=True`` an empty truth gives
    ``nan`` instead. An empty truth with a non-empty prediction gives 0.
    """
    a, b = _binary_masks(pred_mask, true_mask, fn="dice_score")
    inter = int(np.count_nonzero(a & b))
    return dice_from_counts(inter, int(np.count_nonzero(a)) + int(np.count_nonzero(b)))


def iso_volume_coverage(prob_map: Any, true_mask: Any, brain_mask: Any | None = None) -> float:
    """Coverage of the true recurrence by the predicted region of the same volume (PREDICT-GBM measure).

    With ``B`` the brain mask (all voxels when ``None``), ``T = true_mask n B`` and ``k = |T|``, the predicted
    region ``P_k`` holds the k voxels of ``B`` with the highest ``prob_map`` (ties broken deterministically: the
    lower C-order flat index first). Returns ``|P_k n T| / k``. True voxels outside the brain mask are ignored.

    Parameters
    ----------
    prob_map:
        Predicted recurrence probability (or any score; only the order matters), finite.
    true_mask:
        Binary true recurrence mask, same shape.
    brain_mask:
        Optional binary mask, same shape, restricting both the candidates and the truth.

    Returns
    -------
    float
        In [0, 1]; ``nan`` when ``k = 0`` (no true recurrence: coverage undefined).

    Raises
    ------
    ValueError
        Shape mismatch, non-finite ``prob_map``, or non-binary masks.
    """
    fn = "iso_volume_coverage"
    p = _to_numpy(prob_map)
    if p.dtype.kind not in "biuf":
        raise ValueError(f"{fn}: prob_map must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{fn}: prob_map contains NaN or inf")
    truth = _binary(true_mask, name="true_mask", fn=fn, shape=p.shape)
    if brain_mask is None:
        brain = np.ones(p.shape, dtype=bool)
    else:
        brain = _binary(brain_mask, name="brain_mask", fn=fn, shape=p.shape)
    truth = (truth & brain).ravel()
    k = int(np.count_nonzero(truth))
    if k == 0:
        return float("nan")
    cand = np.flatnonzero(brain.ravel())
    scores = p.ravel()[cand]
    top = cand[np.argsort(-scores, kind="stable")[:k]]
    return float(np.count_nonzero(truth[top]) / k)
