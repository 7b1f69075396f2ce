"""Per-patient predictions on the test site: deep models (ST-RPNet), the two baselines and the oracle.

A prediction file ``OUT/predictions/<method>.json`` holds, per test patient: ``patient_id``, ``time``, ``event``,
``risk`` (None for a method without a risk), ``has_label`` (recurrence mask known), and for a method with a map
``dice_intersection``, ``dice_denominator`` (binary map vs the true recurrence, inside the brain) and ``coverage``
(iso-volume coverage at the true recurrence's volume; None where undefined).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from strpnet_core.baselines import (
    CoxVolumeModel,
    Segmentation,
    SegmentationThresholds,
    cavity_margin_map,
    fit_cavity_margin,
    fit_cox_volumes,
    segment_patient,
    volume_features,
)
from strpnet_core.cache import CachedPatient, list_cache, load_cached_patient
from strpnet_core.fsutil import atomic_write_json
from strpnet_core.metrics import dice_counts, iso_volume_coverage


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def map_record(patient: CachedPatient, score: np.ndarray, binary: np.ndarray) -> dict[str, Any]:
    """Dice counts and iso-volume coverage of one patient's map (``score`` ranks voxels; ``binary`` is the map)."""
    brain = patient.brain_mask > 0
    if patient.recurrence is None:
        return {"has_label": False, "dice_intersection": None, "dice_denominator": None, "coverage": None}
    rec = (patient.recurrence > 0) & brain
    inter, denom = dice_counts(binary & brain, rec)
    cov = iso_volume_coverage(score.astype(np.float64), rec, brain)
    return {"has_label": True, "dice_intersection": int(inter), "dice_denominator": int(denom),
            "coverage": _clean(float(cov))}


def outcome_record(patient: CachedPatient) -> dict[str, Any]:
    return {"patient_id": patient.patient_id, "site": patient.site, "time": float(patient.time or 0.0),
            "event": int(patient.event or 0)}


def cache_patients(cache_dirs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for d in cache_dirs:
        files.extend(list_cache(d))
    return files


def predict_deep(model_file: Path, test_cache: Path, *, num_threads: int | None = None) -> list[dict[str, Any]]:
    """Risk and recurrence map of every test patient from a model file (``final_model.pt`` of ``strpnet simulate``
    or of :func:`strpnet_core.training.save_trained_model`). Binary map = probability > 0.5 (the federated Dice's
    cut), as in ``training.evaluate_model``."""
    import dataclasses

    import torch

    from strpnet_core.dataset import collate_patients, patient_to_item
    from strpnet_core.training import load_trained_model, predict_batch

    model, train_cfg, _ = load_trained_model(model_file)
    train_cfg = dataclasses.replace(train_cfg, device="cpu")
    if num_threads:
        torch.set_num_threads(num_threads)
    records = []
    for f in list_cache(test_cache):
        patient = load_cached_patient(f)
        batch = collate_patients([patient_to_item(patient)])
        probs, risk = predict_batch(model, batch, train_cfg)
        p = probs[0, 0].numpy()
        rec = outcome_record(patient)
        rec["risk"] = float(risk[0])
        rec.update(map_record(patient, p, p > 0.5))
        records.append(rec)
    return records


def write_predictions(path: Path, method: str, records: list[dict[str, Any]], info: dict[str, Any] | None = None
                      ) -> None:
    atomic_write_json(path, {"method": method, "info": info or {}, "patients": records})


def read_predictions(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# baselines and oracle
# ----------------------------------------------------------------------------------------------------------------------
def _segment(patient: CachedPatient, spacing: float, th: SegmentationThresholds) -> Segmentation:
    return segment_patient(patient.images, patient.brain_mask, list(patient.days), spacing, th)


def _spacing(patient: CachedPatient) -> float:
    sp = patient.geometry.get("grid_spacing")
    if not sp:
        raise ValueError(f"{patient.patient_id}: the cache has no grid spacing")
    if max(sp) - min(sp) > 1e-6:
        raise ValueError(f"{patient.patient_id}: anisotropic grid {sp}")
    return float(sp[0])


def run_baselines(
    train_caches: Sequence[Path],
    test_cache: Path,
    truth_dir: Path,
    *,
    margins_mm: Sequence[float],
    penalizer: float,
    thresholds: SegmentationThresholds | None = None,
) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Fit both baselines on the training sites' caches and predict the test site; read the oracle's true risk.

    Returns ``{method: (records, info)}`` for ``cavity-margin``, ``cox-volumes`` and ``oracle``.
    """
    th = thresholds or SegmentationThresholds()
    # training: segment once (features for the Cox model; margins on patients with a recurrence mask)
    feats, times, events = [], [], []
    segs, recs, brains = [], [], []
    spacing = None
    train_rows = []
    for f in cache_patients(train_caches):
        p = load_cached_patient(f)
        spacing = _spacing(p)
        seg = _segment(p, spacing, th)
        row = volume_features(seg)
        feats.append(row)
        times.append(float(p.time or 0.0))
        events.append(int(p.event or 0))
        train_rows.append({**outcome_record(p), **row, "cavity_found": bool(seg.cavity.any())})
        if p.recurrence is not None:
            segs.append(seg)
            recs.append(p.recurrence)
            brains.append(p.brain_mask)
    if spacing is None:
        raise ValueError("no training patient")
    margin, dice_by_margin = fit_cavity_margin(segs, recs, brains, spacing, margins_mm)
    cox: CoxVolumeModel = fit_cox_volumes(feats, times, events, penalizer=penalizer)

    cm_records, cox_records, oracle_records = [], [], []
    test_rows = []
    for f in list_cache(test_cache):
        p = load_cached_patient(f)
        seg = _segment(p, _spacing(p), th)
        score, binary = cavity_margin_map(seg, _spacing(p), margin)
        rec = outcome_record(p)
        cm_records.append({**rec, "risk": None, **map_record(p, score, binary)})
        row = volume_features(seg)
        test_rows.append({**rec, **row, "cavity_found": bool(seg.cavity.any())})
        cox_records.append({**rec, "risk": float(cox.predict_risk([row])[0]), "has_label": p.recurrence is not None})
        truth = json.loads((truth_dir / p.site / p.patient_id / "truth.json").read_text())
        oracle_records.append({**rec, "risk": float(truth["true_risk"]), "has_label": p.recurrence is not None})
    common = {"thresholds": th.to_dict(), "spacing_mm": spacing}
    return {
        "cavity-margin": (cm_records, {**common, "margin_mm": margin,
                                       "train_dice_by_margin": {str(k): _clean(v) for k, v in dice_by_margin.items()},
                                       "n_train_labelled": len(segs)}),
        "cox-volumes": (cox_records, {**common, "model": cox.to_dict(), "train_features": train_rows,
                                      "test_features": test_rows}),
        "oracle": (oracle_records, {"source": "truth/<site>/<patient>/truth.json: true_risk"}),
    }
