"""Patient anatomy: nilearn's MNI152 2009a templates, deformed per patient, on the reference grid.

Tissue probabilities: grey matter ``p_gm`` and white matter ``p_wm`` from the templates, cerebrospinal fluid
``p_csf = clip(mask - p_gm - p_wm, 0, 1)``. A patient's brain is the template seen through a random smooth
deformation ``q = A (p - c) + c + t + u(p)`` (A: anisotropic scaling 0.92-1.08 and rotation up to 4 degrees about the
brain centre c, t: shift up to 4 mm, u: a smooth displacement field of about 3 mm amplitude and 60 mm correlation):
the value at reference point p is the template's value at q. The head (skull-on sites) is a shell grown around the
brain by a distance transform: a CSF rim, dark bone, bright scalp fat, skin.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .fields import smooth_noise
from .settings import Grid

#: Head layers outside the brain (outer distance from the brain mask, mm): CSF rim, bone, scalp fat, skin.
HEAD_LAYERS_MM: tuple[tuple[str, float], ...] = (("csf", 2.5), ("bone", 8.0), ("fat", 13.0), ("skin", 15.0))


@dataclass
class Anatomy:
    """Tissue maps of one patient on a grid, arrays (z, y, x) float32 in [0, 1].

    ``head`` holds an integer label per voxel for the skull/scalp shell (0 = air or brain, 1 = CSF rim, 2 = bone,
    3 = fat, 4 = skin); it is filled by :func:`add_head` and all zero otherwise.
    """

    p_gm: np.ndarray
    p_wm: np.ndarray
    p_csf: np.ndarray
    brain: np.ndarray  # bool
    head: np.ndarray  # uint8 layer labels

    @property
    def tissue(self) -> np.ndarray:
        """Brain parenchyma (where tumour cells can live): ``p_gm + p_wm >= 0.5`` inside the brain mask."""
        return self.brain & ((self.p_gm + self.p_wm) >= 0.5)


@functools.lru_cache(maxsize=2)
def load_templates(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 2009a GM, WM, brain-mask arrays (x, y, z RAS voxel order) and their affine, read offline.

    Cached per process. ``resolution`` is 1 or 2 mm (nilearn ships both inside its wheel).
    """
    from nilearn import datasets  # lazy: nilearn import costs about a second

    if resolution not in (1, 2):
        raise ValueError(f"MNI152 template resolution must be 1 or 2 mm, got {resolution}")
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    mask = datasets.load_mni152_brain_mask(resolution=resolution)
    arr = [np.clip(np.asarray(im.get_fdata(dtype=np.float32)), 0.0, 1.0) for im in (gm, wm, mask)]
    return arr[0], arr[1], arr[2], np.asarray(mask.affine, dtype=np.float64)


def sample_deformation(rng: np.random.Generator) -> dict[str, np.ndarray | float]:
    """Random parameters of a patient's anatomical deformation (scales, rotation angles, shift, warp seed)."""
    return {
        "scales": rng.uniform(0.92, 1.08, size=3),
        "angles": np.deg2rad(rng.uniform(-4.0, 4.0, size=3)),
        "shift": rng.uniform(-4.0, 4.0, size=3),
        "warp_mm": float(rng.uniform(2.0, 4.0)),
        "warp_seed": int(rng.integers(2**31)),
    }


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def build_anatomy(grid: Grid, deformation: dict, resolution: int, centre_lps: tuple[float, float, float]) -> Anatomy:
    """Deform the MNI templates into a patient's brain sampled on ``grid``.

    Parameters
    ----------
    grid:
        The reference grid (LPS, identity direction).
    deformation:
        Output of :func:`sample_deformation`.
    resolution:
        Template resolution in mm (1 or 2).
    centre_lps:
        Centre c of the scaling/rotation (mm, LPS).

    Returns
    -------
    Anatomy
        Tissue probabilities (trilinear interpolation of the templates at q(p)) and the brain mask
        (interpolated mask >= 0.5).
    """
    gm, wm, mask, affine = load_templates(resolution)
    zs, ys, xs = grid.physical_axes()
    pz, py, px = np.meshgrid(zs, ys, xs, indexing="ij", sparse=True)
    c = np.asarray(centre_lps)
    a = _rotation(np.asarray(deformation["angles"])) * np.asarray(deformation["scales"])[None, :]
    rng = np.random.default_rng(deformation["warp_seed"])
    u = [deformation["warp_mm"] * smooth_noise(rng, grid.shape, grid.spacing, 60.0) for _ in range(3)]
    d = (px - c[0], py - c[1], pz - c[2])
    q = [a[i, 0] * d[0] + a[i, 1] * d[1] + a[i, 2] * d[2] + c[i] + deformation["shift"][i] + u[i] for i in range(3)]
    # LPS -> RAS, then RAS mm -> template voxel (x, y, z) through the inverse affine.
    ras = np.stack([-q[0], -q[1], q[2]], axis=0).reshape(3, -1)
    inv = np.linalg.inv(affine)
    vox = (inv[:3, :3] @ ras + inv[:3, 3:4]).astype(np.float32)
    maps = [
        ndimage.map_coordinates(t, vox, order=1, mode="constant", cval=0.0).reshape(grid.shape)
        for t in (gm, wm, mask)
    ]
    brain = maps[2] >= 0.5
    p_gm = np.where(brain, maps[0], 0.0).astype(np.float32)
    p_wm = np.where(brain, maps[1], 0.0).astype(np.float32)
    s = p_gm + p_wm
    over = s > 1.0
    p_gm[over] /= s[over]
    p_wm[over] /= s[over]
    p_csf = np.where(brain, np.clip(1.0 - p_gm - p_wm, 0.0, 1.0), 0.0).astype(np.float32)
    return Anatomy(p_gm, p_wm, p_csf, brain, np.zeros(grid.shape, dtype=np.uint8))


def add_head(anatomy: Anatomy, spacing: float, rng: np.random.Generator) -> None:
    """Fill ``anatomy.head`` with a skull and scalp shell around the brain (in place).

    The outer distance ``r`` (mm) of each voxel from the brain mask, jittered by a smooth field (+-1.5 mm), sets the
    layer: ``r <= 2.5`` CSF rim, ``<= 8`` bone, ``<= 13`` scalp fat, ``<= 15`` skin, air beyond.
    """
    r = ndimage.distance_transform_edt(~anatomy.brain, sampling=spacing).astype(np.float32)
    jitter = 1.5 * smooth_noise(rng, anatomy.brain.shape, spacing, 50.0)
    r = np.where(anatomy.brain, 0.0, np.maximum(r + jitter, 0.5 * spacing))
    head = np.zeros(anatomy.brain.shape, dtype=np.uint8)
    inner = 0.0
    for label, (_, outer) in enumerate(HEAD_LAYERS_MM, start=1):
        head[(r > inner) & (r <= outer) & ~anatomy.brain] = label
        inner = outer
    anatomy.head = head
