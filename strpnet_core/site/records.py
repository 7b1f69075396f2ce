"""What validating a site produces: usable patient records, and problems (one line each) for everything else."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Problem levels: an ``error`` excluded something (a patient, a scan, a mask); a ``warning`` excluded nothing.
ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Scan:
    """One usable scan (timepoint) of a patient.

    Attributes
    ----------
    timepoint:
        ``"000"`` for the pre-op scan, then ``"001"``, ...
    day:
        Days since the pre-op scan.
    images:
        Modality (every one of ``contract.MODALITIES``) -> file.
    seg:
        The optional tumour segmentation on the T1c grid, or None.
    """

    timepoint: str
    day: float
    images: dict[str, Path]
    seg: Path | None


@dataclass(frozen=True)
class PatientRecord:
    """One usable patient.

    Attributes
    ----------
    patient_id:
        Identifier (never leaves the site).
    scans:
        Sorted by day; the first is the pre-op scan ``"000"``. Only scans before the recurrence (day < time_days when
        event = 1, day <= time_days when censored); all intact scans when outcomes are not required.
    event:
        1 = recurrence observed, 0 = censored; None when outcomes are not required (inference).
    time_days:
        Days from the pre-op scan to recurrence or censoring; None when outcomes are not required.
    recurrence:
        Binary recurrence mask in the pre-op T1c geometry (event = 1 only), or None.
    """

    patient_id: str
    scans: tuple[Scan, ...]
    event: int | None
    time_days: float | None
    recurrence: Path | None


@dataclass(frozen=True)
class Problem:
    """One defect, in one line.

    Attributes
    ----------
    path:
        The file or folder (relative to the site folder when inside it), or ``"outcomes.csv:7"`` for a CSV row
        (line 1 is the header).
    reason:
        What is wrong.
    patient_id:
        The patient concerned, or None for a site-level problem.
    level:
        ``"error"`` when it excluded something (patient, scan or mask), ``"warning"`` when nothing was excluded.
    """

    path: str
    reason: str
    patient_id: str | None
    level: str = ERROR

    def __str__(self) -> str:
        tag = "" if self.level == ERROR else f"{self.level}: "
        return f"{tag}{self.path}: {self.reason}"


@dataclass
class SiteIndex:
    """The result of :func:`strpnet_core.site.validate_site`.

    Attributes
    ----------
    site_dir:
        The site folder.
    site_name:
        ``site.json`` ``"site_name"``, or the folder name.
    patients:
        Usable patients, sorted by patient_id.
    excluded:
        patient_id -> the problems that excluded it.
    problems:
        Every problem (site-level ones, dropped scans and masks, warnings included), in the order found.
    """

    site_dir: Path
    site_name: str
    patients: list[PatientRecord] = field(default_factory=list)
    excluded: dict[str, list[Problem]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def patient_problems(self, patient_id: str) -> list[Problem]:
        """Every problem concerning ``patient_id`` (dropped scans and warnings of a usable patient included)."""
        return [p for p in self.problems if p.patient_id == patient_id]

    def summary(self) -> dict[str, Any]:
        """Counts: usable and excluded patients, events and scans among the usable, errors and warnings."""
        return {
            "site_name": self.site_name,
            "usable": len(self.patients),
            "excluded": len(self.excluded),
            "events": sum(1 for p in self.patients if p.event == 1),
            "scans": sum(len(p.scans) for p in self.patients),
            "errors": sum(1 for p in self.problems if p.level == ERROR),
            "warnings": sum(1 for p in self.problems if p.level == WARNING),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (paths as strings): summary, patients, excluded and problems."""
        return {
            "site_dir": os.fspath(self.site_dir),
            "summary": self.summary(),
            "patients": [
                {
                    "patient_id": p.patient_id,
                    "event": p.event,
                    "time_days": p.time_days,
                    "recurrence": None if p.recurrence is None else os.fspath(p.recurrence),
                    "scans": [
                        {
                            "timepoint": s.timepoint,
                            "day": s.day,
                            "images": {m: os.fspath(f) for m, f in s.images.items()},
                            "seg": None if s.seg is None else os.fspath(s.seg),
                        }
                        for s in p.scans
                    ],
                }
                for p in self.patients
            ],
            "excluded": {pid: [_problem_dict(q) for q in probs] for pid, probs in self.excluded.items()},
            "problems": [_problem_dict(q) for q in self.problems],
        }


def _problem_dict(p: Problem) -> dict[str, Any]:
    return {"path": p.path, "reason": p.reason, "patient_id": p.patient_id, "level": p.level}


class NoUsablePatientError(ValueError):
    """A site has no usable patient: every case was excluded or failed (or the site holds none).

    The message carries only the site's name, counts and where the site's own report is, never a patient id or a
    file of a patient: it may leave the site (a Flower ClientApp turns it into the error reply the coordinator sees).

    Attributes
    ----------
    site_name:
        The site.
    rejected:
        Number of patients excluded by validation or failed in preprocessing.
    report_path:
        The site-local report that lists every case with its reason.
    """

    def __init__(self, site_name: str, rejected: int, report_path: str | os.PathLike[str]) -> None:
        self.site_name, self.rejected, self.report_path = site_name, int(rejected), Path(report_path)
        super().__init__(f"site {site_name}: no usable patient: {self.rejected} rejected, see {self.report_path}")
