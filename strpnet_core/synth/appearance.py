"""Noise-free MR appearance of the four modalities in the reference space.

The clean intensity of a voxel (relative units, white matter on T1n = 1) is built in layers::

    I = p_gm I_gm + p_wm I_wm + p_csf I_csf                     (partial-volume tissue mix)
    I <- (1 - w_oed) I + w_oed I_oedema,    w_oed = smoothstep(c; 0.7 theta_F, 1.3 theta_F)   (FLAIR/T2 bright)
    I <- (1 - w_enh) I + w_enh I_enh,       w_enh = smoothstep(c; theta_T1c - 0.05, theta_T1c + 0.05)
    I <- (1 - w_nec) I + w_nec I_nec,       necrosis: enhancing voxels deeper than a 3-6 mm rim
    I <- (1 - w_cav) I + w_cav I_cavity,    resection cavity (fluid)
    I <- I_layer on the head shell (CSF rim, bone, scalp fat, skin) where present
    I <- I (1 + 0.03 n(x))                  mild smooth texture, n a unit smooth random field (8 mm)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy
from .fields import smooth_noise

#: Relative intensities per modality: gm, wm, csf, oedema, enhancing, necrosis, cavity, csf-rim, bone, fat, skin.
INTENSITY: dict[str, tuple[float, ...]] = {
    "t1n": (0.72, 1.00, 0.28, 0.62, 0.68, 0.35, 0.22, 0.28, 0.08, 1.25, 0.70),
    "t1c": (0.74, 1.00, 0.30, 0.64, 1.55, 0.36, 0.24, 0.30, 0.08, 1.25, 0.75),
    "t2w": (0.78, 0.55, 1.60, 1.15, 0.95, 1.35, 1.60, 1.60, 0.06, 0.90, 0.60),
    "t2f": (0.85, 0.62, 0.12, 1.45, 1.15, 0.55, 0.15, 0.12, 0.06, 1.00, 0.65),
}


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``3 s^2 - 2 s^3`` with ``s = clip((x - lo) / (hi - lo), 0, 1)``."""
    s = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (s * s * (3.0 - 2.0 * s)).astype(np.float32)


def necrosis_weight(c: np.ndarray, theta_t1c: float, spacing: float, rim_mm: float) -> np.ndarray:
    """Necrotic core: enhancing voxels (``c >= theta_T1c``) farther than ``rim_mm`` from the enhancing border."""
    enh = c >= theta_t1c
    out = np.zeros(c.shape, dtype=np.float32)
    if not enh.any():
        return out
    idx = np.argwhere(enh)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, c.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    depth = ndimage.distance_transform_edt(enh[box], sampling=spacing)
    out[box] = smoothstep(depth, rim_mm, rim_mm + spacing)
    return out


def render_clean(
    modality: str, anatomy: Anatomy, c: np.ndarray, cavity: np.ndarray | None, theta_t1c: float,
    theta_flair: float, rim_mm: float, spacing: float, texture: np.ndarray, show_head: bool,
) -> np.ndarray:
    """Clean (noise-, bias- and misalignment-free) image of ``modality`` on the reference grid (float32).

    Parameters
    ----------
    c, cavity:
        Tumour density and cavity fraction (None before surgery) on the reference grid.
    texture:
        A unit smooth random field (same for all modalities of a patient).
    show_head:
        Draw the skull/scalp shell (sites that do not skull-strip).
    """
    gm, wm, csf, oed, enh, nec, cav, rim, bone, fat, skin = INTENSITY[modality]
    img = anatomy.p_gm * gm + anatomy.p_wm * wm + anatomy.p_csf * csf
    w = smoothstep(c, 0.7 * theta_flair, 1.3 * theta_flair)
    img = img * (1 - w) + oed * w * anatomy.brain
    w = smoothstep(c, theta_t1c - 0.05, theta_t1c + 0.05)
    img = img * (1 - w) + enh * w
    w = necrosis_weight(c, theta_t1c, spacing, rim_mm)
    img = img * (1 - w) + nec * w
    if cavity is not None:
        img = img * (1 - cavity) + cav * cavity
    img = img * (1.0 + 0.03 * texture)
    if show_head:
        for label, value in enumerate((rim, bone, fat, skin), start=1):
            img[anatomy.head == label] = value
    return img.astype(np.float32)


def patient_texture(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """The unit smooth texture field of a patient (correlation about 8 mm)."""
    return smooth_noise(rng, shape, spacing, max(8.0, 2.0 * spacing))
