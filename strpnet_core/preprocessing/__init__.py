"""Preprocessing: registration, brain extraction, N4, z-scoring and the per-patient pipeline writing the cache.

Public API
----------
- :func:`z_score_normalize` (the seed notebook's name)
- :func:`preprocess_patient`, :func:`preprocess_site`, :class:`PipelineSettings`, :class:`PatientResult`,
  :class:`PreprocessReport`
- building blocks: :mod:`.registration`, :mod:`.brain`, :mod:`.bias`, :mod:`.resample`, :mod:`.qc`

See ``docs/preprocessing.md``.  SimpleITK is imported lazily only by the submodules that need it.
"""

from __future__ import annotations

from typing import Any

from .normalize import z_score_normalize

__all__ = [
    "PatientResult",
    "PipelineSettings",
    "PreprocessReport",
    "preprocess_patient",
    "preprocess_site",
    "z_score_normalize",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import strpnet_core.preprocessing` light (numpy only)
    if name in {"PatientResult", "PipelineSettings", "PreprocessReport", "preprocess_patient", "preprocess_site"}:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
