"""Tests of strpnet_core.metrics against lifelines, scikit-survival, MONAI and naive O(n^2) references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from survival_data import gbsg2_frame
from lifelines.utils import concordance_index as lifelines_cindex
from monai.metrics import DiceMetric
from sksurv.metrics import concordance_index_ipcw
from sksurv.util import Surv

from strpnet_core.metrics import (
    ConcordanceCounts,
    concordance_counts,
    concordance_index,
    dice_counts,
    dice_from_counts,
    dice_score,
    iso_volume_coverage,
    uno_concordance_index,
)


def naive_counts(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> tuple[int, int, int, int]:
    """O(n^2) Harrell counts: (i, j) comparable when i had the event and t_i < t_j, or t_i == t_j with j censored."""
    con = dis = tie = comp = 0
    for i in range(len(risk)):
        if not event[i]:
            continue
        for j in range(len(risk)):
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                comp += 1
                if risk[i] > risk[j]:
                    con += 1
                elif risk[i] < risk[j]:
                    dis += 1
                else:
                    tie += 1
    return con, dis, tie, comp


def as_tuple(c: ConcordanceCounts) -> tuple[int, int, int, int]:
    return c.concordant, c.discordant, c.tied_risk, c.comparable

def linear_predictor(df: pd.DataFrame, duration: str, event: str) -> np.ndarray:
    cph = CoxPHFitter().fit(df, duration, event)
    return df.drop(columns=[duration, event]).to_numpy(float) @ cph.params_.to_numpy()


# --------------------------------------------------------------------------------------------------------------
# Harrell
# --------------------------------------------------------------------------------------------------------------
def test_counts_match_naive_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(10)
    for _ in range(150):
        n = int(rng.integers(0, 40))
        risk = np.round(rng.normal(size=n), 1)
        time = rng.integers(0, 8, n).astype(float)
        event = rng.integers(0, 2, n)
        assert as_tuple(concordance_counts(risk, time, event)) == naive_counts(risk, time, event)


@pytest.mark.parametrize("dataset", ["rossi", "gbsg2"])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_cindex_equals_lifelines_on_shipped_datasets(dataset: str, decimals: int | None) -> None:
    if dataset == "rossi":
        df, dur, ev = load_rossi().astype(float), "week", "arrest"
    else:
        df, dur, ev = gbsg2_frame(), "time", "cens"
    risk = linear_predictor(df, dur, ev)
    if decimals is not None:
        risk = np.round(risk, decimals)  # tied risks
    time, event = df[dur].to_numpy(), df[ev].to_numpy()
    ours = concordance_index(risk, time, event)
    assert ours == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-9)
    assert ours > 0.6


def test_cindex_tie_rules_by_hand() -> None:
    # event at t=1 vs censored at t=1: comparable (concordant as risk 2 > 1); events tied at t=2: not comparable
    risk = [2.0, 1.0, 5.0, 4.0, 4.0]
    time = [1.0, 1.0, 2.0, 2.0, 3.0]
    event = [1, 0, 1, 1, 0]
    c = concordance_counts(risk, time, event)
    # pairs: (0,1) con, (0,2) dis, (0,3) dis, (0,4) dis, (2,4) con, (3,4) tie
    assert as_tuple(c) == (2, 3, 1, 6)
    assert c.c_index == pytest.approx(2.5 / 6)
    assert c.c_index == pytest.approx(lifelines_cindex(time, -np.array(risk), event), abs=1e-12)


def test_pooled_counts_equal_within_partition_pairs() -> None:
    rng = np.random.default_rng(11)
    n, k = 120, 4
    risk = np.round(rng.normal(size=n), 1)
    time = rng.integers(0, 30, n).astype(float)
    event = rng.integers(0, 2, n)
    site = rng.integers(0, k, n)
    pooled = sum((concordance_counts(risk[site == s], time[site == s], event[site == s]) for s in range(k)),
                 ConcordanceCounts(0, 0, 0, 0))
    ref = np.zeros(4, dtype=int)
    for s in range(k):
        ref += np.array(naive_counts(risk[site == s], time[site == s], event[site == s]))
    assert as_tuple(pooled) == tuple(ref)
    # and differs from the counts over all pairs (cross-site pairs are not formed)
    assert pooled.comparable < concordance_counts(risk, time, event).comparable


def test_counts_dataclass_roundtrip_and_validation() -> None:
    c = ConcordanceCounts(3, 1, 2, 6)
    assert c + ConcordanceCounts(1, 0, 0, 1) == ConcordanceCounts(4, 1, 2, 7)
    assert c.c_index == pytest.approx(4 / 6)
    assert ConcordanceCounts.from_dict(c.to_dict()) == c
    assert ConcordanceCounts.from_dict({k: float(v) for k, v in c.to_dict().items()}) == c
    assert np.isnan(ConcordanceCounts(0, 0, 0, 0).c_index)
    with pytest.raises(ValueError, match="tied_risk"):
        ConcordanceCounts.from_dict({"concordant": 1, "discordant": 0, "comparable": 1})
    with pytest.raises(ValueError, match="discordant"):
        ConcordanceCounts.from_dict({"concordant": 1, "discordant": -1, "tied_risk": 0, "comparable": 0})
    with pytest.raises(ValueError, match="concordant"):
        ConcordanceCounts.from_dict({"concordant": 1.5, "discordant": 0, "tied_risk": 0, "comparable": 1})
    with pytest.raises(ValueError, match="comparable"):
        ConcordanceCounts(1, 1, 1, 5)


def test_concordance_accepts_torch_and_rejects_bad_input() -> None:
    risk = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    assert concordance_index(risk, torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 1, 1])) == 1.0
    assert np.isnan(concordance_index([1.0, 2.0], [1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError, match="length mismatch"):
        concordance_counts([1.0, 2.0], [1.0], [1, 0])
    with pytest.raises(ValueError, match="risk"):
        concordance_counts([1.0, np.nan], [1.0, 2.0], [1, 0])
    with pytest.raises(ValueError, match="time"):
        concordance_counts([1.0, 2.0], [-1.0, 2.0], [1, 0])
    with pytest.raises(ValueError, match="event"):
        concordance_counts([1.0, 2.0], [1.0, 2.0], [1, 2])
    with pytest.raises(ValueError, match="risk"):
        concordance_counts(np.zeros((2, 2)), [1.0, 2.0], [1, 0])


# --------------------------------------------------------------------------------------------------------------
# Uno
# --------------------------------------------------------------------------------------------------------------
def test_uno_equals_sksurv_on_gbsg2() -> None:
    df = gbsg2_frame()
    risk = linear_predictor(df, "time", "cens")
    rng = np.random.default_rng(12)
    train = rng.random(len(df)) < 0.6
    t, e = df.time.to_numpy(), df.cens.to_numpy().astype(bool)
    y_train, y_test = Surv.from_arrays(e[train], t[train]), Surv.from_arrays(e[~train], t[~train])
    for tau in (None, 1500.0):
        if tau is None and t[~train][e[~train]].max() > t[train].max():
            continue
        ref = concordance_index_ipcw(y_train, y_test, risk[~train], tau=tau)[0]
        ours = uno_concordance_index(risk[~train], t[~train], e[~train], t[train], e[train], tau=tau)
        assert ours == pytest.approx(ref, abs=1e-6)
    tau = float(np.quantile(t[train], 0.8))
    ref = concordance_index_ipcw(y_train, y_test, np.round(risk[~train], 1), tau=tau)[0]
    ours = uno_concordance_index(np.round(risk[~train], 1), t[~train], e[~train], t[train], e[train], tau=tau)
    assert ours == pytest.approx(ref, abs=1e-6)


def test_uno_equals_sksurv_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(13)
    for trial in range(30):
        n = 50
        risk = np.round(rng.normal(size=n), 1)
        time = rng.integers(1, 20, n).astype(float)
        event = rng.integers(0, 2, n).astype(bool)
        event[0] = True
        tt = rng.integers(1, 25, 80).astype(float)
        te = rng.integers(0, 2, 80).astype(bool)
        tt[0], te[0] = 30.0, False
        tau = None if trial % 2 else 15.0
        ref = concordance_index_ipcw(Surv.from_arrays(te, tt), Surv.from_arrays(event, time), risk, tau=tau)[0]
        assert uno_concordance_index(risk, time, event, tt, te, tau=tau) == pytest.approx(ref, abs=1e-10)


def test_uno_without_censoring_equals_harrell_and_errors() -> None:
    rng = np.random.default_rng(14)
    risk = rng.normal(size=30)
    time = rng.exponential(size=30)
    event = np.ones(30)
    assert uno_concordance_index(risk, time, event, time, event) == pytest.approx(
        concordance_index(risk, time, event), abs=1e-12
    )
    with pytest.raises(ValueError, match="tau"):  # test events beyond the training follow-up
        uno_concordance_index([1.0, 0.0], [5.0, 6.0], [1, 1], [1.0, 2.0, 3.0], [1, 0, 0])
    with pytest.raises(ValueError, match="train_event"):
        uno_concordance_index([1.0, 0.0], [1.0, 2.0], [1, 1], [1.0, 2.0], [1, 3])
    with pytest.raises(ValueError, match="tau"):
        uno_concordance_index([1.0, 0.0], [1.0, 2.0], [1, 1], [1.0, 2.0], [1, 0], tau=-1.0)


# --------------------------------------------------------------------------------------------------------------
# Dice and iso-volume coverage
# --------------------------------------------------------------------------------------------------------------
def test_dice_agrees_with_monai_and_pools() -> None:
    rng = np.random.default_rng(15)
    preds = rng.random((4, 1, 6, 7, 5)) > 0.6
    truths = rng.random((4, 1, 6, 7, 5)) > 0.7
    preds[3] = truths[3] = False  # empty-empty
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    ref = metric(torch.tensor(preds).float(), torch.tensor(truths).float()).numpy().ravel()
    ours = np.array([dice_score(p, g) for p, g in zip(preds, truths)])
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert ours[3] == 1.0
    inter = denom = 0
    for p, g in zip(preds, truths):
        i, d = dice_counts(torch.tensor(p), g.astype(np.uint8))
        inter, denom = inter + i, denom + d
    assert dice_from_counts(inter, denom) == pytest.approx(2 * (preds & truths).sum() / (preds.sum() + truths.sum()))
    assert dice_score(np.ones(4), np.zeros(4)) == 0.0
    with pytest.raises(ValueError, match="true_mask"):
        dice_score(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="pred_mask"):
        dice_score(np.full((2, 2), 0.5), np.ones((2, 2)))


def test_iso_volume_coverage() -> None:
    rng = np.random.default_rng(16)
    prob = rng.random((8, 8, 8))
    truth = rng.random((8, 8, 8)) > 0.9
    brain = np.zeros((8, 8, 8), dtype=bool)
    brain[1:7, 1:7, 1:7] = True
    # naive reference: sort candidates by score, break ties by flat index
    t_in = truth & brain
    k = int(t_in.sum())
    cand = [(-prob.ravel()[i], i) for i in np.flatnonzero(brain.ravel())]
    top = [i for _, i in sorted(cand)[:k]]
    expected = t_in.ravel()[top].sum() / k
    assert iso_volume_coverage(prob, truth, brain) == pytest.approx(expected)
    # the truth itself as prediction covers everything; its negation nothing
    assert iso_volume_coverage(truth.astype(float), truth) == 1.0
    assert iso_volume_coverage(1.0 - truth, truth) == 0.0
    # constant map: deterministic tie-breaking = lowest flat indices
    flat = np.zeros(10)
    tmask = np.zeros(10, dtype=bool)
    tmask[[0, 5]] = True
    assert iso_volume_coverage(flat, tmask) == 0.5
    assert np.isnan(iso_volume_coverage(prob, np.zeros_like(truth)))
    with pytest.raises(ValueError, match="prob_map"):
        iso_volume_coverage(np.full(10, np.nan), tmask)
    with pytest.raises(ValueError, match="brain_mask"):
        iso_volume_coverage(flat, tmask, np.ones(9))
