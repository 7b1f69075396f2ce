"""Deterministic, atomic writers for NIfTI images, ITK transforms and CSV tables.

Images are written by nibabel + gzip (level 1, header time stamp 0) and ITK text transforms carry no time stamps,
so the same data give the same bytes (HDF5 ``.h5`` transforms embed time stamps and are not used).
"""

from __future__ import annotations

import os
from pathlib import Path

import gzip

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..fsutil import atomic_path, atomic_write_bytes, atomic_write_text


#: zlib level of the written NIfTI files: 1 is several times faster than 6 at a 3 % larger size.
COMPRESSION_LEVEL: int = 1


def nifti_bytes(array: np.ndarray, spacing: float, origin: tuple[float, float, float],
                slope: float | None = None) -> bytes:
    """Gzip-compressed NIfTI-1 bytes of a (z, y, x) ``array`` on an identity-direction LPS grid.

    The RAS affine is ``diag(-h, -h, h)`` with translation ``(-ox, -oy, oz)`` (qform and sform, code 1, mm), which
    SimpleITK reads back as spacing h, origin (ox, oy, oz) and identity direction. The gzip header's time stamp is 0.
    With ``slope`` the array is stored as int16 ``round(array / slope)`` with ``scl_slope = slope`` (readers get
    ``slope * stored`` back, exact for arrays on that lattice).
    """
    if slope is not None:
        array = np.round(np.asarray(array, dtype=np.float64) / slope).astype(np.int16)
    aff = np.diag([-spacing, -spacing, spacing, 1.0])
    aff[:3, 3] = (-origin[0], -origin[1], origin[2])
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm")
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    return gzip.compress(img.to_bytes(), compresslevel=COMPRESSION_LEVEL, mtime=0)


def write_array(array: np.ndarray, spacing: float, origin: tuple[float, float, float],
                path: str | os.PathLike[str], slope: float | None = None) -> None:
    """Write a (z, y, x) array on an identity-direction grid as ``.nii.gz`` atomically (see :func:`nifti_bytes`)."""
    atomic_write_bytes(path, nifti_bytes(array, spacing, origin, slope))


def write_image(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Write a SimpleITK ``image`` (identity direction, isotropic spacing) as ``.nii.gz`` atomically."""
    if tuple(image.GetDirection()) != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0):
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        return
    write_array(sitk.GetArrayViewFromImage(image), image.GetSpacing()[0], image.GetOrigin(), path)


def write_transform(transform: sitk.Transform, path: str | os.PathLike[str]) -> None:
    """Write ``transform`` as an ITK text transform (``.tfm``) atomically."""
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))


def write_csv(path: str | os.PathLike[str], header: tuple[str, ...], rows: list[tuple]) -> None:
    """Write a small CSV (comma-separated, ``\\n`` line ends, no quoting needed for our values) atomically."""
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
