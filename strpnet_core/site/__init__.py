"""Reading and validating a raw site folder: ``validate_site(site_dir) -> SiteIndex``.

The data contract is in :mod:`strpnet_core.contract`; the exclusion rules are in
:mod:`strpnet_core.site.validate` and ``docs/data-format.md``. Modules:

- ``records``: ``Scan``, ``PatientRecord``, ``Problem``, ``SiteIndex`` (what validation returns),
  ``NoUsablePatientError`` (a site with no usable case; its message holds counts only);
- ``images``: ``read_image_checked`` / ``read_image_info_checked`` raising ``ImageDefect`` (reused by preprocessing);
- ``tables``: the CSV files (scan dates, outcomes);
- ``validate``: ``validate_site``.
"""

from .images import (
    ImageDefect,
    ImageInfo,
    check_binary_mask,
    grid_difference,
    read_image_checked,
    read_image_info_checked,
)
from .records import ERROR, WARNING, NoUsablePatientError, PatientRecord, Problem, Scan, SiteIndex
from .validate import validate_site

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
