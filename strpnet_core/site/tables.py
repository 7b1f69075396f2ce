"""Reading the two CSV files of a site: scan dates and outcomes. Every bad row becomes a one-line Problem that
names ``file:line`` (line 1 is the header); good rows go on."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import OUTCOMES_COLUMNS, OUTCOMES_CSV, SCAN_DATES_COLUMNS, SCAN_DATES_CSV
from .records import WARNING, Problem

_TIMEPOINT_RE = re.compile(r"^\d{1,3}$")


@dataclass
class Entry:
    """The parsed value of one key (a scan or a patient) of a CSV file.

    Attributes
    ----------
    where:
        ``"file.csv:line"`` of the row (the first one when duplicated).
    value:
        The parsed value; None when the row is defective.
    problems:
        Why the value is None (empty when it is valid).
    """

    where: str
    value: Any = None
    problems: list[Problem] = field(default_factory=list)


def _split_line(line: str) -> list[str] | str:
    """The cells of one CSV line, or the reason it is not one (an unbalanced quote, a field over the csv limit)."""
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as exc:
        return "unbalanced quote" if line.count('"') % 2 else f"not valid CSV ({exc})"
    if len(rows) != 1:
        return "unbalanced quote" if line.count('"') % 2 else "not valid CSV"
    return rows[0]


def read_table(path: Path, columns: tuple[str, ...]) -> tuple[list[tuple[str, dict[str, str]]] | None, Problem | None]:
    """Read a CSV file with a header holding at least ``columns`` (case and surrounding blanks ignored).

    Each line is one row (quoted fields may not span lines): a bad line (not UTF-8, an unbalanced quote, a field
    over Python's csv limit) is reported on its own, with its line number, and the other rows go on.

    Returns
    -------
    (rows, problem)
        ``rows`` = (``"name:line"``, {column: stripped text}) per non-blank row, or ``("name:line", {"": reason})``
        for a line that could not be read; or None with a site-level Problem when the file is missing, unreadable
        or has the wrong header.
    """
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, Problem(name, "file missing", None)
    except IsADirectoryError:
        return None, Problem(name, "is a folder, not a file", None)
    except OSError as exc:
        return None, Problem(name, f"cannot read: {exc.strerror or exc}", None)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.splitlines()
    if not any(line.strip() for line in lines):
        return None, Problem(name, f"empty file: header {','.join(columns)} expected", None)
    if not lines[0].strip():
        return None, Problem(f"{name}:1", f"blank first line: header {','.join(columns)} expected on line 1", None)
    try:
        header_cells = _split_line(lines[0].decode("utf-8"))
    except UnicodeDecodeError:
        return None, Problem(f"{name}:1", "header is not UTF-8 text", None)
    if isinstance(header_cells, str):
        return None, Problem(f"{name}:1", f"header is {header_cells}", None)
    header = [h.strip().lower() for h in header_cells]
    missing = [c for c in columns if c not in header]
    dup = sorted({h for h in header if header.count(h) > 1 and h in columns})
    if missing or dup:
        why = f"missing column(s) {', '.join(missing)}" if missing else f"duplicate column(s) {', '.join(dup)}"
        return None, Problem(f"{name}:1", f"wrong header {','.join(header)!r}: {why}; expected {','.join(columns)}",
                             None)
    index = {c: header.index(c) for c in columns}
    rows: list[tuple[str, dict[str, str]]] = []
    for lineno, raw in enumerate(lines[1:], start=2):
        where = f"{name}:{lineno}"
        try:
            cells = _split_line(raw.decode("utf-8"))
        except UnicodeDecodeError:
            cells = "not UTF-8 text"
        if isinstance(cells, str):
            rows.append((where, {"": cells}))
            continue
        if not any(c.strip() for c in cells):
            continue
        rows.append((where, {c: (cells[i].strip() if i < len(cells) else "") for c, i in index.items()}))
    return rows, None


def _bad_line(where: str, row: dict[str, str]) -> Problem | None:
    """A Problem for a line :func:`read_table` could not read (its id is unknown: the row is ignored)."""
    return Problem(where, f"{row['']} (row ignored)", None) if "" in row else None


#: A decimal number as a CSV cell spells it (``12``, ``-0.5``, ``1e3``; also ``nan``/``inf``, refused later as not
#: finite). Python's ``float`` accepts more: ``1_0`` is 10 and would silently be read as a day 10.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?i:nan|inf|infinity)")


def _number(text: str) -> float:
    """``float(text)`` for a plain decimal number only (ValueError otherwise)."""
    if _NUMBER.fullmatch(text.strip()) is None:
        raise ValueError(text)
    return float(text)


def parse_nonnegative(text: str, column: str) -> float | str:
    """Parse a finite number >= 0; return it, or the one-line reason it is not one."""
    if text == "":
        return f"{column} missing"
    try:
        value = _number(text)
    except ValueError:
        return f"{column} is not a number: {text!r}"
    if not math.isfinite(value):
        return f"{column} is not finite: {text!r}"
    if value < 0:
        return f"{column} is negative: {text!r}"
    return value


def parse_event(text: str) -> int | str:
    """Parse an event indicator (0 or 1, ``1.0`` accepted); return it or the reason it is not one."""
    if text == "":
        return "event missing"
    try:
        value = _number(text)
    except ValueError:
        return f"event must be 0 or 1, got {text!r}"
    if value not in (0.0, 1.0):
        return f"event must be 0 or 1, got {text!r}"
    return int(value)


def _merge(table: dict[Any, Entry], key: Any, entry: Entry, patient_id: str, loose: list[Problem]) -> None:
    """Insert ``entry`` under ``key``; a duplicate row is a warning when identical, an error otherwise."""
    first = table.get(key)
    if first is None:
        table[key] = entry
        return
    if first.value is not None and first.value == entry.value:
        reason = f"duplicate of row {first.where} (same values, ignored)"
        loose.append(Problem(entry.where, reason, patient_id, WARNING))
        return
    reason = f"conflicting duplicate rows {first.where} and {entry.where}"
    # an already defective key keeps its earlier reasons (a third row must not hide the second's conflict)
    table[key] = Entry(first.where, None, [*first.problems, Problem(entry.where, reason, patient_id)])


def read_scan_dates(site_dir: Path) -> tuple[dict[tuple[str, str], Entry] | None, list[Problem]]:
    """Read ``scan_dates.csv`` (patient_id, timepoint, day).

    The timepoint is zero-padded to 3 digits (``1`` -> ``001``: spreadsheets drop leading zeros); day must be a
    finite number >= 0.

    Returns
    -------
    (dates, problems)
        ``dates[(patient_id, timepoint)]`` -> Entry (value = day), or None when the file is unusable;
        ``problems``: site-level and row problems not attached to a key (bad timepoint, empty id, duplicates).
    """
    rows, problem = read_table(site_dir / SCAN_DATES_CSV, SCAN_DATES_COLUMNS)
    if rows is None:
        return None, [problem] if problem else []
    dates: dict[tuple[str, str], Entry] = {}
    loose: list[Problem] = []
    for where, row in rows:
        if (bad := _bad_line(where, row)) is not None:
            loose.append(bad)
            continue
        pid, tp = row["patient_id"], row["timepoint"]
        if not pid:
            loose.append(Problem(where, "patient_id missing (row ignored)", None))
            continue
        if not _TIMEPOINT_RE.match(tp):
            loose.append(Problem(where, f"timepoint is not a 3-digit number: {tp!r} (row ignored)", pid))
            continue
        day = parse_nonnegative(row["day"], "day")
        entry = Entry(where, day) if isinstance(day, float) else Entry(where, None, [Problem(where, day, pid)])
        _merge(dates, (pid, tp.zfill(3)), entry, pid, loose)
    return dates, loose


def read_outcomes(site_dir: Path) -> tuple[dict[str, Entry] | None, list[Problem]]:
    """Read ``outcomes.csv`` (patient_id, event, time_days).

    Returns
    -------
    (outcomes, problems)
        ``outcomes[patient_id]`` -> Entry (value = (event, time_days)), or None when the file is unusable;
        ``problems``: site-level and row problems not attached to a patient.
    """
    rows, problem = read_table(site_dir / OUTCOMES_CSV, OUTCOMES_COLUMNS)
    if rows is None:
        return None, [problem] if problem else []
    outcomes: dict[str, Entry] = {}
    loose: list[Problem] = []
    for where, row in rows:
        if (bad := _bad_line(where, row)) is not None:
            loose.append(bad)
            continue
        pid = row["patient_id"]
        if not pid:
            loose.append(Problem(where, "patient_id missing (row ignored)", None))
            continue
        event = parse_event(row["event"])
        time = parse_nonnegative(row["time_days"], "time_days")
        reasons = [r for r in (event, time) if isinstance(r, str)]
        if reasons:
            entry = Entry(where, None, [Problem(where, r, pid) for r in reasons])
        else:
            entry = Entry(where, (event, time))
        _merge(outcomes, pid, entry, pid, loose)
    return outcomes, loose


__all__ = ["Entry", "parse_event", "parse_nonnegative", "read_outcomes", "read_scan_dates", "read_table"]
