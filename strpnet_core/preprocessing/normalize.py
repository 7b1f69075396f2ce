"""Intensity normalisation (numpy)."""

from __future__ import annotations

import numpy as np


def z_score_normalize(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Z-score a volume inside a brain mask (the seed notebook's function).

    With ``B = {v : brain_mask[v] != 0}``, ``mu = mean_{v in B} x_v`` and ``sigma = sqrt(mean_{v in B} (x_v - mu)^2)``
    (population standard deviation, accumulated in float64)::

        out[v] = (x[v] - mu) / sigma   for v in B
        out[v] = 0                     otherwise

    so that inside the mask the mean is 0 and the standard deviation 1.

    Parameters
    ----------
    volume:
        Array of any shape with finite values inside the mask.
    brain_mask:
        Array of the same shape; non-zero marks the brain.

    Returns
    -------
    numpy.ndarray
        float32 array of ``volume``'s shape.

    Raises
    ------
    ValueError
        Shape mismatch, empty mask, non-finite values inside the mask, or zero standard deviation (a constant
        volume): never returns NaN.
    """
    volume = np.asarray(volume)
    mask = np.asarray(brain_mask) != 0
    if volume.shape != mask.shape:
        raise ValueError(f"z_score_normalize: volume shape {volume.shape} != brain_mask shape {mask.shape}")
    n = int(mask.sum())
    if n == 0:
        raise ValueError("z_score_normalize: empty brain mask (no voxel to normalise over)")
    values = volume[mask].astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("z_score_normalize: non-finite values (NaN/inf) inside the brain mask")
    mu = values.mean()
    sigma = values.std()
    if not np.isfinite(sigma) or sigma <= 1e-12 * max(1.0, abs(mu)):
        raise ValueError(f"z_score_normalize: zero standard deviation inside the brain mask (constant value {mu:g})")
    out = np.zeros(volume.shape, dtype=np.float32)
    out[mask] = ((values - mu) / sigma).astype(np.float32)
    return out
