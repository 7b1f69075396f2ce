"""The data contract of a site (raw data), shared by the writer (synthetic cohort) and the readers (validation).

Layout of a site folder::

    SITE_DIR/
      <patient>-<ttt>/<patient>-<ttt>-t1n.nii.gz   one folder per scan, ttt = 000 for the pre-op scan,
                      <patient>-<ttt>-t1c.nii.gz   then increasing (BraTS 2023+ names)
                      <patient>-<ttt>-t2w.nii.gz
                      <patient>-<ttt>-t2f.nii.gz
                      <patient>-<ttt>-seg.nii.gz   optional tumour segmentation
      scan_dates.csv       patient_id,timepoint,day          day = days since the pre-op scan (000 -> 0)
      outcomes.csv         patient_id,event,time_days        event 1 = recurrence observed, 0 = censored
      recurrence/<patient>-recurrence.nii.gz                 binary recurrence mask in the geometry of the
                                                             pre-op T1c; present for patients with event = 1
      site.json            optional {"site_name": ...}

BraTS 2021 file names are accepted too: ``_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg`` (folder and file
separator ``_`` or ``-``). Model inputs are the scans taken before the recurrence (day < time_days when
event = 1; day <= time_days when censored).
"""

from __future__ import annotations

import re
from pathlib import Path

#: Modality order of every tensor in the code base (channel axis).
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
#: Human-readable names, same order.
MODALITY_NAMES: dict[str, str] = {"t1n": "T1 native", "t1c": "T1 contrast", "t2w": "T2", "t2f": "T2-FLAIR"}
#: Accepted file-name suffixes per modality: BraTS 2023+ first, then BraTS 2021.
MODALITY_SUFFIXES: dict[str, tuple[str, ...]] = {
    "t1n": ("t1n", "t1"),
    "t1c": ("t1c", "t1ce"),
    "t2w": ("t2w", "t2"),
    "t2f": ("t2f", "flair"),
    "seg": ("seg",),
}
#: The fixed image of every registration: the pre-op T1c.
REFERENCE_MODALITY = "t1c"
#: The fluid-attenuated T2 (oedema and tumour bright): its lesion is left out of the N4 fits.
FLAIR_MODALITY = "t2f"
PREOP_TIMEPOINT = "000"

SCAN_DATES_CSV = "scan_dates.csv"
SCAN_DATES_COLUMNS: tuple[str, ...] = ("patient_id", "timepoint", "day")
OUTCOMES_CSV = "outcomes.csv"
OUTCOMES_COLUMNS: tuple[str, ...] = ("patient_id", "event", "time_days")
RECURRENCE_DIR = "recurrence"
SITE_JSON = "site.json"
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

#: A scan folder: "<patient>-<ttt>" or "<patient>_<ttt>".
SCAN_DIR_RE = re.compile(r"^(?P<patient>.+?)[-_](?P<timepoint>\d{3})$")


def scan_dir_name(patient_id: str, timepoint: str) -> str:
    """Folder name of one scan (BraTS 2023+): ``<patient>-<ttt>``."""
    return f"{patient_id}-{timepoint}"


def scan_file_name(patient_id: str, timepoint: str, modality: str) -> str:
    """File name of one modality of one scan (BraTS 2023+): ``<patient>-<ttt>-<modality>.nii.gz``."""
    return f"{patient_id}-{timepoint}-{modality}.nii.gz"


def recurrence_file_name(patient_id: str) -> str:
    """File name of a patient's recurrence mask inside ``recurrence/``."""
    return f"{patient_id}-recurrence.nii.gz"


def parse_scan_dir(name: str) -> tuple[str, str] | None:
    """Split a scan folder name into (patient_id, timepoint), or None when it is not a scan folder."""
    m = SCAN_DIR_RE.match(name)
    return (m["patient"], m["timepoint"]) if m else None


def find_modality_file(scan_dir: Path, modality: str) -> Path | None:
    """Find the file of ``modality`` in one scan folder under any accepted naming, or None.

    Matches ``<folder>-<suffix>.nii[.gz]`` and ``<folder>_<suffix>.nii[.gz]`` for each accepted suffix.
    """
    for suffix in MODALITY_SUFFIXES[modality]:
        for sep in ("-", "_"):
            for ext in NIFTI_SUFFIXES:
                candidate = scan_dir / f"{scan_dir.name}{sep}{suffix}{ext}"
                if candidate.exists() or candidate.is_symlink():
                    return candidate
    return None
