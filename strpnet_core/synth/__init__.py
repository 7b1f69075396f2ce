"""Synthetic BraTS-like longitudinal glioblastoma cohort (real MNI152 anatomy, Fisher-KPP growth, site effects).

Public API: :func:`generate_cohort` (whole cohort on disk in the data contract plus the truth), :class:`CohortSummary`,
:func:`generate_patient` (one patient), :func:`render_patient_overview` (QC figure). See ``docs/synthetic-data.md``.
"""

from __future__ import annotations

from .cohort import CohortSummary, PatientRecord, generate_cohort, generate_patient, parse_patient_counts
from .render import render_patient_overview

__all__ = [
    "CohortSummary",
    "PatientRecord",
    "generate_cohort",
    "generate_patient",
    "parse_patient_counts",
    "render_patient_overview",
]
