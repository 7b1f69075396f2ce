"""The clinical course of one patient: growth to diagnosis, surgery, therapy, follow-up, recurrence, censoring.

Time is in days since the pre-op scan (day 0). The course, on the coarse growth grid:

1. seed: a Gaussian blob (peak 0.5) at a random deep white-matter voxel; grow until the enhancing volume
   ``V(c >= theta_T1c)`` reaches the diagnosis volume (sphere of diameter 20-45 mm) -> pre-op scan, day 0;
2. surgery on day s (2-10): the enhancing core plus a margin of m mm (m ~ U(4, 8), Euclidean distance on the growth
   grid) becomes a fluid cavity: c = 0 and D = 0 there (cells never enter it); the residual infiltration at the
   cavity wall is about ``theta_T1c exp(-m / L)`` with the infiltration length ``L = sqrt(D / rho)``, which the
   pre-op FLAIR halo shows;
3. post-op scan on day s + 1..4; adjuvant therapy 10-25 days later kills a fraction of the cells, ``c <- c e^{-k}``,
   and changes the proliferation rate, ``rho <- m rho``; k ~ N(3.5, 1.0) (clipped 1.5..6) and
   m ~ logN(0, 0.3) are hidden (no image shows them) and make outcomes noisy like real ones;
4. recurrence: the first time the enhancing volume outside the cavity reaches ``V_MIN_ML``; the event time is
   interpolated linearly in V between solver steps (steps <= dt_max days); simulated up to ``HORIZON_DAYS``;
5. censoring ``C = min(F, L)`` with administrative end F (site follow-up x U(0.5, 1)) and loss to follow-up
   L ~ Exp(site rate); observed ``time = min(T, C)``, ``event = T <= C``;
6. follow-up scans every site interval (+-10 days) after the post-op scan; written scans are those before the
   event (``day < time``) or up to censoring (``day <= time``), at most ``max_timepoints``.

The true risk is ``-log T_nf`` where ``T_nf`` is the recurrence time of the same patient after the same surgery
with the population-typical therapy response (k = 3.5, m = 1): what the images can, at best, predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .growth import FisherKPPSolver, GrowthParams, diffusivity

#: Minimal volume (ml) of new enhancing tissue outside the cavity that counts as a recurrence.
V_MIN_ML: float = 1.0
#: Simulated follow-up after the pre-op scan (days); no recurrence by then -> none recorded.
HORIZON_DAYS: float = 1500.0
#: Horizon of the noise-free run that defines the true risk.
HORIZON_NF_DAYS: float = 3000.0
#: Population-typical therapy response (log kill k, rho factor m) of the noise-free run.
TYPICAL_LOG_KILL: float = 3.5
#: Longest growth from seed to diagnosis before the parameters are rejected (days).
MAX_GROWTH_DAYS: float = 6000.0
#: Literature ranges (Lipkova 2019, GliomaSolver priors) narrowed so that recurrences fall within follow-up.
D_WHITE_RANGE: tuple[float, float] = (0.02, 1.0)  # literature 0.02 - 1.3 mm^2/day
RHO_RANGE: tuple[float, float] = (0.015, 0.06)  # literature 0.003 - 0.19 /day


class GrowthTooSlow(RuntimeError):
    """The tumour did not reach its diagnosis size within MAX_GROWTH_DAYS (parameters are re-drawn)."""


@dataclass(frozen=True)
class Biology:
    """Hidden per-patient parameters of the course (all recorded in truth.json)."""

    growth: GrowthParams
    seed_index: tuple[int, int, int]
    diag_diameter_mm: float
    theta_t1c: float
    theta_flair: float
    margin_mm: float
    surgery_day: int
    postop_delay: int
    therapy_delay: int
    log_kill: float
    rho_factor: float


@dataclass(frozen=True)
class FollowUp:
    """Site-dependent follow-up schedule and censoring of one patient."""

    interval_days: float
    admin_end_days: float
    loss_days: float


@dataclass
class Course:
    """Result of :func:`simulate_course` (coarse-grid arrays)."""

    scan_days: list[float]
    densities: list[np.ndarray]  # c at each written scan
    cavities: list[np.ndarray | None]  # cavity mask at each written scan (None before surgery)
    event_time: float | None  # uncensored recurrence time (days), None = none within the horizon
    censor_time: float
    event: int
    time: float
    noise_free_time: float
    recurrence_density: np.ndarray | None  # c at the event time
    cavity: np.ndarray | None
    extra: dict = field(default_factory=dict)

    @property
    def true_risk(self) -> float:
        """``-log(T_nf)``: higher = earlier recurrence."""
        return float(-np.log(self.noise_free_time))


def sample_biology(
    rng: np.random.Generator, tissue: np.ndarray, p_wm: np.ndarray, spacing: float, aggressiveness: float
) -> Biology:
    """Draw a patient's hidden parameters.

    ``log D_w`` is uniform on ``log D_WHITE_RANGE``; ``log rho`` is ``Beta(2 + 2a, 4 - 2a)`` on ``log RHO_RANGE``
    for the site's aggressiveness ``a`` in [0, 1] (case mix). The seed is a random voxel with ``p_wm >= 0.6`` at
    least 10 mm inside the parenchyma.
    """
    d_w = float(np.exp(rng.uniform(*np.log(D_WHITE_RANGE))))
    lo, hi = np.log(RHO_RANGE)
    rho = float(np.exp(lo + (hi - lo) * rng.beta(2.0 + 2.0 * aggressiveness, 4.0 - 2.0 * aggressiveness)))
    depth = ndimage.distance_transform_edt(tissue, sampling=spacing)
    candidates = np.argwhere((p_wm >= 0.6) & (depth >= 10.0))
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max() * 0.5)
    seed = tuple(int(v) for v in candidates[rng.integers(len(candidates))])
    return Biology(
        growth=GrowthParams(d_w, rho),
        seed_index=seed,  # type: ignore[arg-type]
        diag_diameter_mm=float(rng.uniform(20.0, 45.0)),
        theta_t1c=float(rng.uniform(0.6, 0.8)),
        theta_flair=float(rng.uniform(0.08, 0.3)),
        margin_mm=float(rng.uniform(4.0, 8.0)),
        surgery_day=int(rng.integers(2, 11)),
        postop_delay=int(rng.integers(1, 5)),
        therapy_delay=int(rng.integers(10, 26)),
        log_kill=float(np.clip(rng.normal(TYPICAL_LOG_KILL, 1.0), 1.5, 6.0)),
        rho_factor=float(np.exp(rng.normal(0.0, 0.3))),
    )


def _regrow(
    solver: FisherKPPSolver, t0: float, bio: Biology, cavity: np.ndarray, log_kill: float, rho_factor: float,
    horizon: float, scan_days: list[float], on_scan=None,
) -> tuple[float | None, np.ndarray | None]:
    """Run the post-operative course from pre-op-relative day ``solver.t - t0`` to the event or ``horizon``.

    Returns (event day or None, density at the event). ``on_scan(day, c)`` is called when a scan day is passed.
    """
    therapy_day = bio.surgery_day + bio.postop_delay + bio.therapy_delay
    postop_day = bio.surgery_day + bio.postop_delay
    treated = False
    pending = list(scan_days)
    h3 = solver.spacing**3 / 1000.0  # ml per voxel
    prev_day, prev_v = solver.t - t0, 0.0
    while solver.t - t0 < horizon:
        day = solver.t - t0
        while pending and pending[0] <= day + 1e-9:
            if on_scan is not None:
                on_scan(pending[0], solver.c.copy())
            pending.pop(0)
        if not treated and day >= therapy_day:
            solver.c *= np.exp(-log_kill)
            solver.rho = bio.growth.rho * rho_factor
            treated = True
        solver.step()
        day = solver.t - t0
        if day > postop_day:
            v = float(((solver.c >= bio.theta_t1c) & ~cavity).sum() * h3)
            if v >= V_MIN_ML:
                frac = (V_MIN_ML - prev_v) / max(v - prev_v, 1e-12)
                return prev_day + float(np.clip(frac, 0.0, 1.0)) * (day - prev_day), solver.c.copy()
            prev_day, prev_v = day, v
        else:
            prev_day = day
    return None, None


def simulate_course(
    p_wm: np.ndarray, p_gm: np.ndarray, tissue: np.ndarray, spacing: float, bio: Biology, follow: FollowUp,
    max_timepoints: int, dt_max: float, schedule_rng: np.random.Generator,
) -> Course:
    """Simulate one patient's course on the coarse growth grid (see the module docstring for the model)."""
    d = diffusivity(p_wm, p_gm, tissue, bio.growth.d_white)
    solver = FisherKPPSolver(d, bio.growth.rho, spacing, dt_max=dt_max)
    solver.seed(bio.seed_index)
    v_diag = np.pi / 6.0 * bio.diag_diameter_mm**3
    while solver.volume_above(bio.theta_t1c) < v_diag:
        if solver.t > MAX_GROWTH_DAYS or not solver.c.any():
            raise GrowthTooSlow(f"enhancing volume did not reach {v_diag / 1000:.1f} ml in {MAX_GROWTH_DAYS} days")
        solver.step()
    t0 = solver.t
    c_pre = solver.c.copy()
    # Surgery.
    solver.advance(t0 + bio.surgery_day)
    enhancing = solver.c >= bio.theta_t1c
    cavity = ndimage.distance_transform_edt(~enhancing, sampling=spacing) <= bio.margin_mm
    cavity &= tissue | enhancing
    solver.set_diffusivity(np.where(cavity, 0.0, d))
    state_c, state_t = solver.c.copy(), solver.t
    # Scan schedule and censoring.
    postop = float(bio.surgery_day + bio.postop_delay)
    censor = max(min(follow.admin_end_days, follow.loss_days), postop)
    days = [postop]
    while days[-1] + follow.interval_days <= censor:
        days.append(days[-1] + follow.interval_days + float(schedule_rng.integers(-10, 11)))
    days = [t for t in days if t <= censor][: max_timepoints - 1]
    snaps: dict[float, np.ndarray] = {}
    event_time, c_event = _regrow(
        solver, t0, bio, cavity, bio.log_kill, bio.rho_factor, HORIZON_DAYS, days,
        on_scan=lambda day, c: snaps.__setitem__(day, c),
    )
    # Noise-free twin (typical therapy response) from the same post-surgery state.
    solver.c, solver.t, solver.rho = state_c, state_t, bio.growth.rho
    solver.set_diffusivity(np.where(cavity, 0.0, d))
    nf_time, _ = _regrow(solver, t0, bio, cavity, TYPICAL_LOG_KILL, 1.0, HORIZON_NF_DAYS, [])
    # Times to 0.1 day (the precision of outcomes.csv), so that 'day < time' holds for the written values too.
    event_time = None if event_time is None else round(float(event_time), 1)
    censor = round(float(censor), 1)
    event = int(event_time is not None and event_time <= censor)
    time = float(event_time) if event else float(censor)
    written = [t for t in days if (t < time if event else t <= time) and t in snaps]
    return Course(
        scan_days=[0.0] + written,
        densities=[c_pre] + [snaps[t] for t in written],
        cavities=[None] + [cavity for _ in written],
        event_time=event_time,
        censor_time=float(censor),
        event=event,
        time=time,
        noise_free_time=float(nf_time if nf_time is not None else HORIZON_NF_DAYS),
        recurrence_density=c_event if event else None,
        cavity=cavity,
        extra={"diagnosis_growth_days": float(t0)},
    )
