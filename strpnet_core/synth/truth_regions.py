"""Regions of the synthetic truth that the generator does not write as files (for accuracy measurements).

The generator writes no tissue labels, but every patient's ``truth.json`` records its anatomical deformation
(``anatomy_deformation``), from which :func:`strpnet_core.synth.anatomy.build_anatomy` rebuilds the tissue
probabilities on the reference grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk


def white_matter_probability(truth_info: dict[str, Any], preset: str) -> sitk.Image:
    """The patient's white-matter probability ``p_wm`` on the generator's reference grid of ``preset``."""
    from .anatomy import build_anatomy
    from .settings import FOV_CENTRE_LPS, get_settings

    synth = get_settings(preset)
    anat = build_anatomy(synth.grid, truth_info["anatomy_deformation"], synth.anatomy_resolution, FOV_CENTRE_LPS)
    return synth.grid.image(anat.p_wm.astype(np.float32))


#: Voxels with this much of the patient's white-matter probability count as white matter ...
WM_MIN_PROBABILITY = 0.9
#: ... unless their bias-free intensity is this far (relative) from the region's median (tumour, oedema, cavity).
WM_MAX_RELATIVE_DEVIATION = 0.2


def truth_white_matter(
    image: sitk.Image, clean: np.ndarray, brain: np.ndarray, truth_s: sitk.Transform, truth_info: dict,
    pwm_reference: sitk.Image,
) -> np.ndarray:
    """The true white-matter region of a written image (bool, the image's numpy layout).

    The generator writes no tissue labels, but it records the patient's anatomical deformation (truth.json
    ``anatomy_deformation``), from which ``strpnet_core.synth.anatomy.build_anatomy`` rebuilds the white-matter
    probability ``p_wm`` on the reference grid exactly (``pwm_reference``).  With the image's truth transform S
    (image point -> reference point), ``p_wm(S(y))`` is the WM probability at image voxel y.  WM is

        p_wm(S(y)) >= 0.9  and  y in the true brain mask  and  |S(y) - seed| >= r  and  |c(y) / median(c) - 1| < 0.2

    with r = diagnosis diameter / 2 + resection margin + 15 mm around the tumour seed (the tumour, its cavity and
    most of the oedema) and ``c = clean`` the bias-free intensity ``(I - offset) / B`` (drops what is left of
    oedema/tumour; the region is fixed from the truth only, so it does not depend on the image being scored).
    """
    pwm = sitk.GetArrayFromImage(sitk.Resample(pwm_reference, image, truth_s, sitk.sitkLinear, 0.0))
    field = sitk.TransformToDisplacementField(truth_s, sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(),
                                              image.GetSpacing(), image.GetDirection())
    idx = np.stack(np.indices(pwm.shape)[::-1], axis=-1).astype(np.float64)  # (z, y, x, [i, j, k])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    phys = (idx * np.asarray(image.GetSpacing())) @ direction.T + np.asarray(image.GetOrigin())
    mapped = phys + sitk.GetArrayFromImage(field)
    radius = truth_info["diagnosis_diameter_mm"] / 2 + truth_info["resection_margin_mm"] + 15.0
    far = np.linalg.norm(mapped - np.asarray(truth_info["seed_point_lps_mm"]), axis=-1) >= radius
    wm = (pwm >= WM_MIN_PROBABILITY) & brain & far
    if wm.any():
        wm &= np.abs(clean / np.median(clean[wm]) - 1.0) < WM_MAX_RELATIVE_DEVIATION
    return wm


def coefficient_of_variation(arr: np.ndarray, region: np.ndarray) -> float:
    """Coefficient of variation ``std / mean`` of ``arr`` over ``region``."""
    v = arr[region].astype(np.float64)
    return float(v.std() / v.mean())


@dataclass(frozen=True)
class BiasScores:
    """How well an N4 estimate matches the true bias field of one written image (see :func:`score_bias_correction`).

    ``corr``: Pearson correlation of estimated and true log-bias in the brain; ``residual_rms``: RMS of the mean-free
    difference of the two; ``true_log_std``: std of the true log-bias in the brain (near 0: a flat field, whose
    correlation means little); ``wm_voxels``: size of the true white-matter region; ``cv_clean``, ``cv_written``,
    ``cv_corrected``: white-matter coefficient of variation of the bias-free, written and corrected images (NaN
    when the region is empty).
    """

    corr: float
    residual_rms: float
    true_log_std: float
    wm_voxels: int
    cv_clean: float
    cv_written: float
    cv_corrected: float


def score_bias_correction(
    image: sitk.Image, corrected: sitk.Image, log_bias: sitk.Image, brain: np.ndarray, true_bias: np.ndarray,
    offset: float, truth_s: sitk.Transform, truth_info: dict, pwm_reference: sitk.Image,
) -> BiasScores:
    """Score an N4 result of a written image ``I`` against the generator's truth.

    With the true bias ``B`` (floored at 1e-6), the estimated log-bias ``l`` and the brain mask (bool, numpy layout):
    ``corr = corr(l, log B)`` and ``residual_rms = sqrt(mean(((l - mean l) - (log B - mean log B))^2))`` over the
    brain; the bias-free image is ``c = (I - offset) / B`` (the generator writes ``scale * B * J + offset``), the
    white-matter region is :func:`truth_white_matter` and each CV is ``std / mean`` over it.
    """
    b = np.maximum(np.asarray(true_bias, dtype=np.float64), 1e-6)
    tl = np.log(b)[brain]
    el = sitk.GetArrayFromImage(log_bias)[brain].astype(np.float64)
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    clean = (arr - float(offset)) / b
    wm = truth_white_matter(image, clean, brain, truth_s, truth_info, pwm_reference)
    n = int(wm.sum())
    cvs = [coefficient_of_variation(a, wm) if n else float("nan")
           for a in (clean, arr, sitk.GetArrayFromImage(corrected))]
    return BiasScores(
        corr=float(np.corrcoef(el, tl)[0, 1]),
        residual_rms=float(np.sqrt(np.mean(((el - el.mean()) - (tl - tl.mean())) ** 2))),
        true_log_std=float(tl.std()), wm_voxels=n, cv_clean=cvs[0], cv_written=cvs[1], cv_corrected=cvs[2],
    )
