"""Baselines without deep learning and the statistics of the comparison study (``benchmarks/study``).

Everything here works on one preprocessed patient (:class:`strpnet_core.cache.CachedPatient`: images z-scored inside
the brain mask, every scan co-registered to the pre-op T1c on the model grid) or on per-patient predictions of a
test set. Nothing here is used by training or by the federation.

Segmentation (:func:`segment_patient`), with ``z_m(t)`` the z-scored modality ``m`` at scan ``t`` (0 = pre-op,
``L`` = last scan) and ``B`` the brain mask; thresholds in :class:`SegmentationThresholds`::

    fluid(t)      = B & z_t2w(t) > 1.0 & z_t2f(t) < -1.0 & z_t1n(t) < -1.0     (CSF-like: bright T2, dark FLAIR/T1)
    cavity        = largest connected component of  fluid(L) & ~dilate(fluid(0), 1 voxel)
                    (fluid that is new after surgery: the ventricles and sulci are fluid already at the pre-op scan)
    flair(t)      = B & z_t2f(t) > 1.5 & ~K(t)                                   (FLAIR hyperintensity)
    enhancing(t)  = B & z_t1c(t) > 1.5 & z_t2f(t) > 0.5 & ~K(t)                  (T1c bright inside the FLAIR signal)
    flair_any     = OR_t flair(t) & ~cavity
    K(0) = empty (before surgery the cavity's place is tumour), K(t >= 1) = cavity

Cavity-margin recurrence map (:func:`cavity_margin_map`), with ``d(x)`` the Euclidean distance (mm) from voxel x to
the cavity and ``m`` the margin::

    binary(x) = flair_any(x) & 0 < d(x) <= m
    score(x)  = [x not in cavity] * (1[flair_any(x)] + exp(-d(x) / m))        in [0, 2]

so the score ranks the FLAIR-hyperintense voxels first, each group by nearness to the cavity (iso-volume coverage
needs a full ranking). ``m`` is chosen on training patients only (:func:`fit_cavity_margin`).

Cox model on simple volumes (:func:`volume_features`, :class:`CoxVolumeModel`): features ``log1p`` of the pre-op
enhancing and oedema (FLAIR minus enhancing) volumes (ml), ``log1p`` of the cavity volume (ml) and the growth of the
abnormal volume ``A(t) = |flair(t) | enhancing(t)|`` between the post-op and the last scan in ml per 30 days
(0 with fewer than three scans); lifelines' ``CoxPHFitter`` with a small ridge penalty; the risk is the linear
predictor ``x^T beta`` (higher = earlier recurrence).

Statistics: Harrell's C from lifelines (:func:`harrell_c`), Uno's C from scikit-survival (:func:`uno_c`, censoring
distribution from the training patients, truncated at ``tau``), pooled Dice and iso-volume coverage, and a
percentile bootstrap over test patients (:func:`bootstrap_indices`, :func:`percentile_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "SegmentationThresholds",
    "Segmentation",
    "segment_patient",
    "cavity_margin_map",
    "fit_cavity_margin",
    "VOLUME_FEATURES",
    "volume_features",
    "CoxVolumeModel",
    "fit_cox_volumes",
    "harrell_c",
    "uno_horizon",
    "uno_c",
    "pooled_dice",
    "mean_coverage",
    "bootstrap_indices",
    "percentile_ci",
]


# ----------------------------------------------------------------------------------------------------------------------
# segmentation from z-scored, co-registered images
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentationThresholds:
    """Thresholds on z-scored intensities (z = (I - mean_brain) / sd_brain per image), fixed a priori.

    Attributes
    ----------
    fluid_t2w, fluid_t2f, fluid_t1n:
        Fluid (CSF, cavity): ``z_t2w > fluid_t2w``, ``z_t2f < fluid_t2f``, ``z_t1n < fluid_t1n``.
    flair:
        FLAIR hyperintensity: ``z_t2f > flair``.
    enh_t1c, enh_t2f:
        Enhancement: ``z_t1c > enh_t1c`` and ``z_t2f > enh_t2f``.
    """

    fluid_t2w: float = 1.0
    fluid_t2f: float = -1.0
    fluid_t1n: float = -1.0
    flair: float = 1.5
    enh_t1c: float = 1.5
    enh_t2f: float = 0.5

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


#: Channel order of the cache images (``strpnet_core.contract.MODALITIES``).
_T1N, _T1C, _T2W, _T2F = 0, 1, 2, 3


@dataclass(frozen=True)
class Segmentation:
    """Masks of one patient on the model grid (bool, (D, H, W)) and per-scan volumes.

    Attributes
    ----------
    cavity:
        Resection cavity at the last scan (empty when none is found).
    flair_any:
        FLAIR hyperintensity at any scan, outside the cavity.
    enhancing_pre:
        Enhancing tumour at the pre-op scan.
    flair_pre:
        FLAIR hyperintensity at the pre-op scan.
    abnormal_ml:
        ``|flair(t) | enhancing(t)|`` in ml for every scan t.
    days:
        Scan days (days since the pre-op scan).
    voxel_ml:
        Volume of one voxel in ml.
    """

    cavity: np.ndarray
    flair_any: np.ndarray
    enhancing_pre: np.ndarray
    flair_pre: np.ndarray
    abnormal_ml: tuple[float, ...]
    days: tuple[float, ...]
    voxel_ml: float


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def segment_patient(
    images: np.ndarray,
    brain_mask: np.ndarray,
    days: Sequence[float],
    spacing_mm: float,
    thresholds: SegmentationThresholds | None = None,
) -> Segmentation:
    """Segment cavity, FLAIR hyperintensity and enhancement of one preprocessed patient (formulas: module docstring).

    Parameters
    ----------
    images:
        (T, 4, D, H, W) z-scored images (cache order t1n, t1c, t2w, t2f), co-registered to the pre-op scan.
    brain_mask:
        (D, H, W) brain mask.
    days:
        (T,) scan days.
    spacing_mm:
        Isotropic voxel size of the grid.
    thresholds:
        Intensity thresholds (default :class:`SegmentationThresholds`).

    Raises
    ------
    ValueError
        Wrong shapes, or ``spacing_mm <= 0``.
    """
    from scipy import ndimage as ndi

    th = thresholds or SegmentationThresholds()
    im = np.asarray(images)
    brain = np.asarray(brain_mask) > 0
    if im.ndim != 5 or im.shape[1] != 4 or im.shape[2:] != brain.shape:
        raise ValueError(f"segment_patient: images must be (T, 4, *{brain.shape}), got {im.shape}")
    if len(days) != im.shape[0]:
        raise ValueError(f"segment_patient: {im.shape[0]} scans but {len(days)} days")
    if not spacing_mm > 0:
        raise ValueError(f"segment_patient: spacing_mm must be > 0, got {spacing_mm}")
    im = im.astype(np.float32, copy=False)
    last = im.shape[0] - 1

    def fluid(t: int) -> np.ndarray:
        return brain & (im[t, _T2W] > th.fluid_t2w) & (im[t, _T2F] < th.fluid_t2f) & (im[t, _T1N] < th.fluid_t1n)

    if last > 0:
        new_fluid = fluid(last) & ~ndi.binary_dilation(fluid(0), iterations=1)
        cavity = _largest_component(new_fluid) if new_fluid.any() else np.zeros_like(brain)
    else:
        cavity = np.zeros_like(brain)
    keep = [np.ones_like(brain) if t == 0 else ~cavity for t in range(last + 1)]
    flair_t = [brain & (im[t, _T2F] > th.flair) & keep[t] for t in range(last + 1)]
    enh_t = [brain & (im[t, _T1C] > th.enh_t1c) & (im[t, _T2F] > th.enh_t2f) & keep[t] for t in range(last + 1)]
    voxel_ml = float(spacing_mm) ** 3 / 1000.0
    abnormal = tuple(float(np.count_nonzero(f | e)) * voxel_ml for f, e in zip(flair_t, enh_t, strict=True))
    return Segmentation(
        cavity=cavity.astype(bool),
        flair_any=np.logical_or.reduce(flair_t) & ~cavity,
        enhancing_pre=enh_t[0],
        flair_pre=flair_t[0],
        abnormal_ml=abnormal,
        days=tuple(float(d) for d in days),
        voxel_ml=voxel_ml,
    )


# ----------------------------------------------------------------------------------------------------------------------
# baseline 1: recurrence map from the cavity margin within the FLAIR hyperintensity
# ----------------------------------------------------------------------------------------------------------------------
def _cavity_distance(seg: Segmentation, spacing_mm: float) -> np.ndarray:
    from scipy import ndimage as ndi

    if not seg.cavity.any():
        return np.full(seg.cavity.shape, np.inf, dtype=np.float32)
    return ndi.distance_transform_edt(~seg.cavity, sampling=float(spacing_mm)).astype(np.float32)


def cavity_margin_map(
    seg: Segmentation, spacing_mm: float, margin_mm: float, *, distance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The cavity-margin recurrence map: ``(score, binary)`` (formulas: module docstring).

    Without a cavity (none segmented) the score is ``1[flair_any]`` and the binary map is empty.

    Parameters
    ----------
    seg:
        The patient's :class:`Segmentation`.
    spacing_mm:
        Voxel size (distances in mm).
    margin_mm:
        Margin ``m`` around the cavity (> 0).
    distance:
        Precomputed distance map to the cavity (mm), e.g. to try several margins.

    Returns
    -------
    (score, binary):
        float32 score in [0, 2] (only the order matters) and the bool map.
    """
    if not margin_mm > 0:
        raise ValueError(f"cavity_margin_map: margin_mm must be > 0, got {margin_mm}")
    d = _cavity_distance(seg, spacing_mm) if distance is None else distance
    near = np.exp(-d / float(margin_mm)).astype(np.float32)  # 0 where d = inf
    score = (seg.flair_any.astype(np.float32) + near) * (~seg.cavity)
    binary = seg.flair_any & (d > 0) & (d <= margin_mm)
    return score.astype(np.float32), binary


def fit_cavity_margin(
    segmentations: Sequence[Segmentation],
    recurrences: Sequence[np.ndarray],
    brain_masks: Sequence[np.ndarray],
    spacing_mm: float,
    margins_mm: Sequence[float] = (4.0, 6.0, 8.0, 12.0, 16.0),
) -> tuple[float, dict[float, float]]:
    """Choose the margin ``m`` maximising the pooled Dice ``2 sum|B n R| / sum(|B| + |R|)`` over training patients.

    Parameters
    ----------
    segmentations, recurrences, brain_masks:
        Training patients with a known recurrence mask (same order).
    spacing_mm:
        Voxel size.
    margins_mm:
        Candidate margins; the smallest wins a tie.

    Returns
    -------
    (margin, dice_by_margin)
        The chosen margin and the pooled training Dice of every candidate (``nan`` without any patient).
    """
    if not (len(segmentations) == len(recurrences) == len(brain_masks)):
        raise ValueError("fit_cavity_margin: segmentations, recurrences and brain_masks differ in length")
    if not margins_mm:
        raise ValueError("fit_cavity_margin: no candidate margin")
    inter = {m: 0 for m in margins_mm}
    denom = {m: 0 for m in margins_mm}
    for seg, rec, brain in zip(segmentations, recurrences, brain_masks, strict=True):
        d = _cavity_distance(seg, spacing_mm)
        r = (np.asarray(rec) > 0) & (np.asarray(brain) > 0)
        for m in margins_mm:
            _, b = cavity_margin_map(seg, spacing_mm, m, distance=d)
            inter[m] += int(np.count_nonzero(b & r))
            denom[m] += int(np.count_nonzero(b)) + int(np.count_nonzero(r))
    dice = {float(m): pooled_dice([inter[m]], [denom[m]]) if segmentations else float("nan") for m in margins_mm}
    best = max(sorted(dice), key=lambda m: (-math.inf if math.isnan(dice[m]) else dice[m], -m))
    return float(best), dice


# ----------------------------------------------------------------------------------------------------------------------
# baseline 2: Cox model on simple volumes
# ----------------------------------------------------------------------------------------------------------------------
#: Feature names of :func:`volume_features`, in the order the Cox model uses them.
VOLUME_FEATURES: tuple[str, ...] = ("log_enhancing_ml", "log_oedema_ml", "log_cavity_ml", "growth_ml_per_30d")


def volume_features(seg: Segmentation) -> dict[str, float]:
    """The Cox baseline's features of one patient (definitions: module docstring).

    ``growth_ml_per_30d = 30 (A(L) - A(1)) / max(day_L - day_1, 1)`` for ``T >= 3`` scans, else 0.
    """
    v = seg.voxel_ml
    enh = float(np.count_nonzero(seg.enhancing_pre)) * v
    oedema = float(np.count_nonzero(seg.flair_pre & ~seg.enhancing_pre)) * v
    cavity = float(np.count_nonzero(seg.cavity)) * v
    if len(seg.abnormal_ml) >= 3:
        dt = max(seg.days[-1] - seg.days[1], 1.0)
        growth = 30.0 * (seg.abnormal_ml[-1] - seg.abnormal_ml[1]) / dt
    else:
        growth = 0.0
    return {
        "log_enhancing_ml": math.log1p(enh),
        "log_oedema_ml": math.log1p(oedema),
        "log_cavity_ml": math.log1p(cavity),
        "growth_ml_per_30d": float(growth),
    }


@dataclass(frozen=True)
class CoxVolumeModel:
    """A fitted Cox model on :data:`VOLUME_FEATURES`: ``risk(x) = sum_k beta_k (x_k - mean_k)``.

    ``mean`` is the training mean lifelines centres on, so the risk equals
    ``CoxPHFitter.predict_log_partial_hazard``.
    """

    features: tuple[str, ...]
    beta: tuple[float, ...]
    mean: tuple[float, ...]
    penalizer: float
    n_train: int
    n_events: int

    def predict_risk(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Log partial hazards of feature rows (higher = earlier recurrence)."""
        x = np.array([[float(r[f]) for f in self.features] for r in rows], dtype=np.float64).reshape(-1, len(self.features))
        return (x - np.asarray(self.mean)) @ np.asarray(self.beta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_cox_volumes(
    rows: Sequence[Mapping[str, float]],
    time: Sequence[float],
    event: Sequence[int],
    *,
    penalizer: float = 0.1,
    features: Sequence[str] = VOLUME_FEATURES,
) -> CoxVolumeModel:
    """Fit lifelines' ``CoxPHFitter(penalizer, l1_ratio=0)`` (ridge: ``penalizer / 2 * ||beta||^2`` added to the
    mean negative log partial likelihood, Efron ties) on feature rows of training patients.

    A feature that is constant over the training patients is dropped (beta = 0): it carries no information and
    makes the fit singular.

    Raises
    ------
    ValueError
        Fewer than 2 patients, no event, or mismatched lengths.
    """
    import pandas as pd
    from lifelines import CoxPHFitter

    n = len(rows)
    if not (n == len(time) == len(event)):
        raise ValueError(f"fit_cox_volumes: {n} rows, {len(time)} times, {len(event)} events")
    ev = np.asarray(event, dtype=int)
    if n < 2 or ev.sum() == 0:
        raise ValueError(f"fit_cox_volumes: need >= 2 patients and >= 1 event, got {n} and {int(ev.sum())}")
    feats = tuple(features)
    df = pd.DataFrame([{f: float(r[f]) for f in feats} for r in rows])
    used = [f for f in feats if float(df[f].std(ddof=0)) > 0]
    beta = dict.fromkeys(feats, 0.0)
    mean = {f: float(df[f].mean()) for f in feats}
    if used:
        fit_df = df[used].copy()
        fit_df["time"] = np.asarray(time, dtype=float)
        fit_df["event"] = ev
        cph = CoxPHFitter(penalizer=float(penalizer))
        cph.fit(fit_df, duration_col="time", event_col="event")
        for f in used:
            beta[f] = float(cph.params_[f])
            mean[f] = float(cph._norm_mean[f])
    return CoxVolumeModel(features=feats, beta=tuple(beta[f] for f in feats), mean=tuple(mean[f] for f in feats),
                          penalizer=float(penalizer), n_train=n, n_events=int(ev.sum()))


# ----------------------------------------------------------------------------------------------------------------------
# concordance, Dice, coverage, bootstrap
# ----------------------------------------------------------------------------------------------------------------------
def harrell_c(risk: Sequence[float], time: Sequence[float], event: Sequence[int]) -> float:
    """Harrell's C = ``(concordant + tied_risk / 2) / comparable`` over pairs (i, j) with ``event_i = 1`` and
    ``time_i < time_j``, or ``time_i = time_j`` with j censored (lifelines' ``concordance_index(time, -risk,
    event)``; :func:`strpnet_core.metrics.concordance_counts`); ``nan`` with no comparable pair."""
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(np.asarray(time, float), -np.asarray(risk, float), np.asarray(event, int)))
    except ZeroDivisionError:
        return float("nan")


def uno_horizon(train_time: Sequence[float], horizon_days: float) -> float:
    """``tau = min(horizon_days, max(train_time))``: Uno's truncation time, inside the support of the training
    censoring distribution (scikit-survival cannot weight test events beyond it)."""
    t = np.asarray(train_time, dtype=float)
    if t.size == 0 or not horizon_days > 0:
        raise ValueError("uno_horizon: need training times and a positive horizon")
    return float(min(float(horizon_days), float(t.max())))


def uno_c(
    risk: Sequence[float],
    time: Sequence[float],
    event: Sequence[int],
    train_time: Sequence[float],
    train_event: Sequence[int],
    tau: float,
) -> float:
    """Uno's IPCW C (``sksurv.metrics.concordance_index_ipcw``)::

        C = sum_{i,j} w_i 1[t_i < t_j, t_i < tau, e_i = 1] (1[r_i > r_j] + 1[r_i = r_j] / 2)
            / sum_{i,j} w_i 1[t_i < t_j, t_i < tau, e_i = 1],        w_i = G(t_i)^-2

    with ``G`` the Kaplan-Meier survival of the censoring time fitted on the training patients. ``nan`` when no
    weighted comparable pair exists or scikit-survival refuses the data (e.g. ``G = 0`` at a test event time).
    """
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    tr = Surv.from_arrays(event=np.asarray(train_event, bool), time=np.asarray(train_time, float))
    te = Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, float))
    try:
        return float(concordance_index_ipcw(tr, te, np.asarray(risk, float), tau=float(tau))[0])
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return float("nan")


def pooled_dice(intersections: Sequence[float], denominators: Sequence[float]) -> float:
    """Pooled Dice ``2 sum_i |P_i n T_i| / sum_i (|P_i| + |T_i|)`` over patients (as the federated Dice);
    ``nan`` without patients, 1.0 when every mask is empty."""
    i = float(np.sum(intersections)) if len(intersections) else 0.0
    d = float(np.sum(denominators)) if len(denominators) else 0.0
    if len(denominators) == 0:
        return float("nan")
    return 1.0 if d == 0 else 2.0 * i / d


def mean_coverage(coverages: Sequence[float]) -> float:
    """Mean iso-volume coverage over the patients where it is defined (``nan`` ignored; ``nan`` when none is)."""
    c = np.asarray(coverages, dtype=float)
    c = c[np.isfinite(c)]
    return float(c.mean()) if c.size else float("nan")


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement (``numpy.random.default_rng(seed)``): resamples of n patients,
    shared by every method so that differences between methods are paired."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_indices: need n >= 1 and n_boot >= 1, got {n}, {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval ``(q_{(1-level)/2}, q_{(1+level)/2})`` of bootstrap values, ignoring ``nan``
    (resamples where the metric is undefined); ``(nan, nan)`` when none is finite."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)
