"""Quality-control figure of one synthetic patient, drawn from the files on disk (as a user would see them).

One row per written scan; per modality three orthogonal slices (axial, coronal, sagittal) through the centroid of
the recurrence (or of the pre-op enhancing tumour when there is no recurrence). The true recurrence region is
mapped into each scan through its truth transform S (``J(y) = L(S(y))``) and drawn as a red contour.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import contract
from ..fsutil import atomic_path


def _slices(vol: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    z, y, x = centre
    # Axial (y, x), coronal (z, x), sagittal (z, y); flip so that superior is up.
    return [vol[z], vol[::-1, y, :], vol[::-1, :, x]]


def render_patient_overview(out_dir: str | os.PathLike[str], site: str, patient_id: str,
                            png_path: str | os.PathLike[str]) -> Path:
    """Draw the overview of ``patient_id`` of ``site`` in cohort folder ``out_dir`` to ``png_path``.

    Returns the path of the PNG. Intensities are shown between the 1st and 99.5th percentile of each image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    site_dir, truth_dir = out / site, out / "truth" / site / patient_id
    truth = json.loads((truth_dir / "truth.json").read_text())
    days = truth["scan_days"]
    rec_path = site_dir / contract.RECURRENCE_DIR / contract.recurrence_file_name(patient_id)
    label = sitk.ReadImage(str(rec_path), sitk.sitkFloat32) if rec_path.exists() else None
    ref = sitk.ReadImage(str(site_dir / contract.scan_dir_name(patient_id, "000")
                             / contract.scan_file_name(patient_id, "000", "t1c")))
    if label is not None and sitk.GetArrayViewFromImage(label).any():
        arr = sitk.GetArrayFromImage(label)
    else:
        arr = sitk.GetArrayFromImage(ref) > np.percentile(sitk.GetArrayViewFromImage(ref), 99.5)
    if arr.any():  # the labelled voxel nearest to the label's centroid (a shell's centroid may lie outside it)
        pts = np.argwhere(arr > 0)
        centre = tuple(int(v) for v in pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))])
    else:
        centre = tuple(s // 2 for s in arr.shape)
    n_rows, n_cols = len(days), 3 * len(contract.MODALITIES)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.7 * n_rows), squeeze=False)
    for k, day in enumerate(days):
        ttt = f"{k:03d}"
        for m, mod in enumerate(contract.MODALITIES):
            img = sitk.ReadImage(str(site_dir / contract.scan_dir_name(patient_id, ttt)
                                     / contract.scan_file_name(patient_id, ttt, mod)))
            vol = sitk.GetArrayFromImage(img).astype(np.float32)
            lo, hi = np.percentile(vol[vol > 0], [1, 99.5]) if (vol > 0).any() else (0.0, 1.0)
            cont = None
            if label is not None:
                s = sitk.ReadTransform(str(truth_dir / f"{patient_id}-{ttt}-{mod}.tfm"))
                cont = sitk.GetArrayFromImage(sitk.Resample(label, img, s, sitk.sitkLinear, 0.0))
            for o, sl in enumerate(_slices(vol, centre)):
                ax = axes[k, 3 * m + o]
                ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
                if cont is not None:
                    cs = _slices(cont, centre)[o]
                    if cs.max() >= 0.5:
                        ax.contour(cs, levels=[0.5], colors="red", linewidths=1.5)
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"{mod} {('ax', 'cor', 'sag')[o]}", fontsize=7)
            axes[k, 0].set_ylabel(f"{ttt}\nday {day}", fontsize=7)
    ev = truth["event"]
    fig.suptitle(f"{patient_id} ({site}): D_w={truth['d_white_mm2_per_day']:.2f} mm2/d, "
                 f"rho={truth['rho_per_day']:.3f}/d, {'recurrence' if ev else 'censored'} at day "
                 f"{truth['time_days']:.0f} (red: recurrence region)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    png = Path(png_path)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return png
