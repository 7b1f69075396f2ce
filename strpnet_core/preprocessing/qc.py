"""Quality control: flagging failed registrations and the per-patient QC figure."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from ..fsutil import atomic_write_bytes

#: Mattes MI (negated) above this after registration means essentially no shared information.
MAX_METRIC = -0.05
#: Robust z-score above which a registration's final metric is "far worse" than its peers'.
ROBUST_Z_LIMIT = 3.0
#: Minimum Dice between the pre-op brain mask and a registered scan's brain mask.
MIN_MASK_DICE = 0.85


def robust_z(values: Sequence[float]) -> np.ndarray:
    """Robust z-scores ``z_i = (v_i - median(v)) / s`` with ``s = max(1.4826 MAD(v), 0.2 |median(v)|, 1e-3)``.

    The floor on ``s`` keeps a near-identical set of values (MAD ~ 0) from flagging ordinary differences (the
    anatomy changes between scans: tumour, resection): with the default limit of 3, a registration is flagged only
    when it lost more than 60 % of the median mutual information.
    Median and MAD are taken over the finite values only (a diverged registration's NaN must not blind the check
    for the others; its own z is NaN, and :func:`metric_flags` flags it as not finite). Fewer than 3 finite values:
    all zeros (no peer group).
    """
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size < 3:
        return np.zeros_like(v)
    med = float(np.median(finite))
    mad = float(np.median(np.abs(finite - med)))
    s = max(1.4826 * mad, 0.2 * abs(med), 1e-3)
    return (v - med) / s


def metric_flags(metric: float, peers: Sequence[float], index: int) -> list[str]:
    """Reasons to distrust a registration with final (comparable) metric ``metric`` = ``peers[index]``:
    not finite, above :data:`MAX_METRIC`, or robust z-score above :data:`ROBUST_Z_LIMIT` among ``peers``
    (lower Mattes metric = better, so only positive z counts)."""
    flags = []
    if not np.isfinite(metric):
        flags.append(f"final metric not finite ({metric})")
        return flags
    if metric > MAX_METRIC:
        flags.append(f"final metric {metric:.3f} > {MAX_METRIC} (no shared information)")
    z = robust_z(peers)
    if z.size and z[index] > ROBUST_Z_LIMIT:
        flags.append(f"final metric {metric:.3f} far worse than the patient's other registrations (robust z {z[index]:.1f})")
    return flags


#: Within one session, modalities move little: a larger rigid correction means the registration diverged.
MAX_INTRA_ROTATION_DEG = 20.0
MAX_INTRA_TRANSLATION_MM = 30.0


def rigid_flags(angles_rad: Sequence[float], translation_mm: Sequence[float]) -> list[str]:
    """Flags for a within-scan rigid correction larger than :data:`MAX_INTRA_ROTATION_DEG` (any Euler angle) or
    :data:`MAX_INTRA_TRANSLATION_MM` (translation norm)."""
    flags = []
    deg = float(np.degrees(np.max(np.abs(angles_rad))))
    mm = float(np.linalg.norm(translation_mm))
    if deg > MAX_INTRA_ROTATION_DEG:
        flags.append(f"rigid rotation {deg:.1f} deg > {MAX_INTRA_ROTATION_DEG} deg")
    if mm > MAX_INTRA_TRANSLATION_MM:
        flags.append(f"rigid translation {mm:.1f} mm > {MAX_INTRA_TRANSLATION_MM} mm")
    return flags


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2 |A ∩ B| / (|A| + |B|)`` of two binary arrays (1.0 when both are empty)."""
    a, b = a > 0, b > 0
    den = int(a.sum()) + int(b.sum())
    return 1.0 if den == 0 else 2.0 * int((a & b).sum()) / den


def write_qc_png(
    path: str | os.PathLike[str],
    images: np.ndarray,
    brain_mask: np.ndarray,
    timepoints: Sequence[str],
    title: str,
) -> None:
    """QC figure: for each timepoint, the registered T1c (mid axial and coronal slices of the model grid) with the
    pre-op T1c's edges (gradient-magnitude contour, red) and the pre-op brain-mask outline (cyan) drawn over it.

    ``images``: (T, 4, D, H, W) on the model grid; the T1c is channel 1.  Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    t1c = np.asarray(images[:, 1], dtype=np.float32)
    n = t1c.shape[0]
    zc, yc = t1c.shape[1] // 2, t1c.shape[2] // 2
    ref = t1c[0]
    edges = ndimage.gaussian_gradient_magnitude(ref, 1.0)
    inside = edges[brain_mask > 0]
    level = float(np.percentile(inside, 85)) if inside.size else 1.0
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 4.8), squeeze=False)
    for k in range(n):
        for row, (img, e, m) in enumerate(
            ((t1c[k, zc], edges[zc], brain_mask[zc]), (t1c[k, :, yc], edges[:, yc], brain_mask[:, yc]))
        ):
            ax = axes[row, k]
            ax.imshow(img, cmap="gray", vmin=-2.5, vmax=2.5, origin="lower")
            ax.contour(e, levels=[level], colors="r", linewidths=0.4)
            ax.contour(m, levels=[0.5], colors="c", linewidths=0.5)
            ax.set_axis_off()
        axes[0, k].set_title(f"t{timepoints[k]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
