"""Reading and validating a raw site folder: ``validate_site(site_dir) -> SiteIndex``.

The data contract is in :mod:`strpnet_core.contract`; the exclusion rules are in
:mod:`strpnet_core.site.validate` and ``docs/data-format.md``. Modules:

- ``records``: ``Scan``, ``PatientRecord``, ``Problem``, ``SiteIndex`` (what validation returns),
  ``NoUsablePatientError`` (a site with no usable case; its message holds counts only);
- ``images``: ``read_image_checked`` / ``read_image_info_checked`` raising ``ImageDefect`` (reused by preprocessing);
- ``tables``: the CSV files (scan dates, outcomes);
- ``validate``: ``validate_site``.

The names of ``images`` and ``validate`` (which need SimpleITK) load on first use, so that code reading only caches
(a site's training, the coordinator) does not import SimpleITK.
"""

from __future__ import annotations

import importlib
from typing import Any

from .records import ERROR, WARNING, NoUsablePatientError, PatientRecord, Problem, Scan, SiteIndex

_LAZY = {
    "ImageDefect": "images",
    "ImageInfo": "images",
    "check_binary_mask": "images",
    "grid_difference": "images",
    "read_image_checked": "images",
    "read_image_info_checked": "images",
    "validate_site": "validate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ERROR",
    "WARNING",
    "ImageDefect",
    "ImageInfo",
    "NoUsablePatientError",
    "PatientRecord",
    "Problem",
    "Scan",
    "SiteIndex",
    "check_binary_mask",
    "grid_difference",
    "read_image_checked",
    "read_image_info_checked",
    "validate_site",
]
