"""The model grid and the one-interpolation resampling onto it."""

from __future__ import annotations

from collections.abc import Mapping
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
        # non-zero -> 1 BEFORE the cast: a cast to uint8 would turn a fractional label such as 0.6 into 0
        out = sitk.Resample(sitk.Cast(image != 0, sitk.sitkUInt8), grid, tx, sitk.sitkNearestNeighbor, 0,
                            sitk.sitkUInt8)
        return sitk.GetArrayFromImage(out).astype(np.uint8)
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def field_of_view_on_grid(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """1 where a grid voxel maps (through ``transform``, as in :func:`resample_to_grid`) inside ``image``'s field of
    view, 0 where it falls outside (uint8, (D, H, W)): there ``resample_to_grid`` returns 0, not a measurement."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return resample_to_grid(ones, grid, transform, label=True)


def displacement_field_on_grid(transform: sitk.Transform, grid: sitk.Image) -> sitk.DisplacementFieldTransform:
    """``transform`` tabulated on ``grid``'s voxel centres: ``u(x) = T(x) - x`` stored as a displacement field
    (float64), wrapped as a transform ``x -> x + u(x)``.

    At a voxel centre of ``grid`` the field's linear interpolation returns the stored node value, so the returned
    transform equals ``T`` there (to float64 rounding) and resampling onto ``grid`` through it is the same single
    interpolation of the moving image as through ``T`` itself.  Worth it when ``T`` is expensive to evaluate (a
    composite holding B-splines: ~64 control-point weights per point and level) and several images are resampled
    onto the same grid: ``T`` is evaluated once per grid voxel instead of once per voxel and image.  Between
    voxel centres or outside ``grid`` it is only an approximation of ``T`` (zero displacement outside): use ``T``
    itself for anything not evaluated on ``grid``'s voxel centres.
    """
    field = sitk.TransformToDisplacementFieldFilter()
    field.SetReferenceImage(grid)
    field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field.Execute(transform))


def resample_mask_like(mask: sitk.Image, like: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """Nearest-neighbour resampling of a binary mask onto ``like``'s grid (uint8, 0 outside)."""
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), like, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


#: Largest / smallest voxel spacing of a scan above which :func:`isotropic_copy` resamples it (registration works
#: on the copy: its pyramids shrink every axis by one factor, see docs/preprocessing.md,
#: "Anisotropic scans and oblique grids").
ANISOTROPY_LIMIT = 1.5
#: Finest spacing of an isotropic copy (mm): no registration stage here fits on levels finer than ~4 mm, and a
#: 0.45 x 0.45 x 5 mm 2D scan copied at 0.45 mm would hold ~11x the voxels of the original (350 MB per image).
ISOTROPIC_MIN_SPACING_MM = 1.0


def isotropic_copy(image: sitk.Image, *, mask: bool = False) -> sitk.Image:
    """``image`` on an isotropic grid of spacing ``s = max(min_a h_a, 1 mm)`` when its spacings differ by more
    than :data:`ANISOTROPY_LIMIT` (``max_a h_a > 1.5 min_a h_a``); otherwise ``image`` itself, untouched.

    The copy covers the same box: spacing ``s`` (:data:`ISOTROPIC_MIN_SPACING_MM` at least),
    size ``n'_a = max(1, round(n_a h_a / s))`` and first
    voxel centre ``o' = o + D ((s - h_a) / 2)_a`` (``o``, ``D``: origin and direction; the box of axis ``a`` is
    ``[-h_a / 2, (n_a - 1/2) h_a]`` in index-aligned mm).  Images: cubic B-spline interpolation, float32; masks
    (``mask=True``): nearest neighbour, uint8 0/1.  A transform estimated on copies applies unchanged to the
    originals (both live in the same physical space).
    """
    h = np.asarray(image.GetSpacing(), dtype=float)
    if h.max() <= ANISOTROPY_LIMIT * h.min():
        return image
    s = max(float(h.min()), ISOTROPIC_MIN_SPACING_MM)
    size = [max(1, int(round(n * sp / s))) for n, sp in zip(image.GetSize(), h)]
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float) + direction @ ((s - h) / 2.0)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([s] * 3)
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(image.GetDirection())
    if mask:
        return resample_mask_like(image, grid)
    return sitk.Resample(image, grid, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)


def grid_from_geometry(geometry: Mapping[str, Any]) -> tuple[sitk.Image, sitk.Image]:
    """The (empty) model grid and pre-op T1c reference images described by a ``CachedPatient.geometry``.

    Returns
    -------
    (grid, reference):
        uint8 images with the stored origin, spacing, direction and size (ITK conventions, LPS, x, y, z order).

    Raises
    ------
    ValueError
        When a key of :func:`grid_geometry` is missing or malformed (named).
    """
    images = []
    for prefix in ("grid", "reference"):
        try:
            size = [int(s) for s in geometry[f"{prefix}_size"]]
            origin = [float(v) for v in geometry[f"{prefix}_origin"]]
            spacing = [float(v) for v in geometry[f"{prefix}_spacing"]]
            direction = [float(v) for v in geometry[f"{prefix}_direction"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"geometry: missing or malformed {prefix}_* entries ({type(exc).__name__}: {exc})") from None
        if len(size) != 3 or len(origin) != 3 or len(spacing) != 3 or len(direction) != 9 or min(size) < 1:
            raise ValueError(f"geometry: {prefix}_* entries are not those of a 3D image: size {size}, "
                             f"origin {origin}, spacing {spacing}, direction {direction}")
        img = sitk.Image(size, sitk.sitkUInt8)
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        images.append(img)
    return images[0], images[1]


def same_geometry(a: sitk.Image, b: sitk.Image, *, tol: float = 1e-4) -> str | None:
    """None when ``a`` and ``b`` share size, origin, spacing and direction (within ``tol`` mm / cosine), else a
    one-line description of the first difference."""
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        return f"size {a.GetSize()} != {b.GetSize()}"
    for name in ("Origin", "Spacing", "Direction"):
        va, vb = np.asarray(getattr(a, f"Get{name}")()), np.asarray(getattr(b, f"Get{name}")())
        if va.shape != vb.shape or np.max(np.abs(va - vb)) > tol:
            return f"{name.lower()} {tuple(np.round(va, 5))} != {tuple(np.round(vb, 5))}"
    return None


def resample_from_grid(
    values: np.ndarray, geometry: Mapping[str, Any], reference: sitk.Image | None = None, *, label: bool = False
) -> sitk.Image:
    """Map an array on the model grid back into the pre-op T1c space: the inverse of :func:`resample_to_grid` with
    the identity transform (the pre-op T1c is the reference space; the model grid is a crop/resample of it).

    With ``G`` the model grid's index-to-physical map and ``y`` a voxel centre of the reference::

        out(y) = interp(values, G^{-1}(y))   if G^{-1}(y) lies inside the grid's extent, else 0

    (linear interpolation, float32; nearest neighbour and uint8 for ``label``).  The grid's extent is its voxels
    including their half-voxel borders (ITK's buffer test), so reference voxels outside the crop get 0.  When grid
    and reference share spacing and direction (the :func:`model_grid` origin is snapped to reference voxels), every
    grid voxel is a reference voxel and the mapping is exact there: ``resample_to_grid(out, grid) == values``.

    Parameters
    ----------
    values:
        Array (D, H, W) = the grid's (z, y, x) size.
    geometry:
        ``CachedPatient.geometry`` (:func:`grid_geometry`).
    reference:
        The pre-op T1c image (its geometry is used; it must agree with the stored reference geometry) or None to
        use the stored reference geometry.
    label:
        Nearest neighbour for masks/labels.

    Returns
    -------
    sitk.Image
        On the reference's grid (same size, origin, spacing, direction).

    Raises
    ------
    ValueError
        ``values`` does not have the grid's shape, or ``reference`` differs from the stored reference geometry.
    """
    grid, stored_ref = grid_from_geometry(geometry)
    shape = tuple(int(s) for s in grid.GetSize()[::-1])
    arr = np.asarray(values)
    if arr.shape != shape:
        raise ValueError(f"resample_from_grid: values have shape {arr.shape}, the model grid is {shape} (D, H, W)")
    if reference is None:
        reference = stored_ref
    elif (diff := same_geometry(reference, stored_ref)) is not None:
        raise ValueError(f"resample_from_grid: the reference image differs from the geometry the cache was built "
                         f"on: {diff}")
    img = sitk.GetImageFromArray(arr.astype(np.uint8 if label else np.float32, copy=False))
    img.CopyInformation(grid)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    if label:
        return sitk.Resample(img, reference, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Resample(img, reference, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
