"""Outcome model of the synthetic cohort: the oracle is informative but not perfect, and the images carry signal."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index

from strpnet_core.synth.anatomy import build_anatomy, sample_deformation
from strpnet_core.synth.settings import FOV_CENTRE_LPS, get_settings
from strpnet_core.synth.timeline import FollowUp, sample_biology, simulate_course

N_PATIENTS = 40


@pytest.fixture(scope="module")
def courses() -> list[dict]:
    st = get_settings("ci")
    rows = []
    for i in range(N_PATIENTS):
        rng = np.random.default_rng([11, i])
        an = build_anatomy(st.grid, sample_deformation(rng), st.anatomy_resolution, FOV_CENTRE_LPS)
        bio = sample_biology(rng, an.tissue, an.p_wm, st.grid.spacing, 0.5)
        follow = FollowUp(75.0, 720.0 * rng.uniform(0.5, 1.0), rng.exponential(3000.0))
        co = simulate_course(an.p_wm, an.p_gm, an.tissue, st.grid.spacing, bio, follow, 3, st.dt_max_days, rng)
        c = co.densities[0]
        rows.append({"time": co.time, "event": co.event, "risk": co.true_risk, "course": co,
                     "enh_ml": (c >= bio.theta_t1c).sum() * 0.064, "flair_ml": (c >= bio.theta_flair).sum() * 0.064})
    return rows


def test_course_is_consistent(courses: list[dict]) -> None:
    for r in courses:
        co = r["course"]
        assert co.scan_days[0] == 0 and all(b > a for a, b in zip(co.scan_days, co.scan_days[1:]))
        assert all((d < co.time) if co.event else (d <= co.time) for d in co.scan_days)
        if co.event:
            assert co.event_time == co.time <= co.censor_time and co.recurrence_density is not None
            assert ((co.recurrence_density >= 0.6) & ~co.cavity).sum() > 0
        assert (co.densities[-1][co.cavity] == 0).all() or len(co.scan_days) == 1


def test_oracle_c_index_between_half_and_one(courses: list[dict]) -> None:
    t, e, risk = (np.array([r[k] for r in courses]) for k in ("time", "event", "risk"))
    assert 5 <= e.sum() < len(courses)  # events and censoring both occur
    c = concordance_index(t, -risk, e)
    assert 0.6 < c < 0.97


def test_preop_flair_halo_predicts_earlier_recurrence(courses: list[dict]) -> None:
    """Learnable from images: a thicker FLAIR halo around the enhancing tumour (longer infiltration length
    sqrt(D / rho)) leaves more residual tumour at the cavity wall, hence earlier recurrence."""
    t, e = np.array([r["time"] for r in courses]), np.array([r["event"] for r in courses])
    halo = np.array([np.cbrt(r["flair_ml"]) - np.cbrt(r["enh_ml"]) for r in courses])
    assert concordance_index(t, -halo, e) > 0.55
