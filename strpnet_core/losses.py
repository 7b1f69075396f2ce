"""Training losses (torch): soft Dice, weighted BCE, Cox partial likelihood, a per-site risk-set memory, and the
multi-task loss of ST-RPNet.

Higher risk means earlier recurrence: the risk score is the log-hazard ``eta`` of a Cox model,
``h(t | x) = h0(t) exp(eta(x))``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

__all__ = [
    "dice_loss",
    "weighted_bce",
    "cox_partial_likelihood_loss",
    "RiskSetMemory",
    "LossOutput",
    "MultiTaskLoss",
]

Ties = Literal["efron", "breslow"]
_TIES = ("efron", "breslow")


# ----------------------------------------------------------------------------------------------------------------
# segmentation losses
# ----------------------------------------------------------------------------------------------------------------
def _check_seg_pair(logits: Tensor, target: Tensor, fn: str) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise ValueError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if logits.shape != target.shape:
        raise ValueError(f"{fn}: logits shape {tuple(logits.shape)} != target shape {tuple(target.shape)}")


def dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    sigmoid: bool = True,
) -> Tensor:
    """Soft Dice loss per sample and channel over the spatial dims, averaged over batch and channels.

    With ``p = sigmoid(logits)`` (or ``p = logits`` when ``sigmoid=False``) and target ``g``, for each sample b and
    channel c (sums over the spatial voxels v)::

        L_bc = 1 - (2 sum_v p g + smooth_nr) / (sum_v p + sum_v g + smooth_dr)
        loss = mean_{b,c} L_bc

    Delegates to ``monai.losses.DiceLoss(sigmoid=sigmoid, smooth_nr, smooth_dr)`` (include_background, no squaring,
    reduction "mean"), so the value is MONAI's.

    Parameters
    ----------
    logits:
        (B, C, *spatial) float tensor (at least one spatial dim).
    target:
        Same shape, values in [0, 1].

    Returns
    -------
    torch.Tensor
        Scalar in [0, 1].

    Raises
    ------
    ValueError
        Shape mismatch, fewer than 3 dims, or negative smoothing terms.
    """
    _check_seg_pair(logits, target, "dice_loss")
    if logits.ndim < 3:
        raise ValueError(f"dice_loss: logits must be (B, C, *spatial) with >= 3 dims, got {tuple(logits.shape)}")
    if smooth_nr < 0 or smooth_dr < 0:
        raise ValueError(f"dice_loss: smooth_nr and smooth_dr must be >= 0, got {smooth_nr}, {smooth_dr}")
    loss = DiceLoss(sigmoid=sigmoid, smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction="mean")
    return loss(logits, target.to(logits.dtype))


def weighted_bce(logits: Tensor, target: Tensor, *, pos_weight: float | Tensor) -> Tensor:
    """Binary cross-entropy on logits with a positive-class weight, mean over all elements.

    For logit ``x``, target ``y`` and weight ``w`` (element-wise, then averaged)::

        l = -[w y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
          = (1 - y) x + (1 + (w - 1) y) softplus(-x)

    evaluated with ``torch.nn.functional.binary_cross_entropy_with_logits`` (log-sum-exp form: finite for any
    finite logit, e.g. +-1e4). ``w > 1`` counters the rarity of recurrence voxels (w ~ #negatives / #positives).

    Parameters
    ----------
    logits:
        Float tensor, any shape.
    target:
        Same shape, values in [0, 1].
    pos_weight:
        Positive finite scalar (float or 0-d/1-element tensor), or a tensor broadcastable over the last dim as in
        torch.

    Raises
    ------
    ValueError
        Shape mismatch, or a non-positive / non-finite ``pos_weight``.
    """
    _check_seg_pair(logits, target, "weighted_bce")
    pw = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    if not bool(torch.isfinite(pw).all()) or bool((pw <= 0).any()):
        raise ValueError(f"weighted_bce: pos_weight must be positive and finite, got {pos_weight!r}")
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=pw, reduction="mean")


# ----------------------------------------------------------------------------------------------------------------
# Cox partial likelihood
# ----------------------------------------------------------------------------------------------------------------
def _as_1d(x: Any, name: str, fn: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    if t.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        t = t.to(like.dtype)
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{fn}: {name} must be numeric or boolean, got {t.dtype}")
    if dtype is None:
        dtype = like.dtype if like.is_floating_point() else torch.float32
    return t.to(device=like.device, dtype=dtype)


def _validate_cox(
    risk_scores: Any, times: Any, events: Any, ties: str, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(risk_scores, Tensor):
        raise ValueError(f"{fn}: risk_scores must be a torch.Tensor, got {type(risk_scores).__name__}")
    if risk_scores.ndim != 1:
        raise ValueError(f"{fn}: risk_scores must be 1-D (B,), got shape {tuple(risk_scores.shape)}")
    if not risk_scores.is_floating_point():
        raise ValueError(f"{fn}: risk_scores must be floating point, got {risk_scores.dtype}")
    if ties not in _TIES:
        raise ValueError(f"{fn}: ties must be one of {_TIES}, got {ties!r}")
    t = _as_1d(times, "times", fn, risk_scores, torch.float64)  # only compared: days stay exact under bf16/fp16
    e = _as_1d(events, "events", fn, risk_scores)
    n = risk_scores.shape[0]
    if t.shape[0] != n or e.shape[0] != n:
        raise ValueError(f"{fn}: length mismatch: risk_scores {n}, times {t.shape[0]}, events {e.shape[0]}")
    if not bool(torch.isfinite(risk_scores.detach()).all()):
        raise ValueError(f"{fn}: risk_scores contains NaN or inf")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: times contains NaN or inf")
    if bool((t < 0).any()):
        raise ValueError(f"{fn}: times contains negative values")
    if not bool(((e == 0) | (e == 1)).all()):
        raise ValueError(f"{fn}: events must contain only 0 and 1 (or booleans)")
    return risk_scores, t, e


def _cox_nll_terms(eta: Tensor, times: Tensor, events: Tensor, counted: Tensor, ties: str) -> tuple[Tensor, Tensor]:
    """Sum over counted events of the negative log partial likelihood terms, and the number of counted events.

    Risk sets and tie groups are formed over all n patients; only the events flagged in ``counted`` contribute a
    term (used by :class:`RiskSetMemory`, where remembered patients only populate the risk sets). For an event i in
    the tie group ``D_k`` (d_k events at the distinct time ``t_k``, risk set ``R_k = {j : t_j >= t_k}``,
    ``S_k = sum_{R_k} exp(eta)``, ``E_k = sum_{D_k} exp(eta)``)::

        breslow: term_i = eta_i - log S_k
        efron:   term_i = eta_i - (1/d_k) sum_{l=0}^{d_k-1} log(S_k - (l/d_k) E_k)

    The Efron denominator is spread evenly over the tied events, so that summing over all events of a group gives
    exactly Efron's ``sum_i eta_i - sum_l log(S_k - (l/d_k) E_k)``. All in one pass, no loop over patients:
    sort by time descending, ``log S`` by a cumulative logsumexp read at the end of each tie group, group sums by
    ``index_add`` with a per-group max shift (detached: the shift cancels), ``log(S - a E) = log S + log1p(-a E/S)``.
    """
    order = torch.argsort(times, descending=True, stable=True)
    eta_s, t_s, e_s, c_s = eta[order], times[order], events[order], counted[order]
    _, group, counts = torch.unique_consecutive(t_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0) - 1
    log_s = torch.logcumsumexp(eta_s, 0)[ends]  # (G,) log S_k
    is_event = e_s > 0
    use = is_event & c_s
    n_counted = use.sum()
    denom = log_s[group]
    if ties == "efron":
        n_groups = counts.shape[0]
        d = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add_(0, group, e_s)
        neg_inf = torch.full_like(eta_s, float("-inf"))
        eta_ev = torch.where(is_event, eta_s, neg_inf)
        gmax = torch.full((n_groups,), float("-inf"), dtype=eta.dtype, device=eta.device)
        gmax = gmax.scatter_reduce(0, group, eta_ev.detach(), reduce="amax", include_self=True)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        scaled = torch.exp(torch.where(is_event, eta_s - gmax[group], neg_inf))
        e_sum = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(0, group, scaled)
        has_ev = d > 0
        log_e = torch.log(torch.where(has_ev, e_sum, torch.ones_like(e_sum))) + gmax
        ratio = torch.where(has_ev, torch.exp(log_e - log_s), torch.zeros_like(log_s))  # E_k / S_k <= 1
        # rank l of each event inside its tie group: 0 .. d_k - 1
        cum_e = torch.cumsum(e_s, 0)
        starts = ends - counts + 1
        before_group = (cum_e - e_s)[starts]
        rank = (cum_e - 1 - before_group[group]).clamp_min(0)
        frac = torch.where(is_event, rank / d[group].clamp_min(1), torch.zeros_like(rank))
        corr = torch.log1p(-frac * ratio[group])  # log(S - (l/d) E) - log S, per event (0 for non-events)
        corr = torch.where(is_event, corr, torch.zeros_like(corr))
        group_corr = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(0, group, corr)
        denom = denom + (group_corr / d.clamp_min(1))[group]
    terms = torch.where(use, denom - eta_s, torch.zeros_like(eta_s))
    return terms.sum(), n_counted


def cox_partial_likelihood_loss(
    risk_scores: Tensor,
    times: Any,
    events: Any,
    ties: Ties = "efron",
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Negative log Cox partial likelihood of risk scores (log-hazards), Efron or Breslow ties.

    With distinct event times ``t_k``, tie groups ``D_k`` (``d_k`` events at ``t_k``), risk sets
    ``R_k = {j : t_j >= t_k}`` and ``eta`` the risk scores::

        breslow: -log L = sum_k [ d_k log sum_{j in R_k} exp(eta_j) - sum_{i in D_k} eta_i ]
        efron:   -log L = sum_k [ sum_{l=0}^{d_k-1} log( sum_{R_k} exp(eta_j) - (l/d_k) sum_{D_k} exp(eta_i) )
                                  - sum_{i in D_k} eta_i ]

    (identical without tied event times). ``reduction="mean"`` divides by the number of events, ``"sum"`` does not.
    Vectorised (sort, cumulative logsumexp, group sums): O(n log n), stable for large ``|eta|``. With no event the
    loss is 0 and its gradient zero (never NaN). Censored patients only enter the risk sets.

    Parameters
    ----------
    risk_scores:
        (n,) float tensor, higher = earlier event (the model's ``risk``).
    times:
        (n,) non-negative times to event or censoring (tensor or array-like).
    events:
        (n,) 1/True = event observed, 0/False = censored.
    ties:
        "efron" (default, as lifelines' CoxPHFitter) or "breslow" (as scikit-survival's default).
    reduction:
        "mean" (over events) or "sum".

    Returns
    -------
    torch.Tensor
        Scalar of ``risk_scores``' dtype, differentiable w.r.t. ``risk_scores``.

    Raises
    ------
    ValueError
        ``risk_scores`` not a 1-D float tensor, length mismatch, NaN/inf, negative ``times``, ``events`` not 0/1,
        unknown ``ties`` or ``reduction``.
    """
    fn = "cox_partial_likelihood_loss"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'mean' or 'sum', got {reduction!r}")
    eta, t, e = _validate_cox(risk_scores, times, events, ties, fn)
    if eta.shape[0] == 0:
        return eta.sum()
    counted = torch.ones_like(e, dtype=torch.bool)
    total, n_events = _cox_nll_terms(eta, t, e, counted, ties)
    if reduction == "sum":
        return total
    return total / n_events.clamp_min(1).to(total.dtype)


# ----------------------------------------------------------------------------------------------------------------
# risk-set memory
# ----------------------------------------------------------------------------------------------------------------
class RiskSetMemory:
    """FIFO memory of recent detached (risk, time, event) of one site, to give a small batch real risk sets.

    With 3D volumes a batch holds 1-2 patients, and a Cox loss over the batch alone is nearly meaningless (a single
    patient's partial likelihood is constant). :meth:`loss` evaluates the partial likelihood over the union of the
    batch (with gradient) and the memory (constants, no gradient):

        loss = (1 / |K|) sum_{k in K} [ log-denominator over R(t_k) n (batch U memory) - eta_k ],
        K = the batch's events  U  the remembered events whose risk set holds a batch patient (t_k <= max batch time)

    Why remembered events count: for a batch patient i the gradient of the full partial likelihood is
    ``-delta_i + sum_k delta_k p_ik`` over the events k whose risk set holds i (``p_ik`` = i's softmax share of
    R(t_k)). The first part comes from the batch's own events; the second, which pushes censored and late patients
    DOWN, comes from the other patients' events. Counting only the batch's events drops it: with batches of one
    patient every event pushes its own risk up, a censored patient never moves, and the ranking does not train.
    Events whose risk set holds no batch patient add only constants and are left out, so the gradient with respect
    to the batch is exactly that of the full partial likelihood over ``batch U memory``.
    Remembered patients tied in time with an event share the Efron correction.

    Bias: remembered risks were computed by earlier weights (stale by up to ``size / batch`` steps) and are frozen,
    so the gradient is that of a partial likelihood whose comparison set moves more slowly than the model. With a
    small learning rate and a memory of a few dozen patients this is the usual momentum-memory trade-off (as in
    MoCo-style queues): far less variance than the batch-only loss, some bias. Call :meth:`clear` when the weights
    jump (e.g. a new federated round brings the aggregated global model), so that no stale risk from a different
    model is mixed in. When ``keys`` (patient ids, never leaving the site) are given, a patient is stored at most once
    (the newest entry replaces the old) and a batch patient never competes with its own remembered copy.

    Parameters
    ----------
    size:
        Maximum number of remembered patients (FIFO), >= 0 (0 disables the memory).
    """

    def __init__(self, size: int = 64) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"RiskSetMemory: size must be a non-negative integer, got {size!r}")
        self.size = size
        self._items: deque[tuple[float, float, float, Hashable | None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget every remembered patient."""
        self._items.clear()

    def snapshot(self) -> tuple[tuple[float, float, float, Hashable | None], ...]:
        """The remembered entries, to :meth:`restore` them (e.g. when a training step is rejected)."""
        return tuple(self._items)

    def restore(self, snapshot: tuple[tuple[float, float, float, Hashable | None], ...]) -> None:
        """Remember exactly the entries of an earlier :meth:`snapshot`."""
        self._items = deque(snapshot)

    def _check(
        self, risk: Tensor, times: Any, events: Any, keys: Sequence[Hashable] | None, fn: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        eta, t, e = _validate_cox(risk, times, events, "efron", fn)
        if keys is not None and len(keys) != eta.shape[0]:
            raise ValueError(f"{fn}: keys has length {len(keys)}, risk has {eta.shape[0]}")
        return eta, t, e

    def update(self, risk: Tensor, times: Any, events: Any, keys: Sequence[Hashable] | None = None) -> None:
        """Append the batch's detached risks (oldest entries leave first once ``size`` is reached).

        Raises
        ------
        ValueError
            As :func:`cox_partial_likelihood_loss` for the arrays; ``keys`` of the wrong length.
        """
        eta, t, e = self._check(risk, times, events, keys, "RiskSetMemory.update")
        if self.size == 0:
            return
        values = zip(eta.detach().double().cpu().tolist(), t.double().cpu().tolist(), e.double().cpu().tolist())
        for idx, (r, ti, ei) in enumerate(values):
            key = None if keys is None else keys[idx]
            if key is not None:
                self._items = deque(item for item in self._items if item[3] != key)
            self._items.append((r, ti, ei, key))
            while len(self._items) > self.size:
                self._items.popleft()

    def loss(
        self,
        risk: Tensor,
        times: Any,
        events: Any,
        ties: Ties = "efron",
        keys: Sequence[Hashable] | None = None,
    ) -> Tensor:
        """Mean negative log partial likelihood over batch U memory of the events that involve the batch (class doc).

        Does not modify the memory (call :meth:`update` after the optimiser step or right after this call).
        Returns 0 with a zero gradient when neither the batch nor the memory holds an event whose risk set contains
        a batch patient (a censored batch still learns from remembered events).

        Raises
        ------
        ValueError
            As :func:`cox_partial_likelihood_loss`; ``keys`` of the wrong length.
        """
        fn = "RiskSetMemory.loss"
        if ties not in _TIES:
            raise ValueError(f"{fn}: ties must be one of {_TIES}, got {ties!r}")
        eta, t, e = self._check(risk, times, events, keys, fn)
        batch_keys = set() if keys is None else {k for k in keys if k is not None}
        mem = [item for item in self._items if item[3] is None or item[3] not in batch_keys]
        if mem:
            m = torch.tensor([item[:3] for item in mem], dtype=torch.float64, device=eta.device)
            eta_all = torch.cat([eta, m[:, 0].to(eta.dtype)])
            t_all = torch.cat([t, m[:, 1]])
            e_all = torch.cat([e, m[:, 2].to(e.dtype)])
        else:
            eta_all, t_all, e_all = eta, t, e
        if eta.shape[0] == 0:
            return eta.sum()
        # the batch's rows, and the remembered events whose risk set holds a batch patient (see the class doc)
        counted = t_all <= t.max()
        counted[: eta.shape[0]] = True
        total, n_events = _cox_nll_terms(eta_all, t_all, e_all, counted, ties)
        return total / n_events.clamp_min(1).to(total.dtype)


# ----------------------------------------------------------------------------------------------------------------
# multi-task loss
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    """Result of :class:`MultiTaskLoss`: the differentiable total and detached parts for logging.

    Attributes
    ----------
    total:
        Scalar tensor to back-propagate.
    parts:
        ``{"dice", "bce", "cox", "total"}`` as floats, plus ``"n_labelled"`` and ``"n_events"`` (batch counts).
    """

    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)


class MultiTaskLoss(nn.Module):
    """ST-RPNet loss: ``w_dice * Dice + w_bce * weighted BCE`` on the recurrence map + ``w_cox * Cox`` on the risk.

    Segmentation terms are averaged over the samples whose recurrence mask is known (``has_label``; 0 with a zero
    gradient when none is), the Cox term is the batch's partial likelihood against a :class:`RiskSetMemory` of this
    site. In training mode (``module.train()``) each forward appends the batch's detached risks to the memory after
    computing the loss; in eval mode the memory is read but never written. Losses are computed in float32 (or
    float64 when the inputs are) even under bf16 autocast.

    Parameters
    ----------
    w_dice, w_bce, w_cox:
        Non-negative weights, not all zero.
    pos_weight:
        Positive-class weight of the BCE term (> 0).
    ties:
        Cox tie handling, "efron" or "breslow".
    memory_size:
        Risk-set memory size (0 = batch-only Cox loss).
    """

    def __init__(
        self,
        w_dice: float = 1.0,
        w_bce: float = 1.0,
        w_cox: float = 1.0,
        *,
        pos_weight: float = 10.0,
        ties: Ties = "efron",
        memory_size: int = 64,
    ) -> None:
        super().__init__()
        for name, w in (("w_dice", w_dice), ("w_bce", w_bce), ("w_cox", w_cox)):
            if not isinstance(w, (int, float)) or not (w >= 0) or w == float("inf"):
                raise ValueError(f"MultiTaskLoss: {name} must be a finite number >= 0, got {w!r}")
        if w_dice + w_bce + w_cox == 0:
            raise ValueError("MultiTaskLoss: w_dice, w_bce and w_cox are all 0")
        if not isinstance(pos_weight, (int, float)) or not (0 < pos_weight < float("inf")):
            raise ValueError(f"MultiTaskLoss: pos_weight must be positive and finite, got {pos_weight!r}")
        if ties not in _TIES:
            raise ValueError(f"MultiTaskLoss: ties must be one of {_TIES}, got {ties!r}")
        self.w_dice = float(w_dice)
        self.w_bce = float(w_bce)
        self.w_cox = float(w_cox)
        self.pos_weight = float(pos_weight)
        self.ties: Ties = ties
        self.memory = RiskSetMemory(memory_size)

    def reset_memory(self) -> None:
        """Clear the risk-set memory (call when the model's weights are replaced, e.g. each federated round)."""
        self.memory.clear()

    def forward(self, recurrence_logits: Tensor, risk: Tensor, batch: Mapping[str, Any]) -> LossOutput:
        """Compute the total loss and its parts.

        Parameters
        ----------
        recurrence_logits:
            (B, 1, D, H, W) logits of the recurrence map.
        risk:
            (B,) risk scores.
        batch:
            Mapping with ``recurrence`` (B, 1, D, H, W), ``has_label`` bool (B,), ``event`` (B,), ``time`` (B,),
            optionally ``patient_id`` (list of B str: de-duplicates the risk-set memory; stays on the site).

        Raises
        ------
        ValueError
            A missing batch key, or shapes that do not match ``recurrence_logits`` / ``risk``.
        """
        for key in ("recurrence", "has_label", "event", "time"):
            if key not in batch:
                raise ValueError(f"MultiTaskLoss: batch is missing key {key!r}")
        if recurrence_logits.ndim != 5 or recurrence_logits.shape[1] != 1:
            raise ValueError(
                f"MultiTaskLoss: recurrence_logits must be (B, 1, D, H, W), got {tuple(recurrence_logits.shape)}"
            )
        n = recurrence_logits.shape[0]
        if risk.ndim != 1 or risk.shape[0] != n:
            raise ValueError(f"MultiTaskLoss: risk must be ({n},), got {tuple(risk.shape)}")
        target = torch.as_tensor(batch["recurrence"], device=recurrence_logits.device)
        if target.shape != recurrence_logits.shape:
            raise ValueError(
                f"MultiTaskLoss: batch['recurrence'] shape {tuple(target.shape)} != recurrence_logits shape "
                f"{tuple(recurrence_logits.shape)}"
            )
        has_label = torch.as_tensor(batch["has_label"], device=recurrence_logits.device).reshape(-1).bool()
        if has_label.shape[0] != n:
            raise ValueError(f"MultiTaskLoss: batch['has_label'] must be ({n},), got {tuple(has_label.shape)}")
        dtype = torch.float64 if recurrence_logits.dtype == torch.float64 else torch.float32
        logits = recurrence_logits.to(dtype)
        risk_f = risk.to(torch.float64 if risk.dtype == torch.float64 else torch.float32)
        keys = batch.get("patient_id")
        keys = list(keys) if keys is not None else None

        with torch.autocast(device_type=logits.device.type, enabled=False):
            if bool(has_label.any()):
                lab_logits, lab_target = logits[has_label], target[has_label].to(dtype)
                dice = dice_loss(lab_logits, lab_target)
                bce = weighted_bce(lab_logits, lab_target, pos_weight=self.pos_weight)
            else:
                dice = logits.sum() * 0.0
                bce = logits.sum() * 0.0
            times = torch.as_tensor(batch["time"], device=risk.device).reshape(-1)
            events = torch.as_tensor(batch["event"], device=risk.device).reshape(-1)
            cox = self.memory.loss(risk_f, times, events, self.ties, keys=keys)
            total = self.w_dice * dice + self.w_bce * bce + self.w_cox * cox.to(dice.dtype)
        if self.training:
            self.memory.update(risk_f, times, events, keys=keys)
        parts = {
            "dice": float(dice.detach()),
            "bce": float(bce.detach()),
            "cox": float(cox.detach()),
            "total": float(total.detach()),
            "n_labelled": float(has_label.sum()),
            "n_events": float((events > 0).sum()),
        }
        return LossOutput(total=total, parts=parts)
