"""Validating a raw site folder into a :class:`SiteIndex` of usable patients and one-line problems.

Exclusion rules (also in ``docs/data-format.md``):

- a site-level defect (folder missing, not a folder, empty; a CSV missing or with a wrong header) is reported
  once; the patients it leaves without dates (or outcomes, when required) are excluded;
- a patient is excluded when: it has no pre-op scan ``000``; the pre-op scan has any defect (missing modality,
  unreadable/truncated file, not 3D, NaN/inf, constant volume, no date row, day != 0); it has no valid outcome row
  (when outcomes are required); its id occurs twice (a scan in two folders, e.g. BraTS 2021 and 2023 names, or
  conflicting CSV rows); no scan lies before the recurrence; its recurrence mask is missing or defective and
  masks are required;
- a defective follow-up scan is dropped (an error Problem names it); the patient stays usable with the rest;
- a defective segmentation is dropped (the scan stays); a defective recurrence mask is dropped when masks are not
  required (the patient trains without a location label);
- scans on or after the recurrence day (event = 1), or after the censoring day (event = 0), are not model inputs:
  they are neither checked nor returned.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..contract import (
    MODALITIES,
    MODALITY_SUFFIXES,
    NIFTI_SUFFIXES,
    OUTCOMES_CSV,
    PREOP_TIMEPOINT,
    RECURRENCE_DIR,
    REFERENCE_MODALITY,
    SCAN_DATES_CSV,
    SITE_JSON,
    parse_scan_dir,
    recurrence_file_name,
    scan_dir_name,
    scan_file_name,
)
from .images import (
    ImageDefect,
    ImageInfo,
    check_binary_mask,
    check_label_map,
    grid_difference,
    read_image_checked,
    read_image_info_checked,
)
from .records import WARNING, PatientRecord, Problem, Scan, SiteIndex
from .tables import Entry, read_outcomes, read_scan_dates

_KNOWN_FILES = {SCAN_DATES_CSV, OUTCOMES_CSV, SITE_JSON}


@dataclass
class _Layout:
    """What the site folder holds, before any file is read."""

    scans: dict[str, dict[str, list[Path]]] = field(default_factory=dict)  # pid -> timepoint -> folders
    recurrence: dict[str, list[Path]] = field(default_factory=dict)  # pid -> mask files
    problems: list[Problem] = field(default_factory=list)


@dataclass
class _Context:
    site_dir: Path
    dates: dict[tuple[str, str], Entry] | None
    outcomes: dict[str, Entry] | None
    recurrence: dict[str, list[Path]]
    require_outcomes: bool
    require_recurrence: bool
    check_voxels: bool

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.site_dir))
        except ValueError:
            return str(path)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """``dir``, ``file``, ``loop``, ``broken`` or ``other`` (follows one symlink; never recurses)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as exc:
        return "loop" if exc.errno == errno.ELOOP else "other"
    return "broken" if entry.is_symlink() else "other"


def _site_dir_problem(site_dir: Path) -> Problem | None:
    try:
        if not site_dir.is_dir():
            reason = "site folder is not a directory" if site_dir.exists() else "site folder missing"
            return Problem(str(site_dir), reason, None)
    except OSError as exc:
        return Problem(str(site_dir), "symlink loop" if exc.errno == errno.ELOOP else f"cannot open: {exc}", None)
    return None


def _discover(site_dir: Path) -> _Layout:
    """List scan folders and recurrence masks (one level deep; symlink loops reported, never followed)."""
    layout = _Layout()
    try:
        entries = _scandir(site_dir)
    except OSError as exc:
        layout.problems.append(Problem(str(site_dir), f"cannot list site folder: {exc.strerror or exc}", None))
        return layout
    visible = [e for e in entries if not e.name.startswith(".")]
    if not visible:
        layout.problems.append(Problem(str(site_dir), "site folder is empty", None))
        return layout
    for entry in visible:
        kind = _entry_kind(entry)
        parsed = parse_scan_dir(entry.name)
        if entry.name in _KNOWN_FILES and kind == "file":
            continue
        if entry.name == RECURRENCE_DIR and kind == "dir":
            _discover_recurrence(site_dir / entry.name, layout)
            continue
        if parsed is not None and kind in ("dir", "loop", "broken"):
            pid, tp = parsed
            layout.scans.setdefault(pid, {}).setdefault(tp, []).append(site_dir / entry.name)
            continue
        if kind in ("loop", "broken"):
            what = "symlink loop" if kind == "loop" else "broken symlink"
            layout.problems.append(Problem(entry.name, f"{what} (ignored)", None, WARNING))
        elif kind == "dir":
            layout.problems.append(
                Problem(entry.name, "not a scan folder (expected <patient>-<ttt>); ignored", None, WARNING)
            )
        else:
            layout.problems.append(Problem(entry.name, "unexpected file in the site folder; ignored", None, WARNING))
    if not layout.scans:
        layout.problems.append(Problem(str(site_dir), "no scan folders (expected <patient>-<ttt>/)", None))
    return layout


def _discover_recurrence(folder: Path, layout: _Layout) -> None:
    try:
        entries = _scandir(folder)
    except OSError as exc:
        layout.problems.append(Problem(RECURRENCE_DIR, f"cannot list: {exc.strerror or exc}", None))
        return
    for entry in entries:
        name = entry.name
        for ext in NIFTI_SUFFIXES:
            for sep in ("-", "_"):
                tail = f"{sep}recurrence{ext}"
                if name.endswith(tail) and len(name) > len(tail):
                    layout.recurrence.setdefault(name[: -len(tail)], []).append(folder / name)
                    break
            else:
                continue
            break
        else:
            if not name.startswith("."):
                layout.problems.append(
                    Problem(f"{RECURRENCE_DIR}/{name}", "not named <patient>-recurrence.nii.gz; ignored", None, WARNING)
                )


def _modality_files(folder: Path, names: set[str], modality: str) -> list[Path]:
    found = []
    for suffix in MODALITY_SUFFIXES[modality]:
        for sep in ("-", "_"):
            for ext in NIFTI_SUFFIXES:
                name = f"{folder.name}{sep}{suffix}{ext}"
                if name in names:
                    found.append(folder / name)
    return found


def _read_info(path: Path, *, check_voxels: bool, mask: str | None = None) -> ImageInfo:
    """Check one image (header only without ``check_voxels``); ``mask`` = ``"binary"`` or ``"labels"``.

    Any error, an unforeseen one included, is an :class:`ImageDefect` naming the file: one bad file never stops the
    validation of the site.
    """
    try:
        return _read_info_unguarded(path, check_voxels=check_voxels, mask=mask)
    except ImageDefect:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a header value that a reader turns into an exception
        raise ImageDefect(path, f"unreadable ({type(exc).__name__}: {exc})") from exc


def _read_info_unguarded(path: Path, *, check_voxels: bool, mask: str | None) -> ImageInfo:
    if not check_voxels:
        return read_image_info_checked(path)
    image = read_image_checked(path, allow_constant=mask is not None)
    if mask == "binary":
        ones = check_binary_mask(path, image)
        if ones == 0:
            raise ImageDefect(path, "empty recurrence mask (no voxel = 1) for event = 1")
    elif mask == "labels":
        check_label_map(path, image)
    return ImageInfo.of(image)


def _check_scan(
    ctx: _Context, pid: str, tp: str, folder: Path
) -> tuple[dict[str, Path] | None, Path | None, ImageInfo | None, list[Problem], list[Problem]]:
    """Check the files of one scan folder.

    Returns (images or None when the scan is unusable, seg, T1c geometry, scan problems, notes: seg problems and
    warnings about files that are not read, e.g. a ``t1c_old.nii.gz`` left beside the scan's ``t1c``).
    """
    rel = ctx.rel(folder)
    try:
        names = {e.name for e in _scandir(folder)}
    except OSError as exc:
        reason = "symlink loop" if exc.errno == errno.ELOOP else f"cannot list: {exc.strerror or exc}"
        return None, None, None, [Problem(rel, reason, pid)], []
    images: dict[str, Path] = {}
    problems: list[Problem] = []
    t1c: ImageInfo | None = None
    read = {f.name for f in _modality_files(folder, names, "seg")}  # the files this check looks at
    for modality in MODALITIES:
        files = _modality_files(folder, names, modality)
        read.update(f.name for f in files)
        if not files:
            expected = scan_file_name(pid, tp, modality).replace(f"{pid}-{tp}", folder.name)
            alt = "/".join(MODALITY_SUFFIXES[modality][1:])
            hint = f" (or _{alt})" if alt else ""
            problems.append(Problem(rel, f"{modality} missing: expected {expected}{hint}", pid))
            continue
        if len(files) > 1:
            listed = ", ".join(f.name for f in files)
            problems.append(Problem(rel, f"{modality} given twice ({listed}): ambiguous", pid))
            continue
        try:
            info = _read_info(files[0], check_voxels=ctx.check_voxels)
        except ImageDefect as exc:
            problems.append(Problem(ctx.rel(exc.path), exc.reason, pid))
            continue
        images[modality] = files[0]
        if modality == REFERENCE_MODALITY:
            t1c = info
    seg, notes = _check_seg(ctx, pid, folder, names, t1c)
    notes += [Problem(ctx.rel(folder / name), "unexpected file in the scan folder; not read", pid, WARNING)
              for name in sorted(names - read) if not name.startswith(".")]
    return (images if not problems else None), seg, t1c, problems, notes


def _check_seg(
    ctx: _Context, pid: str, folder: Path, names: set[str], t1c: ImageInfo | None
) -> tuple[Path | None, list[Problem]]:
    files = _modality_files(folder, names, "seg")
    if not files:
        return None, []
    if len(files) > 1:
        listed = ", ".join(f.name for f in files)
        return None, [Problem(ctx.rel(folder), f"seg given twice ({listed}); seg dropped", pid)]
    try:
        info = _read_info(files[0], check_voxels=ctx.check_voxels, mask="labels")
    except ImageDefect as exc:
        return None, [Problem(ctx.rel(exc.path), f"{exc.reason}; seg dropped", pid)]
    if t1c is not None and (diff := grid_difference(info, t1c)) is not None:
        return None, [Problem(ctx.rel(files[0]), f"seg grid differs from the scan's t1c: {diff}; seg dropped", pid)]
    return files[0], []


def _outcome(ctx: _Context, pid: str) -> tuple[tuple[int, float] | None, list[Problem]]:
    if not ctx.require_outcomes:
        return None, []
    if ctx.outcomes is None:
        return None, [Problem(OUTCOMES_CSV, f"no outcome for {pid}: {OUTCOMES_CSV} unusable", pid)]
    entry = ctx.outcomes.get(pid)
    if entry is None:
        return None, [Problem(OUTCOMES_CSV, f"no outcome row for patient {pid}", pid)]
    return entry.value, list(entry.problems)


def _scan_date(ctx: _Context, pid: str, tp: str, folder: Path) -> tuple[float | None, list[Problem]]:
    if ctx.dates is None:
        return None, [Problem(ctx.rel(folder), f"no scan date: {SCAN_DATES_CSV} unusable", pid)]
    entry = ctx.dates.get((pid, tp))
    if entry is None:
        return None, [Problem(ctx.rel(folder), f"no date row in {SCAN_DATES_CSV} (patient {pid}, timepoint {tp})", pid)]
    if entry.value is None:
        return None, list(entry.problems)
    if tp == PREOP_TIMEPOINT and entry.value != 0:
        return None, [Problem(entry.where, f"pre-op scan {tp} must be at day 0, got {entry.value:g}", pid)]
    return entry.value, []


def _check_recurrence(
    ctx: _Context, pid: str, preop_t1c: ImageInfo | None
) -> tuple[Path | None, Problem | None]:
    files = ctx.recurrence.get(pid, [])
    if not files:
        if not ctx.require_recurrence:
            return None, None
        expected = f"{RECURRENCE_DIR}/{recurrence_file_name(pid)}"
        return None, Problem(expected, "recurrence mask missing (event = 1)", pid)
    if len(files) > 1:
        return None, Problem(RECURRENCE_DIR, f"several masks for {pid}: {', '.join(f.name for f in files)}", pid)
    try:
        info = _read_info(files[0], check_voxels=ctx.check_voxels, mask="binary")
    except ImageDefect as exc:
        return None, Problem(ctx.rel(exc.path), exc.reason, pid)
    if preop_t1c is not None and (diff := grid_difference(info, preop_t1c)) is not None:
        return None, Problem(ctx.rel(files[0]), f"recurrence mask grid differs from the pre-op t1c: {diff}", pid)
    return files[0], None


def _validate_patient(
    ctx: _Context, pid: str, folders: dict[str, list[Path]]
) -> tuple[PatientRecord | None, list[Problem], list[Problem]]:
    """Return (record or None, problems that exclude the patient, other problems of the patient)."""
    excl: list[Problem] = []
    notes: list[Problem] = []
    for tp, dirs in sorted(folders.items()):
        for extra in dirs[1:]:
            reason = f"duplicate patient id {pid}: scan {tp} also in {ctx.rel(dirs[0])}"
            excl.append(Problem(ctx.rel(extra), reason, pid))
    outcome, outcome_problems = _outcome(ctx, pid)
    excl += outcome_problems
    if PREOP_TIMEPOINT not in folders:
        excl.append(Problem(scan_dir_name(pid, PREOP_TIMEPOINT), f"pre-op scan {PREOP_TIMEPOINT} missing", pid))
    scans: list[Scan] = []
    preop_t1c: ImageInfo | None = None
    for tp, dirs in sorted(folders.items()):
        folder = dirs[0]
        day, problems = _scan_date(ctx, pid, tp, folder)
        if outcome is not None and day is not None:
            event, time = outcome
            if day > time or (event == 1 and day >= time):
                continue  # on/after the recurrence or censoring: not a model input
        images, seg, t1c, scan_problems, seg_problems = _check_scan(ctx, pid, tp, folder)
        problems += scan_problems
        notes += seg_problems
        if tp == PREOP_TIMEPOINT:
            preop_t1c = t1c
            excl += problems
        else:
            notes += problems
        if not problems and images is not None and day is not None:
            scans.append(Scan(tp, day, images, seg))
    if outcome is not None and PREOP_TIMEPOINT in folders and not any(s.timepoint == PREOP_TIMEPOINT for s in scans):
        if not excl:
            excl.append(Problem(OUTCOMES_CSV, f"no scan before the recurrence (time_days {outcome[1]:g})", pid))
    recurrence = None
    if outcome is not None and outcome[0] == 1:
        recurrence, problem = _check_recurrence(ctx, pid, preop_t1c)
        if problem is not None:
            if ctx.require_recurrence:
                excl.append(problem)
            else:
                notes.append(Problem(problem.path, f"{problem.reason}; mask not used", pid))
    elif outcome is not None and ctx.recurrence.get(pid):
        mask_path = ctx.rel(ctx.recurrence[pid][0])
        notes.append(Problem(mask_path, "mask of a censored patient (event = 0); ignored", pid, WARNING))
    scans.sort(key=lambda s: (s.day, s.timepoint))
    order = [s.timepoint for s in scans]
    if order != sorted(order):
        reason = f"days do not increase with the timepoint: {', '.join(order)}"
        notes.append(Problem(SCAN_DATES_CSV, reason, pid, WARNING))
    if excl:
        return None, excl, notes
    event, time = outcome if outcome is not None else (None, None)
    return PatientRecord(pid, tuple(scans), event, time, recurrence), excl, notes


def _orphan_rows(ctx: _Context, layout: _Layout) -> list[Problem]:
    """Warnings for CSV rows and masks that match no scan folder."""
    out: list[Problem] = []
    for (pid, tp), entry in (ctx.dates or {}).items():
        if tp not in layout.scans.get(pid, {}):
            out.append(Problem(entry.where, f"date row without scan folder {scan_dir_name(pid, tp)}", pid, WARNING))
    if ctx.require_outcomes:
        for pid, entry in (ctx.outcomes or {}).items():
            if pid not in layout.scans:
                out.append(Problem(entry.where, f"outcome row for {pid}, who has no scan folder", pid, WARNING))
    for pid, files in ctx.recurrence.items():
        if pid not in layout.scans:
            out.append(Problem(ctx.rel(files[0]), f"recurrence mask for {pid}, who has no scan folder", pid, WARNING))
    return out


def _site_name(site_dir: Path, problems: list[Problem]) -> str:
    path = site_dir / SITE_JSON
    if not path.is_file():
        return site_dir.name
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("site_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        problems.append(Problem(SITE_JSON, f"unreadable ({type(exc).__name__}); folder name used", None, WARNING))
        return site_dir.name
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem(SITE_JSON, "no string site_name; folder name used", None, WARNING))
        return site_dir.name
    return name.strip()


def validate_site(
    site_dir: str | os.PathLike[str],
    *,
    require_outcomes: bool = True,
    require_recurrence: bool = False,
    check_voxels: bool = True,
    progress: bool = False,
) -> SiteIndex:
    """Read and check a raw site folder (layout in ``strpnet_core.contract``), one image at a time.

    Every defect becomes one :class:`Problem` naming the file (or ``csv:line``) and the reason; the case it concerns
    is excluded (or only the defective follow-up scan, segmentation or optional mask is dropped) and the rest go on.
    The exclusion rules are in this module's docstring and in ``docs/data-format.md``.

    Parameters
    ----------
    site_dir:
        The site folder.
    require_outcomes:
        Training/evaluation (True): every patient needs a valid ``outcomes.csv`` row, and only the scans before the
        recurrence are kept. Inference (False): ``outcomes.csv`` and recurrence masks are not read; every intact scan
        is kept and ``event``/``time_days``/``recurrence`` are None.
    require_recurrence:
        Patients with event = 1 need an intact recurrence mask (else they are excluded); when False a missing or
        defective mask only leaves ``recurrence`` None.
    check_voxels:
        Read every voxel: gzip integrity (truncation), NaN/inf, constant volumes, binary masks. False reads headers
        only (fast; truncated ``.nii.gz`` files and voxel defects go unnoticed).
    progress:
        Show a progress bar over patients.

    Returns
    -------
    SiteIndex
        Usable patients sorted by id, excluded patients with their problems, and every problem.
    """
    site = Path(site_dir)
    index = SiteIndex(site_dir=site, site_name=site.name)
    problem = _site_dir_problem(site)
    if problem is not None:
        index.problems.append(problem)
        return index
    index.site_name = _site_name(site, index.problems)
    layout = _discover(site)
    index.problems += layout.problems
    if not layout.scans:
        return index
    dates, date_problems = read_scan_dates(site)
    index.problems += date_problems
    outcomes = None
    if require_outcomes:
        outcomes, outcome_problems = read_outcomes(site)
        index.problems += outcome_problems
    ctx = _Context(
        site,
        dates,
        outcomes,
        layout.recurrence if require_outcomes else {},
        require_outcomes,
        require_recurrence,
        check_voxels,
    )
    index.problems += _orphan_rows(ctx, layout)
    for pid in tqdm(sorted(layout.scans), desc="validate", unit="patient", disable=not progress):
        record, excl, notes = _validate_patient(ctx, pid, layout.scans[pid])
        index.problems += excl + notes
        if record is None:
            index.excluded[pid] = excl
        else:
            index.patients.append(record)
    return index


__all__ = ["validate_site"]
