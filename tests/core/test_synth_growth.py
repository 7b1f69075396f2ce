"""Fisher-KPP solver of the synthetic cohort: growth, no-flux into CSF, conservation, stability."""

from __future__ import annotations

import numpy as np
import pytest

from strpnet_core.synth.growth import FisherKPPSolver, diffusivity, face_diffusivities, stable_dt


def _phantom(n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cube of white matter with a grey-matter half and a CSF slab (a 'ventricle') at z in [14, 16)."""
    p_wm = np.zeros((n, n, n), np.float32)
    p_gm = np.zeros_like(p_wm)
    p_wm[2:-2, 2:-2, 2 : n // 2] = 1.0
    p_gm[2:-2, 2:-2, n // 2 : -2] = 1.0
    p_wm[14:16], p_gm[14:16] = 0.0, 0.0
    tissue = (p_wm + p_gm) >= 0.5
    return p_wm, p_gm, tissue


def test_diffusivity_ratio_and_zero_outside_tissue() -> None:
    p_wm, p_gm, tissue = _phantom()
    d = diffusivity(p_wm, p_gm, tissue, 0.4)
    assert d[5, 5, 5] == pytest.approx(0.4)
    assert d[5, 5, 20] == pytest.approx(0.04)  # D_white / D_grey = 10
    assert (d[~tissue] == 0).all()
    fz, _, _ = face_diffusivities(d)
    assert (fz[13] == 0).all() and (fz[15] == 0).all()  # faces touching the CSF slab carry no flux


def test_mass_and_extent_increase_without_entering_csf() -> None:
    p_wm, p_gm, tissue = _phantom()
    solver = FisherKPPSolver(diffusivity(p_wm, p_gm, tissue, 0.5), rho=0.05, spacing=2.0, dt_max=2.0)
    solver.seed((8, 10, 8))
    masses, extents = [], []
    for t in (20, 60, 120, 200):
        solver.advance(t)
        masses.append(solver.total_mass())
        extents.append(int((solver.c >= 0.1).sum()))
        assert (solver.c[~tissue] == 0).all()  # never into CSF or outside the brain
        assert solver.c.min() >= 0.0 and solver.c.max() <= 1.0
    assert all(b > a for a, b in zip(masses, masses[1:]))
    assert all(b > a for a, b in zip(extents, extents[1:]))
    assert (solver.c[16:] == 0).all()  # the CSF slab separates the two compartments completely


def test_pure_diffusion_conserves_mass() -> None:
    p_wm, p_gm, tissue = _phantom()
    solver = FisherKPPSolver(diffusivity(p_wm, p_gm, tissue, 1.0), rho=0.0, spacing=2.0, dt_max=5.0)
    solver.seed((8, 12, 12))
    m0 = solver.total_mass()
    solver.advance(100)
    # Conservative flux form: only the flushing of densities below 1e-7 at the front loses (a little) mass.
    assert solver.total_mass() == pytest.approx(m0, rel=1e-3)
    assert solver.total_mass() <= m0


def test_time_step_respects_stability_limit_and_stays_bounded() -> None:
    p_wm, p_gm, tissue = _phantom()
    d = diffusivity(p_wm, p_gm, tissue, 1.3)
    solver = FisherKPPSolver(d, rho=0.19, spacing=1.0, dt_max=10.0)
    assert solver.dt <= stable_dt(1.3, 1.0) == pytest.approx(1.0 / (6 * 1.3))
    solver.c[tissue] = np.random.default_rng(0).random(int(tissue.sum()))  # rough data: worst case for explicit
    solver.set_diffusivity(d)
    for _ in range(200):
        solver.step()
    assert np.isfinite(solver.c).all() and solver.c.min() >= 0.0 and solver.c.max() <= 1.0 + 1e-12
