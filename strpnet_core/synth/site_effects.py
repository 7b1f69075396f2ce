"""Site (hospital) effects: what makes the federation non-IID and preprocessing necessary.

Each site draws once (seeded): its share of patients, case mix (aggressiveness a in [0, 1], shifting rho),
scanner intensity scale (300-3000) and offset (0-200), bias-field strength b (0.1-0.4: field ``exp(b n(x))`` with n a
unit smooth random field of 120 mm correlation, new for each image), Rician noise sigma (2-6 % of white matter),
slice thickness (1x-2.5x the spacing along one axis: through-plane blur and down-sampling, then linear
re-sampling), misalignment between scans (rotation up to 3-8 degrees, shift up to 3-10 mm, smooth warp 0.5-2.5 mm)
and between modalities (up to 1-2 degrees, 1-2 mm), skull stripping (even-numbered sites show skull and scalp, odd ones are skull-stripped with zero background),
follow-up interval (60-95 days), follow-up length (540-1080 days) and loss to follow-up (mean 1500-5000 days).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .fields import smooth_noise


@dataclass(frozen=True)
class SiteProfile:
    """The acquisition and population profile of one site (all recorded in truth/cohort.json)."""

    index: int
    name: str
    n_patients: int
    aggressiveness: float
    intensity_scale: float
    intensity_offset: float
    bias_strength: float
    noise_sigma: float
    slice_axis: int  # array axis (0 = z, 1 = y, 2 = x)
    slice_thickness_mm: float
    skull: bool
    rot_deg: float
    shift_mm: float
    warp_mm: float
    modality_rot_deg: float
    modality_shift_mm: float
    followup_interval_days: int
    followup_days: float
    loss_mean_days: float

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return asdict(self)


def site_sizes(n_sites: int, patients: int, rng: np.random.Generator) -> list[int]:
    """Per-site patient counts around ``patients``: multipliers evenly spaced on [0.6, 1.4], shuffled.

    ``n_i = max(2, round(patients * m_i))``; with one site, ``patients`` exactly. The total is close to
    ``n_sites * patients`` (exact when the rounding cancels).
    """
    if n_sites == 1:
        return [patients]
    mult = rng.permutation(np.linspace(0.6, 1.4, n_sites))
    return [max(2, int(round(patients * m))) for m in mult]


def sample_site_profile(index: int, n_patients: int, scan_spacing: float, rng: np.random.Generator) -> SiteProfile:
    """Draw site ``index``'s profile (1-based; the name is ``site-NN``)."""
    thick = float(rng.uniform(1.0, 2.5)) * scan_spacing
    return SiteProfile(
        index=index,
        name=f"site-{index:02d}",
        n_patients=n_patients,
        aggressiveness=float(rng.uniform(0.0, 1.0)),
        intensity_scale=float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0)))),
        intensity_offset=float(rng.uniform(0.0, 200.0)),
        bias_strength=float(rng.uniform(0.1, 0.4)),
        noise_sigma=float(rng.uniform(0.02, 0.06)),
        slice_axis=int(rng.integers(0, 3)),
        slice_thickness_mm=thick,
        skull=index % 2 == 0,  # even sites keep skull and scalp, odd sites skull-strip (BraTS-like)
        rot_deg=float(rng.uniform(3.0, 8.0)),
        shift_mm=float(rng.uniform(3.0, 10.0)),
        warp_mm=float(rng.uniform(0.5, 2.5)),
        modality_rot_deg=float(rng.uniform(1.0, 2.0)),
        modality_shift_mm=float(rng.uniform(1.0, 2.0)),
        followup_interval_days=int(rng.integers(60, 96)),
        followup_days=float(rng.uniform(540.0, 1080.0)),
        loss_mean_days=float(rng.uniform(1500.0, 5000.0)),
    )


#: Bias fields are multiples of this (stored exactly as int16 with scl_slope).
BIAS_QUANTUM: float = 2.0**-8


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, strength: float) -> np.ndarray:
    """Smooth multiplicative bias ``exp(b n(x))`` (n: unit smooth field, 120 mm correlation), float32.

    Values are rounded to multiples of BIAS_QUANTUM = 2^-8 (the field used is exactly the one stored; it compresses
    well: neighbouring voxels often share a value).
    """
    field = np.exp(strength * smooth_noise(rng, shape, spacing, 120.0))
    return (np.round(field / BIAS_QUANTUM) * BIAS_QUANTUM).astype(np.float32)


def thick_slices(img: np.ndarray, axis: int, thickness_mm: float, spacing: float) -> np.ndarray:
    """Simulate thick-slice acquisition along ``axis``: Gaussian slice profile (FWHM = thickness), keep every
    ``k = round(thickness / spacing)``-th slice, then interpolate linearly back onto every slice.

    Returns the low-resolution stack (fewer slices when k > 1) and is undone by :func:`restore_slices`.
    """
    sigma = thickness_mm / 2.3548 / spacing
    out = ndimage.gaussian_filter1d(img, sigma, axis=axis, mode="nearest") if sigma > 0.3 else img
    k = max(1, int(round(thickness_mm / spacing)))
    return np.take(out, np.arange(0, img.shape[axis], k), axis=axis)


def restore_slices(low: np.ndarray, axis: int, n: int, thickness_mm: float, spacing: float) -> np.ndarray:
    """Linear interpolation of the kept slices (every k-th) back onto ``n`` slices along ``axis``."""
    k = max(1, int(round(thickness_mm / spacing)))
    if k == 1:
        return low
    pos = np.arange(n) / k
    lo = np.clip(np.floor(pos).astype(int), 0, low.shape[axis] - 1)
    hi = np.clip(lo + 1, 0, low.shape[axis] - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n
    frac = frac.reshape(shape)
    return np.take(low, lo, axis=axis) * (1 - frac) + np.take(low, hi, axis=axis) * frac


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise: ``sqrt((s + sigma n1)^2 + (sigma n2)^2)``."""
    n1 = rng.standard_normal(signal.shape, dtype=np.float32)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)
