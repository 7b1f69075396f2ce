"""Acquisition of one image: misalignment transform S, resampling, bias, slice thickness, Rician noise, scanner scale.

S maps a physical point y of the written image to the reference (pre-op T1c) space; the written image is the clean
reference image sampled through it, ``J(y) = I_ref(S(y))``, so S is exact by construction. For a scan after the
pre-op one, ``S = R_mod o R_scan o W_scan`` (ITK CompositeTransform [R_mod, R_scan, W_scan]; the last added is
applied first): a smooth displacement field W_scan (DisplacementFieldTransform on a 20 mm lattice), the scan's rigid
pose R_scan and a small rigid modality offset R_mod (rotations about the FOV centre). Pre-op: ``S = R_mod``
(identity for the T1c). The dense field ``W_scan(y)`` is computed once per scan by ITK
(TransformToDisplacementField); the rigid part is applied in numpy and the image sampled trilinearly.
The written intensity is ``J = scale * Rician(blur_k(J_clean * B), sigma) + offset`` on the head (or on the brain
mask, at skull-stripping sites, zero elsewhere), stored as int16; B is the true bias field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .settings import FOV_CENTRE_LPS, Grid
from .site_effects import SiteProfile, bias_field, restore_slices, rician, thick_slices

#: Node distance (mm) of the displacement-field lattice of the smooth warp.
WARP_LATTICE_MM: float = 20.0


def rigid(rng: np.random.Generator, rot_deg: float, shift_mm: float) -> sitk.Euler3DTransform:
    """A random rigid transform: angles uniform in +-rot_deg, translation uniform in +-shift_mm, about the centre."""
    angles = np.deg2rad(rng.uniform(-rot_deg, rot_deg, size=3))
    shift = rng.uniform(-shift_mm, shift_mm, size=3)
    return sitk.Euler3DTransform(FOV_CENTRE_LPS, *map(float, angles), tuple(map(float, shift)))


def smooth_warp(rng: np.random.Generator, grid: Grid, amplitude_mm: float) -> sitk.DisplacementFieldTransform:
    """A smooth random displacement field: Gaussian-smoothed white noise on a 20 mm lattice covering the field of
    view with a two-node margin, scaled to ``amplitude_mm`` standard deviation per component; zero on the
    outermost nodes (trilinear interpolation between nodes)."""
    extent = np.array([grid.shape[2], grid.shape[1], grid.shape[0]]) * grid.spacing
    n = (np.ceil(extent / WARP_LATTICE_MM).astype(int) + 5)  # x, y, z nodes
    origin = np.asarray(grid.origin) - 2 * WARP_LATTICE_MM
    field = rng.standard_normal((n[2], n[1], n[0], 3))
    field = ndimage.gaussian_filter(field, sigma=(1.0, 1.0, 1.0, 0.0))
    field *= amplitude_mm / (field.std() + 1e-12)
    field[[0, -1]] = 0.0
    field[:, [0, -1]] = 0.0
    field[:, :, [0, -1]] = 0.0
    img = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    img.SetSpacing((WARP_LATTICE_MM,) * 3)
    img.SetOrigin(tuple(map(float, origin)))
    return sitk.DisplacementFieldTransform(img)


def scan_transform(rng: np.random.Generator, grid: Grid, site: SiteProfile) -> list[sitk.Transform]:
    """The scan-level part ``[R_scan, W_scan]`` of S for a scan after the pre-op one."""
    return [rigid(rng, site.rot_deg, site.shift_mm), smooth_warp(rng, grid, site.warp_mm)]


class ScanSampler:
    """Samples reference-space arrays through ``S = A o W`` for the voxels of ``grid`` (A affine, W optional warp).

    ``W(y)`` is evaluated once (ITK TransformToDisplacementField) and reused for every modality of the scan.
    """

    def __init__(self, grid: Grid, warp: sitk.Transform | None) -> None:
        self.grid = grid
        zs, ys, xs = grid.physical_axes()
        if warp is None:
            self.points = None  # y itself, built lazily per call from the axes
        else:
            ref = grid.image()
            field = sitk.TransformToDisplacementField(warp, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                                      ref.GetSpacing(), ref.GetDirection())
            disp = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3) in (x, y, z) components
            self.points = (
                xs[None, None, :] + disp[..., 0], ys[None, :, None] + disp[..., 1], zs[:, None, None] + disp[..., 2]
            )

    def sample(self, array: np.ndarray, affine: sitk.Transform | None, order: int = 1) -> np.ndarray:
        """``out(y) = array(A(W(y)))`` with trilinear (order 1) or nearest (order 0) interpolation, 0 outside."""
        g = self.grid
        if self.points is None:
            zs, ys, xs = g.physical_axes()
            px, py, pz = np.meshgrid(xs, ys, zs, indexing="ij")
            px, py, pz = px.transpose(2, 1, 0), py.transpose(2, 1, 0), pz.transpose(2, 1, 0)
        else:
            px, py, pz = self.points
        if affine is not None:
            m = np.asarray(affine.GetMatrix()).reshape(3, 3)
            c = np.asarray(affine.GetCenter())
            t = np.asarray(affine.GetTranslation())
            off = c + t - m @ c
            px, py, pz = (m[i, 0] * px + m[i, 1] * py + m[i, 2] * pz + off[i] for i in range(3))
        o = g.origin
        coords = np.stack([(pz - o[2]) / g.spacing, (py - o[1]) / g.spacing, (px - o[0]) / g.spacing]).astype(
            np.float32)
        return ndimage.map_coordinates(array.astype(np.float32, copy=False), coords, order=order, mode="constant",
                                       cval=0.0)


def affine_of(parts: list[sitk.Euler3DTransform]) -> sitk.Euler3DTransform | None:
    """Compose rigid transforms ``parts`` (applied last to first) into one Euler3DTransform (None when empty)."""
    if not parts:
        return None
    m, off = np.eye(3), np.zeros(3)
    for p in parts:  # T(p) = M_first (... (M_last p + o_last) ...) + o_first
        pm = np.asarray(p.GetMatrix()).reshape(3, 3)
        c, t = np.asarray(p.GetCenter()), np.asarray(p.GetTranslation())
        po = c + t - pm @ c
        off = m @ po + off
        m = m @ pm
    out = sitk.Euler3DTransform()
    out.SetMatrix(tuple(m.ravel()))
    out.SetTranslation(tuple(off))
    return out


def compose(parts: list[sitk.Transform]) -> sitk.CompositeTransform:
    """CompositeTransform of ``parts`` (applied last to first); an identity Euler transform when empty."""
    comp = sitk.CompositeTransform(3)
    for p in parts or [sitk.Euler3DTransform()]:
        comp.AddTransform(p)
    return comp


@dataclass
class Acquired:
    """One written image with its truth."""

    image: np.ndarray  # int16 (z, y, x), written grid
    bias: np.ndarray  # float32 (z, y, x), written grid
    support: np.ndarray | None  # bool (z, y, x): the brain mask at skull-stripping sites


def resample(array: np.ndarray, grid: Grid, transform: sitk.Transform, nearest: bool = False) -> np.ndarray:
    """Sample the reference-space ``array`` at S(y) for every voxel y of ``grid`` (linear or nearest)."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(grid.image(array.astype(np.float32)), grid.image(), transform, interp, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(out).copy()


def acquire(
    clean: np.ndarray, support_ref: np.ndarray, grid: Grid, sampler: ScanSampler, affine: sitk.Transform | None,
    site: SiteProfile, rng: np.random.Generator,
) -> Acquired:
    """Simulate the acquisition of one modality (see the module docstring).

    Parameters
    ----------
    clean:
        Clean reference-space image (relative units).
    sampler, affine:
        The scan's sampler (warp) and the rigid part of S (None = identity): S = affine o warp.
    support_ref:
        Where the image has signal in the reference space: the head (skull sites) or the brain mask (stripped sites).

    ``Acquired.support`` is the support seen through S at skull-stripping sites (the zeroed background) and None
    at skull-on sites (where it is not needed).
    """
    warped = sampler.sample(clean, affine)
    support = None if site.skull else sampler.sample(support_ref.astype(np.float32), affine, order=0) > 0.5
    bias = bias_field(rng, grid.shape, grid.spacing, site.bias_strength)
    signal = warped * bias
    low = thick_slices(signal, site.slice_axis, site.slice_thickness_mm, grid.spacing)
    low = rician(low, site.noise_sigma, rng)
    noisy = restore_slices(low, site.slice_axis, grid.shape[site.slice_axis], site.slice_thickness_mm, grid.spacing)
    out = site.intensity_scale * noisy + site.intensity_offset
    if not site.skull:
        out = np.where(support, out, 0.0)  # skull-stripped site: zero background like BraTS
    out = np.clip(np.rint(out), 0, 32767).astype(np.int16)
    return Acquired(out, bias, support)
