"""Seeded corruptions of a raw site folder (for the fuzz test of validation, preprocessing and site preparation).

Each corruption damages one target (an image file, a scan folder, a CSV row of a patient) in place and returns what
a user must be told: the file (relative to the site folder, or ``csv:line``) and a regular expression of the reason.
:func:`corrupt_site` draws, with a seeded generator, a corruption per chosen patient and applies it to a model-input
scan (a scan before the recurrence/censoring day), so that every corruption has a visible effect.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MODALITIES = ("t1n", "t1c", "t2w", "t2f")


@dataclass(frozen=True)
class Expect:
    """What the user must be told about one corruption.

    Attributes
    ----------
    patient_id:
        The patient hit.
    kind:
        The corruption's name.
    path:
        The file/folder named in the message, relative to the site folder (``outcomes.csv:3`` for a CSV row).
    reason:
        Regular expression the reason must match.
    scope:
        ``"patient"``: the patient is excluded; ``"scan"``: only ``timepoint`` is dropped.
    timepoint:
        The scan hit (None for an outcome corruption).
    """

    patient_id: str
    kind: str
    path: str
    reason: str
    scope: str
    timepoint: str | None


# ----------------------------------------------------------------------------------------------- image corruptions
# (path, rng) -> reason regex; the file keeps its name.


def _truncate_gzip(path: Path, rng: np.random.Generator) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * rng.uniform(0.05, 0.95))])
    return r"truncated"


def _garbage_header(path: Path, rng: np.random.Generator) -> str:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[:348] = rng.integers(0, 256, 348, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    return r"unreadable"


def _garbage_file(path: Path, rng: np.random.Generator) -> str:
    path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
    return r"unreadable header"


def _flip_bytes(path: Path, rng: np.random.Generator) -> str:
    data = bytearray(path.read_bytes())
    lo = len(data) // 4
    for i in rng.choice(np.arange(lo, len(data) - 16), 8, replace=False):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return r"corrupt gzip data|truncated"


def _huge_dims(path: Path, rng: np.random.Generator) -> str:
    """A header announcing a volume far larger than the data (must not be allocated)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[42:48] = struct.pack("<3h", 30000, 30000, 30000)
    path.write_bytes(gzip.compress(bytes(raw)))
    return r"truncated"


def _wrong_dims_4d(path: Path, rng: np.random.Generator) -> str:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    img = sitk.JoinSeries([sitk.GetImageFromArray(arr), sitk.GetImageFromArray(arr[::-1].copy())])
    sitk.WriteImage(img, str(path))
    return r"4D image of size \d+x\d+x\d+x2"


def _wrong_dims_2d(path: Path, rng: np.random.Generator) -> str:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(arr[arr.shape[0] // 2]), str(path))
    return r"2D image"


def _vector_pixels(path: Path, rng: np.random.Generator) -> str:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr, arr], -1), isVector=True), str(path))
    return r"3-component"


def _nonfinite(value: float) -> Callable[[Path, np.random.Generator], str]:
    def corrupt(path: Path, rng: np.random.Generator) -> str:
        img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(img)
        flat = arr.reshape(-1)
        flat[rng.choice(flat.size, int(rng.integers(1, 50)), replace=False)] = value
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(path))
        return r"NaN/inf voxel"

    return corrupt


def _all_zero(path: Path, rng: np.random.Generator) -> str:
    img = sitk.ReadImage(str(path))
    sitk.WriteImage(img * 0, str(path))
    return r"all-zero volume"


def _empty_file(path: Path, rng: np.random.Generator) -> str:
    path.write_bytes(b"")
    return r"empty file"


def _missing_file(path: Path, rng: np.random.Generator) -> str:
    path.unlink()
    return rf"missing: expected {re.escape(path.name)}"


def _symlink_loop_file(path: Path, rng: np.random.Generator) -> str:
    path.unlink()
    os.symlink(path.name, path)
    return r"symlink loop"


def _dangling_symlink(path: Path, rng: np.random.Generator) -> str:
    path.unlink()
    os.symlink("does-not-exist.nii.gz", path)
    return r"broken symlink"


def _folder_instead(path: Path, rng: np.random.Generator) -> str:
    path.unlink()
    path.mkdir()
    return r"not a regular file"


def _zero_spacing(path: Path, rng: np.random.Generator) -> str:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    axis = int(rng.integers(0, 3))
    raw[80 + 4 * axis : 84 + 4 * axis] = struct.pack("<f", 0.0)
    raw[252:256] = struct.pack("<2h", 0, 0)  # no qform/sform: the spacing comes from pixdim
    path.write_bytes(gzip.compress(bytes(raw)))
    return r"pixdim\) is zero"


def _nan_spacing(path: Path, rng: np.random.Generator) -> str:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = struct.pack("<f", float("nan"))
    path.write_bytes(gzip.compress(bytes(raw)))
    return r"header pixdim is not finite"


def _nan_scaling(path: Path, rng: np.random.Generator) -> str:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:116] = struct.pack("<f", float("inf"))
    path.write_bytes(gzip.compress(bytes(raw)))
    return r"header scl_slope is not finite"


#: Corruptions of one image file: name -> function.
IMAGE_CORRUPTIONS: dict[str, Callable[[Path, np.random.Generator], str]] = {
    "truncated gzip": _truncate_gzip,
    "garbage header": _garbage_header,
    "garbage file": _garbage_file,
    "flipped bytes": _flip_bytes,
    "huge dims in header": _huge_dims,
    "4D image": _wrong_dims_4d,
    "2D image": _wrong_dims_2d,
    "vector pixels": _vector_pixels,
    "NaN voxels": _nonfinite(float("nan")),
    "inf voxels": _nonfinite(float("inf")),
    "all-zero volume": _all_zero,
    "empty file": _empty_file,
    "missing file": _missing_file,
    "symlink loop": _symlink_loop_file,
    "dangling symlink": _dangling_symlink,
    "folder instead of file": _folder_instead,
    "zero spacing": _zero_spacing,
    "NaN spacing": _nan_spacing,
    "inf scaling": _nan_scaling,
}


# ------------------------------------------------------------------------------------------------- CSV corruptions


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def _row_index(rows: list[list[str]], *key: str) -> int:
    for i, row in enumerate(rows):
        if tuple(row[: len(key)]) == key:
            return i
    raise KeyError(key)


def corrupt_day(site: Path, pid: str, tp: str, rng: np.random.Generator) -> tuple[str, str]:
    """Make the scan's day unusable; returns (csv:line, reason)."""
    path = site / "scan_dates.csv"
    rows = read_rows(path)
    i = _row_index(rows, pid, tp)
    choice = int(rng.integers(0, 4))
    if choice == 0:
        rows[i][2], reason = "twelve", r"day is not a number"
    elif choice == 1:
        rows[i][2], reason = "-3", r"day is negative"
    elif choice == 2:
        rows[i][2], reason = "nan", r"day is not finite"
    else:
        rows[i] = []  # a blank line: the row is gone, the other rows keep their line numbers
        write_rows(path, rows)
        return f"{pid}-{tp}", r"no date row"
    write_rows(path, rows)
    return f"scan_dates.csv:{i + 1}", reason


def corrupt_outcome(site: Path, pid: str, rng: np.random.Generator) -> tuple[str, str]:
    """Make the patient's outcome unusable; returns (file or csv:line, reason)."""
    path = site / "outcomes.csv"
    rows = read_rows(path)
    i = _row_index(rows, pid)
    choice = int(rng.integers(0, 7))
    if choice in (5, 6):  # a line the csv module cannot read: an unbalanced quote, a byte that is not UTF-8
        write_rows(path, rows)
        lines = path.read_bytes().split(b"\n")
        lines[i] = lines[i].replace(b",", b',"', 1) if choice == 5 else lines[i].replace(b",", b"\xe9,", 1)
        path.write_bytes(b"\n".join(lines))
        return f"outcomes.csv:{i + 1}", r"unbalanced quote" if choice == 5 else r"not UTF-8 text"
    if choice == 0:
        rows[i][1], reason = "2", r"event must be 0 or 1"
    elif choice == 1:
        rows[i][2], reason = "-10", r"time_days is negative"
    elif choice == 2:
        rows[i][2], reason = "", r"time_days missing"
    elif choice == 3:
        rows.append([pid, "1" if rows[i][1] == "0" else "0", rows[i][2]])
        write_rows(path, rows)
        return f"outcomes.csv:{len(rows)}", r"conflicting duplicate rows"
    else:
        rows[i] = []
        write_rows(path, rows)
        return "outcomes.csv", rf"no outcome row for patient {pid}"
    write_rows(path, rows)
    return f"outcomes.csv:{i + 1}", reason


# --------------------------------------------------------------------------------------------------- the site


def model_input_scans(site: Path) -> dict[str, list[str]]:
    """Patient -> the timepoints that are model inputs (day < time for event 1, day <= time when censored)."""
    outcomes = {r[0]: (int(r[1]), float(r[2])) for r in read_rows(site / "outcomes.csv")[1:]}
    scans: dict[str, list[str]] = {}
    for pid, tp, day in read_rows(site / "scan_dates.csv")[1:]:
        event, time = outcomes[pid]
        if float(day) < time or (event == 0 and float(day) <= time):
            scans.setdefault(pid, []).append(tp)
    return {pid: sorted(tps) for pid, tps in scans.items()}


#: Kinds drawn by :func:`corrupt_site`: every image corruption, then folder and CSV corruptions.
KINDS: tuple[str, ...] = (*IMAGE_CORRUPTIONS, "scan folder symlink loop", "pre-op folder missing", "bad day",
                          "bad outcome")


def corrupt_patient(site: Path, pid: str, kind: str, scans: list[str], rng: np.random.Generator) -> Expect:
    """Apply corruption ``kind`` to patient ``pid`` (one of its model-input ``scans``); return the expectation."""
    if kind == "bad outcome":
        path, reason = corrupt_outcome(site, pid, rng)
        return Expect(pid, kind, path, reason, "patient", None)
    tp = "000" if kind == "pre-op folder missing" or rng.random() < 0.5 or len(scans) == 1 else str(
        rng.choice(scans[1:]))
    scope = "patient" if tp == "000" else "scan"
    folder = site / f"{pid}-{tp}"
    if kind == "pre-op folder missing":
        shutil.rmtree(folder)
        return Expect(pid, kind, folder.name, r"pre-op scan 000 missing", scope, tp)
    if kind == "scan folder symlink loop":
        shutil.rmtree(folder)
        os.symlink(folder.name, folder)
        return Expect(pid, kind, folder.name, r"symlink loop", scope, tp)
    if kind == "bad day":
        path, reason = corrupt_day(site, pid, tp, rng)
        return Expect(pid, kind, path, reason, scope, tp)
    modality = str(rng.choice(MODALITIES))
    target = folder / f"{pid}-{tp}-{modality}.nii.gz"
    reason = IMAGE_CORRUPTIONS[kind](target, rng)
    where = folder.name if kind == "missing file" else f"{folder.name}/{target.name}"
    return Expect(pid, kind, where, reason, scope, tp)


def corrupt_site(site: Path, seed: int, *, n_corrupt: int, kinds: tuple[str, ...] = KINDS,
                 keep: int = 1) -> tuple[list[Expect], list[str]]:
    """Corrupt ``n_corrupt`` patients of ``site`` with kinds drawn from ``kinds`` (seeded); keep ``keep`` clean.

    Returns
    -------
    (expectations, clean patient ids)
    """
    rng = np.random.default_rng(seed)
    scans = model_input_scans(site)
    patients = sorted(scans)
    order = [patients[i] for i in rng.permutation(len(patients))]
    clean = sorted(order[:keep])
    hit = order[keep : keep + n_corrupt]
    expects = [corrupt_patient(site, pid, str(rng.choice(kinds)), scans[pid], rng) for pid in hit]
    return expects, clean
