"""Inference for one new patient: raw longitudinal folder + trained model -> recurrence map in the patient's own
pre-op T1c geometry, binary map, risk score and its percentile, overview figure (``strpnet predict``).

Steps::

    validate the folder (strpnet_core.site, no outcomes needed) -> preprocess with the model's preset
    (strpnet_core.preprocessing, cached: a second run skips it) -> STRPNet on the model grid (CUDA when available,
    autocast as in training) -> p = sigmoid(logits) * brain mask (model grid)
    -> P(y) = linear interpolation of p at the model-grid position of each pre-op T1c voxel y, 0 outside the grid
       (preprocessing.resample.resample_from_grid: the inverse of the crop/resample onto the model grid)
    -> OUT/<id>-recurrence-prob.nii.gz (float32), OUT/<id>-recurrence-mask.nii.gz (uint8, P > threshold),
       both with the pre-op T1c's header (affine, qform/sform, shape), OUT/<id>-prediction.json, OUT/<id>-overview.png

Threshold: the binary map is ``P > 0.5`` by default: the same cut as the federated Dice (``training.evaluate_model``:
``sigmoid(logit) > 0.5`` inside the brain). The evaluation's other measure, coverage at the true recurrence volume
(``metrics.iso_volume_coverage``), needs the true volume and cannot set a threshold for a new patient.

Percentile: the risk score's position among the training patients' risks of the federated run (``risk_reference.json``
next to the model, pooled quantiles only; ``strpnet_core.risk_reference``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .contract import MODALITIES, REFERENCE_MODALITY
from .fsutil import atomic_path, atomic_write_bytes, atomic_write_json, private_dir

log = logging.getLogger(__name__)

#: Default probability threshold of the binary map (``P > threshold``), the cut of the federated Dice.
DEFAULT_THRESHOLD = 0.5
PROB_SUFFIX = "-recurrence-prob.nii.gz"
MASK_SUFFIX = "-recurrence-mask.nii.gz"
JSON_SUFFIX = "-prediction.json"
PNG_SUFFIX = "-overview.png"
#: Sub-folder of OUT_DIR holding the preprocessed cache file and its QC (reused by a second run).
CACHE_SUBDIR = "preprocessed"

__all__ = [
    "DEFAULT_THRESHOLD",
    "PredictError",
    "PredictionResult",
    "file_sha256",
    "load_prediction_model",
    "map_to_reference",
    "predict_patient",
    "resolve_preset",
    "run_model",
    "select_patient",
    "write_nifti_like",
]


class PredictError(ValueError):
    """A prediction that cannot be made: names the file or value and the reason."""


@dataclass
class PredictionResult:
    """What :func:`predict_patient` wrote and found.

    Attributes
    ----------
    patient_id:
        The patient predicted.
    prob_path, mask_path, json_path, png_path:
        The four outputs.
    risk:
        Log-hazard risk score (higher = earlier recurrence).
    percentile:
        Percentile of ``risk`` among the training sites' patients (None without a reference).
    threshold:
        Threshold of the binary map.
    summary:
        The content of the JSON file.
    """

    patient_id: str
    prob_path: Path
    mask_path: Path
    json_path: Path
    png_path: Path
    risk: float
    percentile: float | None
    threshold: float
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------
def select_patient(
    patient_dir: str | os.PathLike[str], patient_id: str | None = None
) -> tuple[Any, str, list[str]]:
    """Validate a raw folder in the site layout (``docs/data-format.md``; outcomes not needed) and return the
    patient to predict, the folder's site name and the validation problems that concern the patient (a dropped
    follow-up scan, warnings), each naming its file; they are also logged as warnings.

    Parameters
    ----------
    patient_dir:
        A folder with the patient's scan folders ``<id>-<ttt>/`` and ``scan_dates.csv`` (a site folder holding one
        patient, or several with ``patient_id``).
    patient_id:
        Which patient, when the folder holds several.

    Returns
    -------
    (record, site_name, problems):
        The ``strpnet_core.site.PatientRecord`` (intact scans only), the site name and the patient's problems
        (``"<file>: <reason>"``, site-level ones included).

    Raises
    ------
    PredictError
        No usable patient (every problem listed, each naming its file and reason), an unknown ``patient_id``, or
        several patients and no ``patient_id``.
    """
    from .site import validate_site

    folder = Path(patient_dir)
    index = validate_site(folder, require_outcomes=False, check_voxels=True)
    problems = [str(p) for p in index.problems if patient_id is None or p.patient_id in (None, patient_id)]
    usable = {r.patient_id: r for r in index.patients}
    if patient_id is not None and patient_id not in usable:
        why = "; ".join(problems) if patient_id in index.excluded else f"no scan folder of patient {patient_id}"
        raise PredictError(f"{folder}: patient {patient_id} is not usable: {why}")
    if not usable:
        detail = "; ".join(problems) if problems else "no scan folder <patient>-<ttt>/"
        raise PredictError(f"{folder}: no usable patient: {detail}")
    if patient_id is None and len(usable) > 1:
        raise PredictError(f"{folder} holds {len(usable)} patients ({', '.join(sorted(usable))}): choose one with "
                           f"--patient")
    record = usable[patient_id] if patient_id is not None else next(iter(usable.values()))
    for p in problems:
        log.warning("%s: %s", folder, p)
    return record, index.site_name, problems


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_prediction_model(model_path: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]]:
    """``training.load_trained_model`` with a :class:`PredictError` naming the file on failure."""
    from .training import load_trained_model

    path = Path(model_path)
    if not path.is_file():
        raise PredictError(f"--model: {path} does not exist or is not a file")
    try:
        return load_trained_model(path)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise PredictError(f"--model: {path}: {exc}") from None


def resolve_preset(model_path: str | os.PathLike[str], payload: dict[str, Any], preset: str | None = None) -> str:
    """The resolution preset the model was trained with (preprocessing must match it).

    Looked up in order: ``preset`` (explicit), the model file's ``info["preset"]``, the run's ``summary.json`` next
    to the model (``config.preset`` of a federated run), the preset recorded in the first cache file of
    ``info["train_cache"]`` (``strpnet train``).

    Raises
    ------
    PredictError
        Unknown preset, or none found (asks for ``--preset``).
    """
    from .presets import PRESETS

    found, where = preset, "--preset"
    info = payload.get("info") if isinstance(payload.get("info"), dict) else {}
    if found is None and info.get("preset"):
        found, where = str(info["preset"]), f"{model_path} (info.preset)"
    summary = Path(model_path).parent / "summary.json"
    if found is None and summary.is_file():
        try:
            found = json.loads(summary.read_text(encoding="utf-8"))["config"]["preset"]
            where = str(summary)
        except (OSError, ValueError, KeyError, TypeError):
            found = None
    if found is None:
        from .cache import cache_preset

        for cache_dir in info.get("train_cache", []) or []:
            found = cache_preset(cache_dir) if Path(cache_dir).is_dir() else None
            if found:
                where = str(cache_dir)
                break
    if not found:
        caches = info.get("train_cache") or []
        raise PredictError(f"{model_path}: cannot tell which resolution preset the model was trained with "
                           f"(no summary.json beside it; "
                           + (f"its training cache {', '.join(map(str, caches))} not found or without a preset"
                              if caches else "no training cache recorded") + "); give --preset "
                           f"{'|'.join(PRESETS)}")
    if found not in PRESETS:
        raise PredictError(f"preset {found!r} from {where} is not one of {', '.join(PRESETS)}")
    return str(found)


def prepare_patient(record: Any, site_name: str, cache_dir: str | os.PathLike[str], preset: str, seed: int) -> Any:
    """Preprocess ``record`` into ``cache_dir`` unless a cache file with the same settings is already there;
    return the :class:`~strpnet_core.cache.CachedPatient`.

    Raises
    ------
    PredictError
        Preprocessing failed (the message names the patient, scan, modality, file and step).
    """
    from .cache import cache_path, load_cached_patient
    from .preprocessing.pipeline import PipelineSettings, is_done, preprocess_patient

    settings = PipelineSettings.from_preset(preset)
    if not is_done(cache_dir, record, settings.hash(seed)):
        log.info("preprocessing patient %s (preset %s)", record.patient_id, preset)
        res = preprocess_patient(record, site_name=site_name, out_dir=cache_dir, preset=settings, seed=seed)
        if res.status != "ok":
            raise PredictError(f"preprocessing failed: {res.error}")
    try:
        return load_cached_patient(cache_path(cache_dir, record.patient_id))
    except ValueError as exc:
        raise PredictError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------------------
# model and geometry
# ----------------------------------------------------------------------------------------------------------------------
def run_model(model: Any, train_cfg: Any, patient: Any, device: str = "auto") -> tuple[np.ndarray, float, str]:
    """Run ``model`` on one cached patient.

    Returns
    -------
    (prob, risk, where):
        ``sigmoid(logits) * brain_mask`` on the model grid (float32, D, H, W), the risk score and a description of
        the device and precision used.

    Raises
    ------
    PredictError
        The device cannot be used, or the model does not fit the patient's grid.
    """
    from .dataset import collate_patients, patient_to_item
    from .training import predict_batch, select_autocast, select_device

    try:
        dev = select_device(device)
    except ValueError as exc:
        raise PredictError(f"--device: {exc}") from None
    cfg = train_cfg
    try:
        enabled, dtype = select_autocast(dev, cfg.precision)
    except ValueError:  # e.g. fp16 training on a GPU, inference on a CPU
        cfg = dataclasses.replace(cfg, precision="auto")
        enabled, dtype = select_autocast(dev, cfg.precision)
    model.to(dev)
    batch = collate_patients([patient_to_item(patient)])
    try:
        probs, risk = predict_batch(model, batch, cfg)
    except ValueError as exc:
        raise PredictError(f"the model cannot run on patient {patient.patient_id}'s grid: {exc}") from None
    prob = probs[0, 0].numpy().astype(np.float32) * (np.asarray(patient.brain_mask) > 0)
    where = f"{dev} ({'autocast ' + str(dtype).replace('torch.', '') if enabled else 'fp32'})"
    return prob.astype(np.float32), float(risk[0]), where


def map_to_reference(values: np.ndarray, patient: Any, reference: Any, *, label: bool = False) -> Any:
    """``values`` on the model grid -> a SimpleITK image on the pre-op T1c's own grid
    (``preprocessing.resample.resample_from_grid``; linear, 0 outside the model grid).

    Parameters
    ----------
    values:
        (D, H, W) array on the patient's model grid.
    patient:
        The :class:`~strpnet_core.cache.CachedPatient` (its ``geometry``).
    reference:
        The pre-op T1c: a SimpleITK image or its file.

    Raises
    ------
    PredictError
        The T1c differs from the geometry the cache was built on (a stale cache of another scan).
    """
    import SimpleITK as sitk

    from .preprocessing.resample import resample_from_grid

    ref = reference if isinstance(reference, sitk.Image) else sitk.ReadImage(str(reference))
    try:
        return resample_from_grid(values, patient.geometry, ref, label=label)
    except ValueError as exc:
        raise PredictError(f"patient {patient.patient_id}: {exc} (a cache file of another scan? delete it from the "
                           f"cache folder and run again)") from None


def write_nifti_like(array_zyx: np.ndarray, like_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     dtype: Any, description: str = "") -> Path:
    """Write ``array_zyx`` (SimpleITK/numpy order z, y, x of ``like_path``'s voxels) as NIfTI with the header of
    ``like_path`` (same shape, affine, qform and sform codes; data type ``dtype``, no intensity scaling), atomically.

    Any viewer then places every voxel exactly where it places the corresponding voxel of ``like_path``.

    Raises
    ------
    PredictError
        ``array_zyx`` does not have ``like_path``'s shape.
    """
    import nibabel as nib

    like = nib.load(str(like_path))
    data = np.asarray(array_zyx).transpose(2, 1, 0).astype(dtype)
    if data.shape != tuple(like.shape[:3]) or len(like.shape) != 3:
        raise PredictError(f"{like_path}: shape {like.shape} does not match the map's {data.shape}")
    header = like.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0.0, 0.0
    header["descrip"] = description.encode("ascii", "replace")[:79]
    img = type(like)(data, None, header=header)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
    return out_path


# ----------------------------------------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------------------------------------
def _oriented(img: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Array (z, y, x) of ``img`` reoriented to LPS (x to the patient's left, y posterior, z superior) and its
    spacing (x, y, z)."""
    import SimpleITK as sitk

    o = sitk.DICOMOrient(img, "LPS")
    return sitk.GetArrayFromImage(o), tuple(float(s) for s in o.GetSpacing())


def write_overview_png(path: str | os.PathLike[str], backgrounds: list[tuple[str, Any]], prob: Any,
                       threshold: float, title: str) -> Path:
    """Orthogonal slices (axial, coronal, sagittal) through the map's maximum: one row per background image with
    the probability map overlaid (hot colours, transparent below min(0.25, threshold / 2)) and the threshold
    contour (cyan).

    All images share the pre-op T1c's grid; they are reoriented to LPS and shown in radiological convention (the
    patient's right on the left), with the physical aspect ratio. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gray = plt.get_cmap("gray").with_extremes(bad="black")
    display_floor = min(0.25, threshold / 2)
    p, (sx, sy, sz) = _oriented(prob)
    k, j, i = np.unravel_index(int(np.argmax(p)), p.shape) if p.max() > 0 else tuple(n // 2 for n in p.shape)
    views = (("axial", lambda a: a[k], sy / sx, "upper"),
             ("coronal", lambda a: a[:, j, :], sz / sx, "lower"),
             ("sagittal", lambda a: a[:, :, i], sz / sy, "lower"))
    fig, axes = plt.subplots(len(backgrounds), 3, figsize=(9.0, 3.0 * len(backgrounds) + 0.4), squeeze=False)
    im = None
    for r, (name, img) in enumerate(backgrounds):
        a, _ = _oriented(img)
        inside = a[a != 0]
        lo, hi = (np.percentile(inside, [1, 99]) if inside.size else (0.0, 1.0))
        for c, (view, cut, aspect, origin) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(np.ma.masked_equal(cut(a), 0), cmap=gray, vmin=lo, vmax=hi if hi > lo else lo + 1,
                      aspect=aspect, origin=origin, interpolation="nearest")
            pm = np.ma.masked_less(cut(p), display_floor)
            im = ax.imshow(pm, cmap="hot", vmin=0.0, vmax=1.0, alpha=0.55, aspect=aspect, origin=origin,
                           interpolation="nearest")
            if float(cut(p).max()) > threshold:  # contour's row 0 is y = 0 whatever imshow's origin
                ax.contour(cut(p), levels=[threshold], colors="c", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="recurrence probability")
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------------
# the whole prediction
# ----------------------------------------------------------------------------------------------------------------------
def predict_patient(
    patient_dir: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    device: str = "auto",
    risk_reference: str | os.PathLike[str] | None = None,
    patient_id: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> PredictionResult:
    """Predict one patient and write the four outputs (see the module docstring).

    Parameters
    ----------
    patient_dir:
        Raw folder in the site layout holding the patient (see :func:`select_patient`).
    model_path:
        A ``strpnet-fed-model/1`` file (``final_model.pt`` of ``strpnet train`` or of a federated run).
    out_dir:
        Output folder (created).
    threshold:
        Binary map = probability > ``threshold``; in (0, 1).
    device:
        "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    risk_reference:
        A ``risk_reference.json``; default: the one next to the model, if any (else no percentile).
    patient_id:
        The patient, when ``patient_dir`` holds several.
    preset:
        Resolution preset (default: the model's; :func:`resolve_preset`).
    seed:
        Preprocessing seed (registration sampling).
    cache_dir:
        Where the preprocessed cache file goes (default ``OUT_DIR/preprocessed``); a file there with the same
        settings is reused.
    force:
        Replace this patient's outputs of an earlier prediction in ``out_dir`` (refused otherwise). Its JSON, which
        names the model, goes first: an interrupted run leaves no JSON describing maps of another model.

    Returns
    -------
    PredictionResult

    Raises
    ------
    PredictError
        Any input that cannot be used (bad folder, model, preset, device, reference or threshold), naming it.
    """
    import SimpleITK as sitk

    from .federation import RISK_HIST_MIN_PATIENTS
    from .risk_reference import RISK_REFERENCE_JSON, load_risk_reference, percentile_of

    t0 = time.perf_counter()
    if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) < 1.0):
        raise PredictError(f"--threshold must be in (0, 1), got {threshold!r}")
    threshold = float(threshold)
    model_path = Path(model_path)
    model, train_cfg, payload = load_prediction_model(model_path)
    preset = resolve_preset(model_path, payload, preset)
    ref_path = Path(risk_reference) if risk_reference is not None else model_path.parent / RISK_REFERENCE_JSON
    reference = None
    if risk_reference is not None or ref_path.is_file():
        if not ref_path.is_file():
            raise PredictError(f"--risk-reference: {ref_path} does not exist")
        try:
            reference = load_risk_reference(ref_path)
        except ValueError as exc:
            raise PredictError(f"--risk-reference: {exc}") from None

    record, site_name, problems = select_patient(patient_dir, patient_id)
    pid = record.patient_id
    out = Path(out_dir)
    earlier = [out / f"{pid}{suffix}" for suffix in (JSON_SUFFIX, PROB_SUFFIX, MASK_SUFFIX, PNG_SUFFIX)
               if (out / f"{pid}{suffix}").exists()]
    if earlier and not force:
        raise PredictError(f"--out: {earlier[0]} exists (an earlier prediction of {pid}); use --force to replace it")
    for path in earlier:
        path.unlink()
    if (warning := private_dir(out)) is not None:
        log.warning("%s", warning)
    cached = prepare_patient(record, site_name, Path(cache_dir) if cache_dir else out / CACHE_SUBDIR, preset, seed)
    prob_grid, risk, where = run_model(model, train_cfg, cached, device)

    t1c_path = Path(record.scans[0].images[REFERENCE_MODALITY])
    t1c = sitk.ReadImage(str(t1c_path))
    prob_img = map_to_reference(prob_grid, cached, t1c)
    prob = np.clip(sitk.GetArrayFromImage(prob_img), 0.0, 1.0).astype(np.float32)
    mask = (prob > threshold).astype(np.uint8)
    prob_path = write_nifti_like(prob, t1c_path, out / f"{pid}{PROB_SUFFIX}", np.float32,
                                 "strpnet recurrence probability")
    mask_path = write_nifti_like(mask, t1c_path, out / f"{pid}{MASK_SUFFIX}", np.uint8,
                                 f"strpnet recurrence prob > {threshold:g}")

    # Figure: the latest scan's T1c and FLAIR (registered, on the model grid) mapped back like the map.
    last = cached.num_timepoints - 1
    backgrounds = []
    for m in (REFERENCE_MODALITY, "t2f"):
        img = map_to_reference(np.asarray(cached.images[last, MODALITIES.index(m)], dtype=np.float32), cached, t1c)
        backgrounds.append((f"{m.upper()} scan {cached.timepoints[last]} (day {float(cached.days[last]):g})", img))
    prob_disp = sitk.GetImageFromArray(prob)
    prob_disp.CopyInformation(prob_img)
    png_path = write_overview_png(out / f"{pid}{PNG_SUFFIX}", backgrounds, prob_disp, threshold,
                                  f"{pid}: recurrence probability (cyan: > {threshold:g}), risk {risk:.3f}")

    percentile = None if reference is None else percentile_of(risk, reference)
    spacing = np.asarray(prob_img.GetSpacing(), dtype=np.float64)
    ijk_max = [int(v) for v in np.unravel_index(int(np.argmax(prob)), prob.shape)[::-1]]
    summary: dict[str, Any] = {
        "patient_id": pid,
        "patient_dir": str(Path(patient_dir)),
        "reference_image": str(t1c_path),
        "timepoints": list(cached.timepoints),
        "days": [float(d) for d in cached.days],
        "excluded_scans": cached.meta.get("excluded_scans", {}),
        "validation_problems": problems,
        "model_file": str(model_path),
        "model_sha256": file_sha256(model_path),
        "model_server_round": payload.get("server_round"),
        "preset": preset,
        "preprocessing_settings_hash": cached.meta.get("settings_hash"),
        "device": where,
        "risk_score": risk,
        "risk_score_meaning": "Cox log-hazard of the model: higher = earlier recurrence; comparable between patients "
                              "of the same model only",
        "risk_percentile": percentile,
        "risk_percentile_note": (
            f"percentile among {reference.n_patients} training patients of the federated sites (pooled quantiles "
            f"1-99 from {ref_path}; values beyond them are reported as 1 or 99)" if reference is not None else
            f"no risk reference: {ref_path} not found (a federated run writes risk_reference.json next to its "
            f"final model when a site had at least {RISK_HIST_MIN_PATIENTS} training patients in its last round; "
            "give --risk-reference)"),
        "threshold": threshold,
        "threshold_rule": "binary map = probability > threshold (default 0.5, the cut of the federated Dice)",
        "predicted_volume_ml": float(mask.sum() * spacing.prod() / 1000.0),
        "max_probability": float(prob.max()),
        "max_probability_voxel_ijk": ijk_max,
        "max_probability_point_lps_mm": [float(v) for v in prob_img.TransformIndexToPhysicalPoint(ijk_max)],
        "outputs": {"probability": prob_path.name, "mask": mask_path.name, "overview": f"{pid}{PNG_SUFFIX}"},
        "seconds": time.perf_counter() - t0,
        "version": __version__,
    }
    json_path = out / f"{pid}{JSON_SUFFIX}"
    atomic_write_json(json_path, summary)
    return PredictionResult(pid, prob_path, mask_path, json_path, png_path, risk, percentile, threshold, summary)
