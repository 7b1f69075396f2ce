"""The preprocessed cache: one file per patient on the model grid, written atomically by preprocessing and read
by the dataset, the client and ``strpnet predict``.

File ``CACHE_DIR/<patient_id>.npz`` holds the arrays below plus a JSON ``meta`` string; QC records live beside it
(``<patient_id>.qc.json``, ``<patient_id>.qc.png``), written by preprocessing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .contract import MODALITIES
from .fsutil import atomic_path, json_default

log = logging.getLogger(__name__)

CACHE_SUFFIX = ".npz"
CACHE_FORMAT_VERSION = 1


@dataclass
class CachedPatient:
    """One preprocessed patient on the model grid.

    Attributes
    ----------
    patient_id, site:
        Identifiers (they never leave the site).
    images:
        float16 or float32 array (T, 4, D, H, W): modalities in ``contract.MODALITIES`` order, co-registered to the
        pre-op T1c, bias-corrected, z-scored inside the brain mask, 0 outside.
    days:
        float32 (T,): days since the pre-op scan, increasing, days[0] == 0.
    timepoints:
        The ``ttt`` label of each timepoint.
    brain_mask:
        uint8 (D, H, W) on the model grid.
    recurrence:
        uint8 (D, H, W) recurrence mask on the model grid, or None when unknown (censored or inference).
    event, time:
        Outcome (1 = recurrence at ``time`` days, 0 = censored at ``time``), or None at inference.
    geometry:
        How the model grid sits in the pre-op T1c's physical space, to map predictions back:
        ``{"grid_origin", "grid_spacing", "grid_direction", "grid_size", "reference_origin", "reference_spacing",
        "reference_direction", "reference_size"}`` (ITK conventions, LPS, size in x, y, z order).
    meta:
        Anything else worth keeping (preset, software version, QC summary).
    """

    patient_id: str
    site: str
    images: np.ndarray
    days: np.ndarray
    timepoints: list[str]
    brain_mask: np.ndarray
    recurrence: np.ndarray | None = None
    event: int | None = None
    time: float | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 5 or self.images.shape[1] != len(MODALITIES):
            raise ValueError(
                f"images of patient {self.patient_id!r}: expected shape (T, {len(MODALITIES)}, D, H, W), "
                f"got {self.images.shape}"
            )
        t, spatial = self.images.shape[0], self.images.shape[2:]
        if t == 0:
            raise ValueError(f"images of patient {self.patient_id!r}: no timepoint (T = 0)")
        if self.days.shape != (t,) or len(self.timepoints) != t:
            raise ValueError(
                f"patient {self.patient_id!r}: {t} timepoints but days has shape {self.days.shape} and "
                f"{len(self.timepoints)} timepoint labels"
            )
        for name in ("brain_mask", "recurrence"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != spatial:
                raise ValueError(f"{name} of patient {self.patient_id!r}: shape {arr.shape} != image grid {spatial}")

    @property
    def num_timepoints(self) -> int:
        return int(self.images.shape[0])


def cache_path(cache_dir: str | os.PathLike[str], patient_id: str) -> Path:
    """Path of a patient's cache file."""
    return Path(cache_dir) / f"{patient_id}{CACHE_SUFFIX}"


def save_cached_patient(path: str | os.PathLike[str], patient: CachedPatient) -> None:
    """Write ``patient`` to ``path`` atomically (temp file + rename): a reader never sees half a file."""
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "patient_id": patient.patient_id,
        "site": patient.site,
        "timepoints": list(patient.timepoints),
        "event": patient.event,
        "time": patient.time,
        "geometry": patient.geometry,
        "meta": patient.meta,
    }
    arrays: dict[str, np.ndarray] = {
        "images": patient.images,
        "days": np.asarray(patient.days, dtype=np.float32),
        "brain_mask": np.asarray(patient.brain_mask, dtype=np.uint8),
        "meta_json": np.frombuffer(json.dumps(meta, default=json_default).encode("utf-8"), dtype=np.uint8),
    }
    if patient.recurrence is not None:
        arrays["recurrence"] = np.asarray(patient.recurrence, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


#: Keys of the metadata every cache file holds.
META_KEYS: tuple[str, ...] = ("patient_id", "site", "timepoints", "event", "time", "geometry", "meta")


def _meta_problem(meta: Any) -> str | None:
    """Why a cache file's metadata is unusable (another format version, not an object, a key missing), or None."""
    if not isinstance(meta, dict):
        return f"metadata is a JSON {type(meta).__name__}, not an object"
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        return f"cache format {meta.get('format_version')} != {CACHE_FORMAT_VERSION}; re-run preprocess"
    missing = [k for k in META_KEYS if k not in meta]
    return f"metadata lacks {', '.join(missing)}" if missing else None


def _binary_problem(name: str, arr: np.ndarray | None) -> str | None:
    if arr is not None and np.any((arr != 0) & (arr != 1)):
        return f"{name} holds values other than 0 and 1 (e.g. {arr[(arr != 0) & (arr != 1)].flat[0]})"
    return None


@dataclass(frozen=True)
class CacheHeader:
    """What a cache file says about its patient without its images: outcome, metadata, whether a recurrence mask is
    stored."""

    patient_id: str
    event: int | None
    time: float | None
    meta: dict[str, Any]
    has_recurrence: bool


def load_cache_header(path: str | os.PathLike[str]) -> CacheHeader:
    """Read a cache file's metadata only (the image arrays are not decompressed).

    Raises ValueError naming the file when it is unreadable, of another format version, or lacks metadata.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta_json"]).decode("utf-8"))
            has_recurrence = "recurrence" in npz.files
    except Exception as exc:  # zipfile.BadZipFile, KeyError, OSError, JSON errors ...
        raise ValueError(f"{path}: unreadable cache file ({type(exc).__name__}: {exc})") from exc
    if (why := _meta_problem(meta)) is not None:
        raise ValueError(f"{path}: {why}")
    return CacheHeader(str(meta["patient_id"]), meta["event"], meta["time"], meta["meta"], has_recurrence)


def has_outcome(path: str | os.PathLike[str]) -> bool:
    """Whether a cache file's patient has a known outcome (``event`` and ``time`` not None); reads the header only.
    ValueError naming the file as :func:`load_cache_header`."""
    head = load_cache_header(path)
    return head.event is not None and head.time is not None


def load_cached_patient(path: str | os.PathLike[str]) -> CachedPatient:
    """Read a cache file written by :func:`save_cached_patient`.

    Raises ValueError naming the file when it is unreadable, of another format version, lacks metadata, holds
    inconsistent arrays, or masks that are not 0/1.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta_json"]).decode("utf-8"))
            images = np.asarray(npz["images"])
            days = np.asarray(npz["days"])
            brain_mask = np.asarray(npz["brain_mask"])
            recurrence = np.asarray(npz["recurrence"]) if "recurrence" in npz.files else None
    except Exception as exc:  # zipfile.BadZipFile, KeyError, OSError, JSON errors ...
        raise ValueError(f"{path}: unreadable cache file ({type(exc).__name__}: {exc})") from exc
    why = (_meta_problem(meta) or _binary_problem("brain_mask", brain_mask)
           or _binary_problem("recurrence", recurrence))
    if why is not None:
        raise ValueError(f"{path}: {why}")
    try:
        return CachedPatient(
            patient_id=meta["patient_id"],
            site=meta["site"],
            images=images,
            days=days,
            timepoints=list(meta["timepoints"]),
            brain_mask=brain_mask,
            recurrence=recurrence,
            event=meta["event"],
            time=meta["time"],
            geometry=meta["geometry"],
            meta=meta["meta"],
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


#: Arrays every cache file holds.
REQUIRED_ARRAYS: tuple[str, ...] = ("images", "days", "brain_mask", "meta_json")


def cache_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a cache file cannot be used, or None (a cheap check: the zip directory, the arrays present, the
    metadata and format version; the image bytes are not read).

    A file written by :func:`save_cached_patient` is complete (atomic write); this guards against files copied in
    by other means (an interrupted copy, another version).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in REQUIRED_ARRAYS if k not in npz.files]
            if missing:
                return f"lacks {', '.join(missing)}"
            meta = json.loads(bytes(npz["meta_json"]).decode("utf-8"))
    except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError, JSON errors ...
        return f"unreadable ({type(exc).__name__})"
    return _meta_problem(meta)


def list_cache(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """The cache files of a folder, sorted by name (deterministic order); temp files are ignored."""
    return sorted(p for p in Path(cache_dir).glob(f"*{CACHE_SUFFIX}") if not p.name.startswith("."))


def cache_preset(cache_dir: str | os.PathLike[str]) -> str | None:
    """The resolution preset recorded in the first usable cache file of ``cache_dir`` (its ``meta["preset"]``), or
    None (no usable file, or none recorded). Unusable files (:func:`cache_file_problem`, e.g. copied in half) are
    skipped, as the datasets leave them out: one bad file does not hide the folder's preset."""
    for f in list_cache(cache_dir):
        if cache_file_problem(f) is None:
            meta = load_cache_header(f).meta
            preset = meta.get("preset") if isinstance(meta, dict) else None
            return str(preset) if preset else None
    return None


def usable_cache_files(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """The cache files of a folder (:func:`list_cache` order) that :func:`cache_file_problem` accepts; each one
    left out (e.g. copied in half) is named in a warning."""
    good = []
    for f in list_cache(cache_dir):
        problem = cache_file_problem(f)
        if problem is None:
            good.append(f)
        else:
            log.warning("%s: %s; patient left out", f, problem)
    return good
