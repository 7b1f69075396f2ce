"""Generation settings per resolution preset and the reference grid (configuration as data).

The reference grid of every patient is the grid of its pre-op T1c: a 240 x 240 x 155 mm field of view (x, y, z;
BraTS) sampled at the preset's isotropic scan spacing, identity direction (LPS, so the NIfTI affine is
diag(-1, -1, 1) like BraTS), centred on the MNI brain. Arrays are stored in SimpleITK order (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..presets import Preset, get_preset

#: Field of view (x, y, z) in mm of every written scan (BraTS: 240 x 240 x 155 voxels of 1 mm).
FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
#: Centre (LPS, mm) of the field of view in MNI space: the MNI152 brain-mask box centre (0, 17, 5) raised 5 mm.
FOV_CENTRE_LPS: tuple[float, float, float] = (0.0, 17.0, 10.0)


@dataclass(frozen=True)
class Grid:
    """A 3-D image grid with identity direction.

    Attributes
    ----------
    shape:
        Array shape (z, y, x) in voxels.
    spacing:
        Isotropic voxel size in mm.
    origin:
        Physical (LPS, mm) position (x, y, z) of voxel index (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: float
    origin: tuple[float, float, float]

    def physical_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D physical coordinates (z, y, x) of the voxel centres along each axis: ``origin + spacing * index``."""
        return tuple(  # type: ignore[return-value]
            self.origin[2 - a] + self.spacing * np.arange(self.shape[a], dtype=np.float64) for a in range(3)
        )

    def image(self, array: np.ndarray | None = None, pixel: int = sitk.sitkFloat32) -> sitk.Image:
        """A SimpleITK image on this grid holding ``array`` (z, y, x), or zeros of type ``pixel``."""
        if array is None:
            img = sitk.Image([self.shape[2], self.shape[1], self.shape[0]], pixel)
        else:
            if tuple(array.shape) != self.shape:
                raise ValueError(f"array shape {array.shape} does not match grid shape {self.shape}")
            img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing((self.spacing,) * 3)
        img.SetOrigin(self.origin)
        img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return img

    def coarsen(self, factor: int) -> Grid:
        """The grid of ``factor``-voxel blocks (block centres), covering the same field of view."""
        if factor == 1:
            return self
        shape = tuple(-(-n // factor) for n in self.shape)
        shift = 0.5 * (factor - 1) * self.spacing
        return Grid(shape, self.spacing * factor, tuple(o + shift for o in self.origin))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SynthSettings:
    """Generator settings of one preset.

    Attributes
    ----------
    preset:
        The shared resolution preset (scan spacing).
    anatomy_resolution:
        Resolution (mm) of the nilearn MNI152 2009a templates that are deformed: 1 or 2.
    growth_factor:
        The tumour grows on the reference grid coarsened by this integer factor (growth spacing =
        factor x scan spacing).
    dt_max_days:
        Largest time step of the growth solver (the stability limit may force a smaller one).
    max_timepoints:
        Most scans written per patient (pre-op, post-op, follow-ups); later scans are not written.
    render_png:
        Whether ``strpnet synth`` draws the per-patient overview PNG by default.
    """

    preset: Preset
    anatomy_resolution: int
    growth_factor: int
    dt_max_days: float
    max_timepoints: int
    render_png: bool

    @property
    def grid(self) -> Grid:
        """The reference grid (pre-op T1c) of this preset."""
        h = self.preset.scan_spacing_mm
        shape_xyz = [int(round(f / h)) for f in FOV_MM]
        origin = tuple(c - 0.5 * (n - 1) * h for c, n in zip(FOV_CENTRE_LPS, shape_xyz))
        return Grid((shape_xyz[2], shape_xyz[1], shape_xyz[0]), h, origin)  # type: ignore[arg-type]

    @property
    def growth_grid(self) -> Grid:
        """The coarse grid the tumour grows on."""
        return self.grid.coarsen(self.growth_factor)


_SETTINGS: dict[str, tuple[int, int, float, int, bool]] = {
    # name: anatomy resolution, growth factor, dt_max, max timepoints, png by default
    "ci": (2, 1, 4.0, 3, False),  # 4 mm scans (60 x 60 x 39), growth at 4 mm
    "demo": (2, 2, 4.0, 3, True),  # 2 mm scans (120 x 120 x 78), growth at 4 mm; 3 scans keep the main job short
    "brats": (1, 2, 2.0, 6, True),  # 1 mm scans (240 x 240 x 155), growth at 2 mm
}


def get_settings(preset: str) -> SynthSettings:
    """Generator settings of ``preset`` (``ci``, ``demo`` or ``brats``); ValueError for another name."""
    p = get_preset(preset)
    if p.name not in _SETTINGS:
        raise ValueError(f"no synthetic-cohort settings for preset {preset!r}")
    res, factor, dt_max, tmax, png = _SETTINGS[p.name]
    return SynthSettings(p, res, factor, dt_max, tmax, png)
