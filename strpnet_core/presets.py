"""Resolution presets shared by the synthetic generator, preprocessing and the model (configuration as data).

- ``ci``: tiny, for tests (seconds per patient).
- ``demo``: about 2 mm, the embedded default of the simulation.
- ``brats``: 1 mm, 240 x 240 x 155 like BraTS.

The model always works on a fixed grid (``grid_shape`` voxels of ``grid_spacing_mm``) centred on the brain of the
pre-op T1c; preprocessing resamples every patient onto it once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A resolution preset.

    Attributes
    ----------
    name:
        Preset name (``ci``, ``demo`` or ``brats``).
    scan_spacing_mm:
        Isotropic voxel size of the written (raw) synthetic scans.
    grid_spacing_mm:
        Isotropic voxel size of the model grid after preprocessing.
    grid_shape:
        Model grid shape (D, H, W) in voxels; each a multiple of 16 so a 4-level encoder divides it.
    """

    name: str
    scan_spacing_mm: float
    grid_spacing_mm: float
    grid_shape: tuple[int, int, int]


PRESETS: dict[str, Preset] = {
    "ci": Preset("ci", scan_spacing_mm=4.0, grid_spacing_mm=4.0, grid_shape=(48, 48, 48)),
    "demo": Preset("demo", scan_spacing_mm=2.0, grid_spacing_mm=2.0, grid_shape=(96, 96, 96)),
    "brats": Preset("brats", scan_spacing_mm=1.0, grid_spacing_mm=2.0, grid_shape=(96, 96, 96)),
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; a clear ValueError lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
