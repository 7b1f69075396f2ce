"""Patients of one or several preprocessed caches as a torch ``Dataset``, and the collate function that pads
variable numbers of timepoints (the "Batch" table of ``docs/architecture.md``).

Files are read lazily, one patient per ``__getitem__``: memory holds only the patients of the current batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CACHE_SUFFIX, CachedPatient, has_outcome, load_cached_patient, usable_cache_files

__all__ = ["PatientDataset", "collate_patients", "select_timepoints", "BATCH_KEYS"]

#: Keys of a batch (and of an item), in the order of the architecture document.
BATCH_KEYS: tuple[str, ...] = (
    "images", "days", "time_mask", "recurrence", "has_label", "brain_mask", "event", "time", "patient_id",
)

PathLike = str | os.PathLike[str]

log = logging.getLogger(__name__)


def select_timepoints(num_timepoints: int, max_timepoints: int | None) -> list[int]:
    """Indices of the timepoints kept when a patient has more than ``max_timepoints``.

    With ``k = max_timepoints``: all when ``T <= k`` or ``k is None``; the most recent scan when ``k = 1``;
    otherwise the pre-op scan (index 0: the tumour before resection, the reference anatomy) plus the ``k - 1``
    most recent scans (closest to the outcome). Order is preserved (days stay non-decreasing).

    Raises
    ------
    ValueError
        ``num_timepoints < 1`` or ``max_timepoints < 1``.
    """
    if num_timepoints < 1:
        raise ValueError(f"select_timepoints: num_timepoints must be >= 1, got {num_timepoints}")
    if max_timepoints is not None and max_timepoints < 1:
        raise ValueError(f"select_timepoints: max_timepoints must be >= 1 or None, got {max_timepoints}")
    if max_timepoints is None or num_timepoints <= max_timepoints:
        return list(range(num_timepoints))
    if max_timepoints == 1:
        return [num_timepoints - 1]
    return [0, *range(num_timepoints - max_timepoints + 1, num_timepoints)]


def _resolve_files(paths_or_cache_dir: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [paths_or_cache_dir] if isinstance(paths_or_cache_dir, (str, os.PathLike)) else list(paths_or_cache_dir)
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"PatientDataset: paths_or_cache_dir entries must be paths, got {type(item).__name__}")
        p = Path(item)
        if p.is_dir():  # a folder's unusable files (e.g. copied in half) are left out with a warning naming them
            files.extend(usable_cache_files(p))
        elif p.is_file() and p.name.endswith(CACHE_SUFFIX):
            files.append(p)
        else:
            raise ValueError(f"PatientDataset: {p} is neither a cache folder nor a {CACHE_SUFFIX} cache file")
    return files


class PatientDataset(Dataset[dict[str, Any]]):
    """Patients of cache files (``strpnet_core.cache``), read lazily.

    An item is the per-patient version of a batch (see :func:`collate_patients`): ``images`` (T, 4, D, H, W),
    ``days`` (T,), ``time_mask`` (T,) all True, ``recurrence`` (1, D, H, W) (zeros when unknown),
    ``has_label`` (bool), ``brain_mask`` (1, D, H, W), ``event`` and ``time`` (0-d float tensors; 0 when the
    outcome is unknown, as at inference) and ``patient_id`` (str).

    Parameters
    ----------
    paths_or_cache_dir:
        A cache folder, a cache file, or a sequence of them (several sites pooled); folders are listed with
        :func:`strpnet_core.cache.list_cache` (sorted: deterministic order), their unusable files
        (:func:`strpnet_core.cache.cache_file_problem`) left out with a warning.
    max_timepoints:
        Keep at most this many timepoints per patient (see :func:`select_timepoints`); None keeps all.
    dtype:
        Floating dtype of ``images``, ``days``, masks and outcome tensors.
    require_outcome:
        Training and evaluation: leave out (with one warning giving their number) the patients whose cache file
        holds no outcome (``event``/``time`` None: the site folder had no ``outcomes.csv``, which preprocessing
        allows for inference), who would otherwise count as censored at day 0.

    Raises
    ------
    ValueError
        A path that is neither a cache folder nor a cache file, no cache file at all (with ``require_outcome``:
        none with an outcome), ``max_timepoints < 1``, or a non-floating ``dtype``.
    """

    def __init__(
        self,
        paths_or_cache_dir: PathLike | Sequence[PathLike],
        *,
        max_timepoints: int | None = None,
        dtype: torch.dtype = torch.float32,
        require_outcome: bool = False,
    ) -> None:
        if max_timepoints is not None and (isinstance(max_timepoints, bool) or not isinstance(max_timepoints, int)
                                           or max_timepoints < 1):
            raise ValueError(f"PatientDataset: max_timepoints must be a positive integer or None, got {max_timepoints!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"PatientDataset: dtype must be a floating torch.dtype, got {dtype!r}")
        self.files = _resolve_files(paths_or_cache_dir)
        if not self.files:
            raise ValueError(f"no cache file ({CACHE_SUFFIX}) found in {paths_or_cache_dir!r}: a cache folder is what "
                             "`strpnet preprocess SITE_DIR --out CACHE_DIR` writes (a raw site folder is not one)")
        if require_outcome:
            found = len(self.files)
            # folders and counts only: no patient's name in the site's log line or error
            where = ", ".join(sorted({str(f.parent) for f in self.files}))
            self.files = [f for f in self.files if has_outcome(f)]
            if not self.files:
                raise ValueError(f"none of the {found} patient(s) in {where} has an outcome (event, time): the site "
                                 "folder had no outcomes.csv when it was preprocessed; training and evaluation need "
                                 "one (docs/data-format.md), inference (`strpnet predict`) does not")
            if len(self.files) < found:
                log.warning("%d of %d patient(s) in %s have no outcome (no outcomes.csv row when preprocessed): "
                            "left out of training and evaluation", found - len(self.files), found, where)
        self.max_timepoints = max_timepoints
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.files)

    def load_patient(self, index: int) -> CachedPatient:
        """The raw :class:`CachedPatient` of item ``index`` (geometry included, e.g. to map predictions back)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"PatientDataset: index {index} out of range for {len(self)} patients")
        return load_cached_patient(self.files[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return patient_to_item(self.load_patient(index), max_timepoints=self.max_timepoints, dtype=self.dtype)


def patient_to_item(
    patient: CachedPatient, *, max_timepoints: int | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Convert a :class:`CachedPatient` to a dataset item (see :class:`PatientDataset`)."""
    keep = select_timepoints(patient.num_timepoints, max_timepoints)
    images = torch.from_numpy(np.ascontiguousarray(patient.images[keep])).to(dtype)
    days = torch.from_numpy(np.asarray(patient.days, dtype=np.float64)[keep]).to(dtype)
    spatial = tuple(images.shape[2:])
    has_label = patient.recurrence is not None
    rec = patient.recurrence if has_label else np.zeros(spatial, dtype=np.uint8)
    return {
        "images": images,
        "days": days,
        "time_mask": torch.ones(len(keep), dtype=torch.bool),
        "recurrence": torch.from_numpy(np.asarray(rec, dtype=np.float32)).to(dtype).unsqueeze(0),
        "has_label": bool(has_label),
        "brain_mask": torch.from_numpy(np.asarray(patient.brain_mask, dtype=np.float32)).to(dtype).unsqueeze(0),
        "event": torch.tensor(float(patient.event or 0), dtype=dtype),
        "time": torch.tensor(float(patient.time or 0.0), dtype=dtype),
        "patient_id": str(patient.patient_id),
    }


def collate_patients(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch, padding the time axis to the longest patient.

    With ``T = max_b T_b``: ``images[b, t] = 0``, ``days[b, t] = 0`` and ``time_mask[b, t] = False`` for
    ``T_b <= t < T``. Other keys are stacked (``has_label`` as a bool tensor, ``patient_id`` as a list).

    Returns
    -------
    dict
        Exactly :data:`BATCH_KEYS`; shapes as in the "Batch" table of ``docs/architecture.md``.

    Raises
    ------
    ValueError
        Empty ``items``, a missing key, or items whose spatial shapes or channel counts differ.
    """
    if len(items) == 0:
        raise ValueError("collate_patients: items is empty")
    for i, it in enumerate(items):
        missing = [k for k in BATCH_KEYS if k not in it]
        if missing:
            raise ValueError(f"collate_patients: items[{i}] lacks key(s) {missing}")
    shape0 = tuple(items[0]["images"].shape[1:])
    for i, it in enumerate(items):
        if tuple(it["images"].shape[1:]) != shape0:
            raise ValueError(
                f"collate_patients: items[{i}] images shape {tuple(it['images'].shape)} does not match "
                f"(T, {', '.join(map(str, shape0))}) of items[0]"
            )
        if it["days"].shape != it["images"].shape[:1] or it["time_mask"].shape != it["images"].shape[:1]:
            raise ValueError(f"collate_patients: items[{i}] days/time_mask length != its number of timepoints")
    b = len(items)
    t = max(int(it["images"].shape[0]) for it in items)
    ref = items[0]["images"]
    images = ref.new_zeros((b, t, *shape0))
    days = items[0]["days"].new_zeros((b, t))
    time_mask = torch.zeros((b, t), dtype=torch.bool)
    for i, it in enumerate(items):
        n = int(it["images"].shape[0])
        images[i, :n] = it["images"]
        days[i, :n] = it["days"]
        time_mask[i, :n] = it["time_mask"]
    return {
        "images": images,
        "days": days,
        "time_mask": time_mask,
        "recurrence": torch.stack([it["recurrence"] for it in items]),
        "has_label": torch.tensor([bool(it["has_label"]) for it in items], dtype=torch.bool),
        "brain_mask": torch.stack([it["brain_mask"] for it in items]),
        "event": torch.stack([torch.as_tensor(it["event"]) for it in items]).reshape(b),
        "time": torch.stack([torch.as_tensor(it["time"]) for it in items]).reshape(b),
        "patient_id": [str(it["patient_id"]) for it in items],
    }
