"""Smooth random fields (warps, bias fields, texture) and separable resampling helpers, all vectorised numpy."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _hat_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix (n_out, n_in) mapping ``n_in`` lattice nodes spanning the axis to ``n_out`` points."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1.0 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


def tensor_upsample(lattice: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear interpolation of a small 3-D ``lattice`` spanning the whole box onto ``shape`` (float32).

    ``out[a, b, c] = sum_ijk Mz[a, i] My[b, j] Mx[c, k] lattice[i, j, k]`` with hat-function matrices M.
    """
    mz, my, mx = (_hat_matrix(n, m) for n, m in zip(shape, lattice.shape))
    out = np.tensordot(mz, lattice, axes=(1, 0))  # (Z, j, k)
    out = np.tensordot(out, my, axes=(1, 1))  # (Z, k, Y)
    out = np.tensordot(out, mx, axes=(1, 1))  # (Z, Y, X)
    return out.astype(np.float32)


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, correlation_mm: float
) -> np.ndarray:
    """A smooth random field of zero mean and unit standard deviation on a grid of ``shape`` voxels.

    White noise on a lattice of node distance ``correlation_mm / 2`` is Gaussian-smoothed (sigma = 1 node),
    standardised, and interpolated trilinearly onto the grid: correlation length about ``correlation_mm``.
    """
    nodes = tuple(max(3, int(np.ceil(n * spacing / (0.5 * correlation_mm))) + 1) for n in shape)
    lat = ndimage.gaussian_filter(rng.standard_normal(nodes), sigma=1.0, mode="reflect")
    lat = (lat - lat.mean()) / (lat.std() + 1e-12)
    return tensor_upsample(lat, shape)


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^3 blocks (edge-padded to a multiple of ``factor``): the coarse grid of Grid.coarsen."""
    if factor == 1:
        return array.astype(np.float32, copy=True)
    pads = [(0, (-n) % factor) for n in array.shape]
    a = np.pad(array.astype(np.float32), pads, mode="edge")
    z, y, x = (n // factor for n in a.shape)
    return a.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5))


def upsample_block(coarse: np.ndarray, factor: int, shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Inverse of :func:`block_mean` by interpolation: fine index j sits at coarse coordinate (j - (f-1)/2) / f.

    Only the bounding box of the coarse support (grown by one node) is interpolated; the rest is zero.
    """
    out = np.zeros(shape, dtype=np.float32)
    nz = np.argwhere(coarse != 0)
    if nz.size == 0:
        return out
    if factor == 1:
        out[...] = coarse[: shape[0], : shape[1], : shape[2]]
        return out
    lo = np.maximum(nz.min(0) - 1, 0)
    hi = np.minimum(nz.max(0) + 1, np.array(coarse.shape) - 1)
    half = 0.5 * (factor - 1)
    j_lo = np.maximum(np.ceil(lo * factor + half).astype(int), 0)
    j_hi = np.minimum(np.floor(hi * factor + half).astype(int) + 1, shape)
    axes = [(np.arange(a, b) - half) / factor for a, b in zip(j_lo, j_hi)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    box = tuple(slice(a, b) for a, b in zip(j_lo, j_hi))
    out[box] = ndimage.map_coordinates(coarse.astype(np.float32), [zz, yy, xx], order=order, mode="nearest")
    return out
