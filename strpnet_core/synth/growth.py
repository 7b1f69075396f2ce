"""Fisher-KPP reaction-diffusion tumour growth on a coarse grid.

Model (normalised tumour-cell density c in [0, 1])::

    dc/dt = div(D(x) grad c) + rho c (1 - c)

with ``D = D_w p_wm + D_g p_gm``, ``D_g = D_w / 10`` in parenchyma and ``D = 0`` in CSF, outside the brain and in a
resection cavity (zero-flux boundary: no cell ever enters those voxels).

Scheme (Lie splitting per step of length dt):

1. diffusion, explicit conservative finite volumes: face diffusivities are harmonic means of the neighbours,
   ``D_{i+1/2} = 2 D_i D_{i+1} / (D_i + D_{i+1})`` (zero if either side is zero, hence exact no-flux), and
   ``c_i += dt / h^2 * sum_axes (D_{i+1/2} (c_{i+1} - c_i) - D_{i-1/2} (c_i - c_{i-1}))``;
   stable (monotone, maximum principle) for ``dt <= h^2 / (6 D_max)``; the solver uses 0.9 of that bound;
2. reaction, the exact logistic solution ``c <- c e^{rho dt} / (1 + c (e^{rho dt} - 1))`` (unconditionally stable,
   keeps c in [0, 1]).

Work is restricted to the bounding box of the support of c (densities below 1e-7 are flushed to zero), grown by
one voxel per step: an explicit 7-point stencil cannot spread further in one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Ratio of white- to grey-matter diffusivity.
D_RATIO: float = 10.0
#: Densities below this are flushed to zero (keeps the active box tight).
FLUSH: float = 1e-7


@dataclass(frozen=True)
class GrowthParams:
    """Per-patient growth parameters: white-matter diffusivity (mm^2/day) and proliferation rate (1/day)."""

    d_white: float
    rho: float


def diffusivity(p_wm: np.ndarray, p_gm: np.ndarray, tissue: np.ndarray, d_white: float) -> np.ndarray:
    """Voxel diffusivity ``D = D_w p_wm + (D_w / 10) p_gm`` in parenchyma (``tissue``), 0 elsewhere (mm^2/day)."""
    d = d_white * p_wm + (d_white / D_RATIO) * p_gm
    return np.where(tissue, d, 0.0).astype(np.float64)


def face_diffusivities(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Harmonic-mean face diffusivities along z, y, x; arrays of shape ``d.shape`` minus one along their axis."""
    out = []
    for axis in range(3):
        a = np.take(d, np.arange(d.shape[axis] - 1), axis=axis)
        b = np.take(d, np.arange(1, d.shape[axis]), axis=axis)
        s = a + b
        out.append(np.where(s > 0, 2.0 * a * b / np.where(s > 0, s, 1.0), 0.0))
    return out[0], out[1], out[2]


def stable_dt(d_max: float, spacing: float) -> float:
    """The explicit scheme's stability bound ``h^2 / (6 D_max)`` in days (inf when D_max = 0)."""
    return float("inf") if d_max <= 0 else spacing**2 / (6.0 * d_max)


class FisherKPPSolver:
    """Explicit/exact-reaction Fisher-KPP solver with an active bounding box.

    Parameters
    ----------
    d:
        Voxel diffusivity (mm^2/day), zero where cells cannot go (see :func:`diffusivity`).
    rho:
        Proliferation rate (1/day); may be changed between steps (``solver.rho = ...``).
    spacing:
        Grid spacing h (mm).
    dt_max:
        Largest step (days); the step is ``min(dt_max, 0.9 h^2 / (6 max D))``.
    """

    def __init__(self, d: np.ndarray, rho: float, spacing: float, dt_max: float = 2.0) -> None:
        self.shape = d.shape
        self.spacing = float(spacing)
        self.rho = float(rho)
        self.t = 0.0
        self.c = np.zeros(d.shape, dtype=np.float64)
        self._box: tuple[slice, slice, slice] | None = None
        self._dt_max = float(dt_max)
        self.set_diffusivity(d)

    def set_diffusivity(self, d: np.ndarray) -> None:
        """Replace the diffusivity field (e.g. after resection); c is zeroed where D = 0."""
        self.d = np.asarray(d, dtype=np.float64)
        self.faces = face_diffusivities(self.d)
        self.dt = min(self._dt_max, 0.9 * stable_dt(float(self.d.max()), self.spacing))
        self.c[self.d <= 0] = 0.0
        self._update_box()

    def seed(self, index: tuple[int, int, int], amplitude: float = 0.5, sigma_vox: float = 1.0) -> None:
        """Add a Gaussian blob of peak ``amplitude`` at voxel ``index`` (only where D > 0)."""
        grids = np.ogrid[tuple(slice(0, n) for n in self.shape)]
        r2 = sum((g - i) ** 2 for g, i in zip(grids, index))
        self.c = np.maximum(self.c, amplitude * np.exp(-0.5 * r2 / sigma_vox**2))
        self.c[self.d <= 0] = 0.0
        self.c[self.c < FLUSH] = 0.0
        self._update_box()

    def _update_box(self) -> None:
        nz = np.nonzero(self.c > 0)
        if nz[0].size == 0:
            self._box = None
            return
        self._box = tuple(  # type: ignore[assignment]
            slice(max(int(a.min()) - 1, 1), min(int(a.max()) + 2, n - 1)) for a, n in zip(nz, self.shape)
        )

    def step(self) -> None:
        """Advance by one step ``self.dt``: explicit diffusion then exact logistic reaction, on the active box."""
        dt = self.dt
        self.t += dt
        if self._box is None:
            return
        bz, by, bx = self._box
        hz = slice(bz.start - 1, bz.stop + 1)
        hy = slice(by.start - 1, by.stop + 1)
        hx = slice(bx.start - 1, bx.stop + 1)
        c = self.c[hz, hy, hx]
        fz = self.faces[0][bz.start - 1 : bz.stop, by, bx] * (c[1:, 1:-1, 1:-1] - c[:-1, 1:-1, 1:-1])
        fy = self.faces[1][bz, by.start - 1 : by.stop, bx] * (c[1:-1, 1:, 1:-1] - c[1:-1, :-1, 1:-1])
        fx = self.faces[2][bz, by, bx.start - 1 : bx.stop] * (c[1:-1, 1:-1, 1:] - c[1:-1, 1:-1, :-1])
        inner = c[1:-1, 1:-1, 1:-1] + (dt / self.spacing**2) * (
            (fz[1:] - fz[:-1]) + (fy[:, 1:] - fy[:, :-1]) + (fx[:, :, 1:] - fx[:, :, :-1])
        )
        e = np.exp(self.rho * dt)
        inner = inner * e / (1.0 + inner * (e - 1.0))
        inner[inner < FLUSH] = 0.0
        self.c[bz, by, bx] = inner
        # The support grows by at most one voxel per step: recompute the box inside the box grown by one.
        sub = inner > 0
        if not sub.any():
            self._box = None
            return
        new = []
        for axis, (s, n) in enumerate(zip(self._box, self.shape)):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.nonzero(sub.any(axis=other))[0]
            new.append(slice(max(s.start + int(idx[0]) - 1, 1), min(s.start + int(idx[-1]) + 2, n - 1)))
        self._box = tuple(new)  # type: ignore[assignment]

    def advance(self, t_end: float) -> None:
        """Step until ``t >= t_end`` (the last step may overshoot by less than one dt)."""
        while self.t < t_end - 1e-9:
            self.step()

    def total_mass(self) -> float:
        """``sum(c) h^3``: tumour-cell burden in mm^3 of fully packed tissue."""
        return float(self.c.sum() * self.spacing**3)

    def volume_above(self, threshold: float, exclude: np.ndarray | None = None) -> float:
        """Volume (mm^3) where ``c >= threshold`` (optionally outside the boolean mask ``exclude``)."""
        above = self.c >= threshold
        if exclude is not None:
            above &= ~exclude
        return float(above.sum() * self.spacing**3)
