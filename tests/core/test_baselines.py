"""Tests of strpnet_core.baselines: statistics against lifelines / scikit-survival / strpnet_core.metrics, and the
segmentation and cavity-margin map on a phantom with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index as lifelines_cindex
from scipy import ndimage as ndi
from sksurv.metrics import concordance_index_ipcw
from sksurv.util import Surv

from strpnet_core.baselines import (
    VOLUME_FEATURES,
    SegmentationThresholds,
    bootstrap_indices,
    cavity_margin_map,
    fit_cavity_margin,
    fit_cox_volumes,
    harrell_c,
    mean_coverage,
    percentile_ci,
    pooled_dice,
    segment_patient,
    uno_c,
    uno_horizon,
    volume_features,
)
from strpnet_core.metrics import concordance_index, dice_from_counts, uno_concordance_index


def survival(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = rng.exponential(400 * np.exp(-0.8 * risk))
    t_cens = rng.uniform(100, 900, size=n)
    time = np.round(np.minimum(t_event, t_cens), 1)
    event = (t_event <= t_cens).astype(int)
    return risk, time, event


# ----------------------------------------------------------------------------------------------------------------------
# concordance
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harrell_matches_lifelines_and_metrics(seed: int) -> None:
    risk, time, event = survival(60, seed)
    risk[:5] = risk[5:10]  # ties in risk
    c = harrell_c(risk, time, event)
    assert c == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-12)
    assert c == pytest.approx(concordance_index(risk, time, event), abs=1e-12)


def test_harrell_nan_without_comparable_pair() -> None:
    assert math.isnan(harrell_c([0.1, 0.2, 0.3], [10.0, 20.0, 30.0], [0, 0, 0]))


@pytest.mark.parametrize("seed", [0, 3])
def test_uno_matches_sksurv_and_metrics(seed: int) -> None:
    risk, time, event = survival(80, seed)
    tr_risk, tr_time, tr_event = survival(120, seed + 100)
    del tr_risk
    tau = uno_horizon(tr_time, 500.0)
    assert tau == min(500.0, tr_time.max())
    got = uno_c(risk, time, event, tr_time, tr_event, tau)
    ref = concordance_index_ipcw(Surv.from_arrays(tr_event.astype(bool), tr_time),
                                 Surv.from_arrays(event.astype(bool), time), risk, tau=tau)[0]
    assert got == pytest.approx(ref, abs=1e-12)
    assert got == pytest.approx(uno_concordance_index(risk, time, event, tr_time, tr_event, tau=tau), abs=1e-9)


def test_uno_nan_when_sksurv_refuses() -> None:
    # every training patient censored at 100: G = 0 from day 100 on, a test event at 150 < tau cannot be weighted
    got = uno_c([1.0, 0.0], [150.0, 300.0], [1, 0], [100.0, 100.0], [0, 0], tau=400.0)
    assert math.isnan(got)


def test_uno_horizon_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="need training times"):
        uno_horizon([], 100.0)
    with pytest.raises(ValueError, match="positive horizon"):
        uno_horizon([1.0], 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Cox on volumes
# ----------------------------------------------------------------------------------------------------------------------
def feature_rows(n: int, seed: int) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [{"log_enhancing_ml": float(rng.normal(2, 0.5)), "log_oedema_ml": float(rng.normal(3, 0.7)),
             "log_cavity_ml": float(rng.normal(2.5, 0.4)), "growth_ml_per_30d": float(rng.normal(0.5, 1.0))}
            for _ in range(n)]
    lin = np.array([0.8 * r["log_oedema_ml"] + 0.5 * r["growth_ml_per_30d"] for r in rows])
    t_event = rng.exponential(500 * np.exp(-(lin - lin.mean())))
    t_cens = rng.uniform(200, 1200, n)
    return rows, np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)


def test_cox_volumes_matches_lifelines() -> None:
    rows, time, event = feature_rows(70, 0)
    model = fit_cox_volumes(rows, time, event, penalizer=0.1)
    df = pd.DataFrame(rows)
    df["time"], df["event"] = time, event
    cph = CoxPHFitter(penalizer=0.1).fit(df, duration_col="time", event_col="event")
    np.testing.assert_allclose(model.beta, [cph.params_[f] for f in VOLUME_FEATURES], rtol=1e-6, atol=1e-9)
    test_rows, _, _ = feature_rows(10, 1)
    np.testing.assert_allclose(model.predict_risk(test_rows),
                               cph.predict_log_partial_hazard(pd.DataFrame(test_rows)).to_numpy(), rtol=1e-6,
                               atol=1e-9)
    assert model.n_train == 70 and model.n_events == int(event.sum())
    # the informative features get the positive coefficients
    beta = dict(zip(model.features, model.beta, strict=True))
    assert beta["log_oedema_ml"] > 0 and beta["growth_ml_per_30d"] > 0


def test_cox_volumes_drops_constant_feature() -> None:
    rows, time, event = feature_rows(40, 2)
    for r in rows:
        r["growth_ml_per_30d"] = 0.0
    model = fit_cox_volumes(rows, time, event)
    beta = dict(zip(model.features, model.beta, strict=True))
    assert beta["growth_ml_per_30d"] == 0.0
    assert np.all(np.isfinite(model.predict_risk(rows)))


def test_cox_volumes_needs_an_event() -> None:
    rows, time, _ = feature_rows(5, 3)
    with pytest.raises(ValueError, match="event"):
        fit_cox_volumes(rows, time, [0] * 5)


# ----------------------------------------------------------------------------------------------------------------------
# segmentation and the cavity-margin map on a phantom
# ----------------------------------------------------------------------------------------------------------------------
SHAPE = (32, 32, 32)
SPACING = 2.0


def ball(center: tuple[int, int, int], radius: float) -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE)
    return (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius**2


def phantom() -> dict[str, np.ndarray]:
    """Pre-op: tumour (enhancing core r=4 inside FLAIR r=7) and a ventricle; post-op and follow-up: cavity r=4
    (fluid), FLAIR halo r=7 around it; the ventricle stays fluid at every scan."""
    brain = ball((16, 16, 16), 15)
    ventricle = ball((16, 16, 6), 2.5)
    core = ball((16, 20, 20), 4)
    flair = ball((16, 20, 20), 7)
    images = np.zeros((3, 4) + SHAPE, dtype=np.float32)
    for t in range(3):
        images[t, 2][ventricle] = 2.0  # fluid: bright T2, dark FLAIR and T1
        images[t, 3][ventricle] = -2.0
        images[t, 0][ventricle] = -2.0
    images[0, 3][flair] = 2.0
    images[0, 1][core] = 2.5
    for t in (1, 2):
        images[t, 3][flair & ~core] = 2.0
        images[t, 2][core] = 2.0
        images[t, 3][core] = -2.0
        images[t, 0][core] = -2.0
    images[2, 3][ball((16, 20, 20), 8) & ~core] = 2.0  # growth of the halo at the last scan
    images[:, :, ~brain] = 0.0
    return {"images": images, "brain": brain, "core": core, "flair": flair, "ventricle": ventricle}


def test_segment_patient_phantom() -> None:
    ph = phantom()
    seg = segment_patient(ph["images"], ph["brain"], [0.0, 5.0, 65.0], SPACING)
    np.testing.assert_array_equal(seg.cavity, ph["core"])  # new fluid; the ventricle is excluded
    assert not (seg.cavity & ph["ventricle"]).any()
    assert not (seg.flair_any & seg.cavity).any()
    np.testing.assert_array_equal(seg.enhancing_pre, ph["core"] & ph["flair"])
    voxel_ml = SPACING**3 / 1000
    assert seg.voxel_ml == voxel_ml
    assert seg.abnormal_ml[0] == pytest.approx(ph["flair"].sum() * voxel_ml)
    assert seg.abnormal_ml[2] > seg.abnormal_ml[1]
    f = volume_features(seg)
    assert f["log_enhancing_ml"] == pytest.approx(math.log1p(ph["core"].sum() * voxel_ml))
    assert f["log_oedema_ml"] == pytest.approx(math.log1p((ph["flair"] & ~ph["core"]).sum() * voxel_ml))
    assert f["log_cavity_ml"] == pytest.approx(math.log1p(ph["core"].sum() * voxel_ml))
    growth = 30 * (seg.abnormal_ml[2] - seg.abnormal_ml[1]) / (65.0 - 5.0)
    assert f["growth_ml_per_30d"] == pytest.approx(growth)


def test_segment_single_scan_has_no_cavity() -> None:
    ph = phantom()
    seg = segment_patient(ph["images"][:1], ph["brain"], [0.0], SPACING)
    assert not seg.cavity.any()
    assert volume_features(seg)["growth_ml_per_30d"] == 0.0


def test_segment_patient_rejects_bad_shapes() -> None:
    ph = phantom()
    with pytest.raises(ValueError, match=r"images must be \(T, 4"):
        segment_patient(ph["images"][:, :3], ph["brain"], [0, 1, 2], SPACING)
    with pytest.raises(ValueError, match="3 scans but 2 days"):
        segment_patient(ph["images"], ph["brain"], [0, 1], SPACING)


def test_cavity_margin_map_definition() -> None:
    ph = phantom()
    seg = segment_patient(ph["images"], ph["brain"], [0.0, 5.0, 65.0], SPACING)
    score, binary = cavity_margin_map(seg, SPACING, 4.0)
    d = ndi.distance_transform_edt(~ph["core"], sampling=SPACING)
    np.testing.assert_array_equal(binary, seg.flair_any & (d > 0) & (d <= 4.0))
    assert np.all(score[ph["core"]] == 0)
    # FLAIR-hyperintense voxels outrank all others, nearer ones first
    assert score[seg.flair_any].min() > score[~seg.flair_any].max()
    near, far = (seg.flair_any & (d <= 2.0)), (seg.flair_any & (d >= 8.0))
    assert score[near].min() > score[far].max()
    # without a cavity: score = FLAIR indicator, empty binary map
    seg0 = segment_patient(ph["images"][:1], ph["brain"], [0.0], SPACING)
    score0, binary0 = cavity_margin_map(seg0, SPACING, 4.0)
    assert not binary0.any()
    np.testing.assert_array_equal(score0, seg0.flair_any.astype(np.float32))
    with pytest.raises(ValueError, match="margin_mm must be > 0"):
        cavity_margin_map(seg, SPACING, 0.0)


def test_fit_cavity_margin_finds_the_shell() -> None:
    ph = phantom()
    seg = segment_patient(ph["images"], ph["brain"], [0.0, 5.0, 65.0], SPACING)
    d = ndi.distance_transform_edt(~ph["core"], sampling=SPACING)
    rec = seg.flair_any & (d > 0) & (d <= 6.0)  # true recurrence: the 6 mm shell inside the halo
    margin, dice = fit_cavity_margin([seg], [rec], [ph["brain"]], SPACING, margins_mm=(2.0, 4.0, 6.0, 10.0))
    assert margin == 6.0
    assert dice[6.0] == pytest.approx(1.0)
    assert dice[2.0] < 1.0 and dice[10.0] < 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Dice, coverage, bootstrap
# ----------------------------------------------------------------------------------------------------------------------
def test_pooled_dice_and_coverage() -> None:
    assert pooled_dice([3, 1], [10, 6]) == pytest.approx(dice_from_counts(4, 16))
    assert pooled_dice([0], [0]) == 1.0
    assert math.isnan(pooled_dice([], []))
    assert mean_coverage([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_coverage([float("nan")]))


def test_bootstrap_indices_and_ci() -> None:
    a = bootstrap_indices(7, 50, seed=3)
    b = bootstrap_indices(7, 50, seed=3)
    assert a.shape == (50, 7) and a.min() >= 0 and a.max() < 7
    np.testing.assert_array_equal(a, b)
    vals = np.arange(101, dtype=float)
    lo, hi = percentile_ci(np.append(vals, np.nan))
    assert (lo, hi) == (pytest.approx(np.quantile(vals, 0.025)), pytest.approx(np.quantile(vals, 0.975)))
    assert all(math.isnan(x) for x in percentile_ci([np.nan, np.nan]))
    with pytest.raises(ValueError, match="need n >= 1"):
        bootstrap_indices(0, 10, seed=0)


def test_thresholds_to_dict() -> None:
    assert SegmentationThresholds().to_dict()["flair"] == 1.5
