"""The model grid and the one-interpolation resampling onto it."""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk


def model_grid(
    reference: sitk.Image, brain_mask: sitk.Image, spacing_mm: float, shape_dhw: tuple[int, int, int]
) -> sitk.Image:
    """An empty image defining the model grid.

    The grid has ``shape_dhw`` voxels (numpy D, H, W order = ITK z, y, x) of isotropic ``spacing_mm``, the
    direction cosines of ``reference`` (the pre-op T1c) and is centred on the centre ``c`` of the bounding box of
    ``brain_mask`` (in ``reference``'s physical space)::

        origin = c - D @ (spacing * (size - 1) / 2)

    with ``D`` the direction matrix and ``size`` in x, y, z order; the origin is then snapped to the nearest voxel
    centre of ``reference`` (continuous index rounded), so that with equal spacing and direction the grid's voxels
    ARE reference voxels and labels map back and forth exactly (the centre moves by at most half a voxel).

    Raises
    ------
    ValueError
        When the brain mask is empty.
    """
    arr = sitk.GetArrayViewFromImage(brain_mask)
    nz = np.argwhere(arr > 0)
    if len(nz) == 0:
        raise ValueError("model_grid: empty pre-op brain mask")
    lo, hi = nz.min(axis=0), nz.max(axis=0)  # z, y, x indices
    centre_idx = ((lo + hi) / 2.0)[::-1]  # x, y, z continuous index
    centre = np.asarray(brain_mask.TransformContinuousIndexToPhysicalPoint(centre_idx.tolist()))
    size = [int(s) for s in shape_dhw[::-1]]
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    half = spacing_mm * (np.asarray(size) - 1) / 2.0
    origin = centre - direction @ half
    snapped = np.round(reference.TransformPhysicalPointToContinuousIndex(origin.tolist()))
    origin = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(snapped.tolist()))
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def grid_geometry(grid: sitk.Image, reference: sitk.Image) -> dict[str, Any]:
    """The ``CachedPatient.geometry`` dictionary (ITK conventions, LPS, sizes in x, y, z order)."""
    return {
        "grid_origin": list(grid.GetOrigin()),
        "grid_spacing": list(grid.GetSpacing()),
        "grid_direction": list(grid.GetDirection()),
        "grid_size": list(grid.GetSize()),
        "reference_origin": list(reference.GetOrigin()),
        "reference_spacing": list(reference.GetSpacing()),
        "reference_direction": list(reference.GetDirection()),
        "reference_size": list(reference.GetSize()),
    }


def resample_to_grid(
    image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None, *, label: bool = False
) -> np.ndarray:
    """Resample ``image`` onto ``grid`` in one interpolation: ``out(x) = image(T(x))`` for grid points ``x``
    (``T`` maps the grid's/pre-op space to ``image``'s space; identity when None).

    Linear interpolation for images (float32 output), nearest neighbour for masks/labels (uint8 output);
    0 outside the image.  Returns a numpy array (D, H, W).
    """
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    if label:
        out = sitk.Resample(image, grid, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return (sitk.GetArrayFromImage(out) > 0).astype(np.uint8)
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def resample_mask_like(mask: sitk.Image, like: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """Nearest-neighbour resampling of a binary mask onto ``like``'s grid (uint8, 0 outside)."""
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), like, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
