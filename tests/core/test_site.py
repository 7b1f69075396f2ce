"""Site validation: a clean site validates cleanly; each defect gives one line naming the file and the reason,
excludes only its case (or scan), and the CLI exits 1 when nothing is usable."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from strpnet_core.cli import main as cli_main
from strpnet_core.site import (
    ImageDefect,
    PatientRecord,
    Problem,
    Scan,
    SiteIndex,
    read_image_checked,
    validate_site,
)

MODS_2023 = ("t1n", "t1c", "t2w", "t2f")
MODS_2021 = ("t1", "t1ce", "t2", "flair")
DAYS = {"000": 0, "001": 60, "002": 120}
#: P01 recurs at day 150 (3 scans before), P02 censored at 200, P03 recurs at 100 (scan 002 at day 120 is after).
OUTCOMES = {"P01": (1, 150), "P02": (0, 200), "P03": (1, 100)}


def write_img(path: Path, arr: np.ndarray | None = None, *, origin=(0.0, 0.0, 0.0), spacing=(4.0, 4.0, 4.0)) -> Path:
    """Write a tiny NIfTI volume (random positive intensities unless ``arr`` is given)."""
    if arr is None:
        arr = np.random.default_rng(abs(hash(path.name)) % 2**32).random((8, 8, 8), dtype=np.float32) + 1
    img = sitk.GetImageFromArray(arr, isVector=False)
    if img.GetDimension() == 3:
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def mask(value: int = 1) -> np.ndarray:
    m = np.zeros((8, 8, 8), np.uint8)
    m[2:5, 2:5, 2:5] = value
    return m


def make_site(root: Path, naming: str = "2023") -> Path:
    """A valid 3-patient site with 3 scans each, segmentations, dates, outcomes and recurrence masks."""
    site = root / "site-A"
    mods, sep = (MODS_2023, "-") if naming == "2023" else (MODS_2021, "_")
    for pid in OUTCOMES:
        for tp in DAYS:
            folder = site / f"{pid}{sep}{tp}"
            for m in mods:
                write_img(folder / f"{folder.name}{sep}{m}.nii.gz")
            write_img(folder / f"{folder.name}{sep}seg.nii.gz", mask(2))
    (site / "scan_dates.csv").write_text(
        "patient_id,timepoint,day\n" + "".join(f"{p},{t},{d}\n" for p in OUTCOMES for t, d in DAYS.items())
    )
    (site / "outcomes.csv").write_text(
        "patient_id,event,time_days\n" + "".join(f"{p},{e},{t}\n" for p, (e, t) in OUTCOMES.items())
    )
    for pid, (event, _) in OUTCOMES.items():
        if event:
            write_img(site / "recurrence" / f"{pid}-recurrence.nii.gz", mask())
    (site / "site.json").write_text(json.dumps({"site_name": "Hospital A"}))
    return site


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("template"))


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "site-A", symlinks=True))


def f(site: Path, pid: str, tp: str, mod: str) -> Path:
    return site / f"{pid}-{tp}" / f"{pid}-{tp}-{mod}.nii.gz"


def usable(index: SiteIndex) -> set[str]:
    return {p.patient_id for p in index.patients}


def one(index: SiteIndex, needle: str) -> Problem:
    """The single problem whose reason contains ``needle``."""
    found = [p for p in index.problems if needle in p.reason]
    assert len(found) == 1, f"expected one problem with {needle!r}, got {[str(p) for p in index.problems]}"
    return found[0]


def set_csv(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def cli(*args: str) -> int:
    return cli_main(["validate", *map(str, args)])


# ---------------------------------------------------------------------------------------------------------- valid


def test_valid_site(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = validate_site(site)
    assert index.problems == []
    assert index.site_name == "Hospital A"
    assert [p.patient_id for p in index.patients] == ["P01", "P02", "P03"]
    p1, p2, p3 = index.patients
    assert isinstance(p1, PatientRecord) and isinstance(p1.scans[0], Scan)
    assert [s.timepoint for s in p1.scans] == ["000", "001", "002"] and [s.day for s in p1.scans] == [0, 60, 120]
    assert set(p1.scans[0].images) == set(MODS_2023) and p1.scans[0].seg is not None
    assert p1.scans[1].images["t2f"] == f(site, "P01", "001", "t2f")
    assert (p1.event, p1.time_days) == (1, 150.0) and p1.recurrence == site / "recurrence" / "P01-recurrence.nii.gz"
    assert (p2.event, p2.recurrence, len(p2.scans)) == (0, None, 3)
    assert [s.timepoint for s in p3.scans] == ["000", "001"]  # scan 002 (day 120) is after the recurrence (day 100)
    assert index.summary() == {
        "site_name": "Hospital A", "usable": 3, "excluded": 0, "events": 2, "scans": 8, "errors": 0, "warnings": 0,
    }
    assert cli(site) == 0
    out = capsys.readouterr().out
    assert "P03" in out and "OK" in out and "3 usable, 0 excluded" in out


def test_brats2021_naming(tmp_path: Path) -> None:
    site = make_site(tmp_path, naming="2021")
    index = validate_site(site)
    assert index.problems == [] and usable(index) == {"P01", "P02", "P03"}
    assert index.patients[0].scans[0].images["t1c"].name == "P01_000_t1ce.nii.gz"


def test_inference_mode_ignores_outcomes(site: Path) -> None:
    (site / "outcomes.csv").unlink()
    index = validate_site(site, require_outcomes=False)
    assert index.problems == []
    assert all(p.event is None and p.time_days is None and p.recurrence is None for p in index.patients)
    assert [len(p.scans) for p in index.patients] == [3, 3, 3]


def test_json_output(site: Path, tmp_path: Path) -> None:
    f(site, "P02", "000", "t2f").unlink()
    assert cli(site, "--json", tmp_path / "out.json") == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["summary"]["usable"] == 2 and list(data["excluded"]) == ["P02"]
    assert data["patients"][0]["scans"][0]["images"]["t1c"].endswith("P01-000-t1c.nii.gz")


# ------------------------------------------------------------------------------------------------- image defects


def test_truncated_gzip_followup_drops_only_that_scan(site: Path) -> None:
    path = f(site, "P02", "001", "t1c")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    index = validate_site(site)
    p = one(index, "truncated")
    assert p.path == "P02-001/P02-001-t1c.nii.gz" and p.patient_id == "P02" and p.level == "error"
    assert usable(index) == {"P01", "P02", "P03"}
    assert [s.timepoint for s in index.patients[1].scans] == ["000", "002"]
    # header-only mode cannot see it: documented
    assert validate_site(site, check_voxels=False).problems == []


def test_truncated_preop_excludes_patient(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = f(site, "P01", "000", "t2w")
    path.write_bytes(path.read_bytes()[:-40])
    index = validate_site(site)
    assert usable(index) == {"P02", "P03"}
    assert [str(q) for q in index.excluded["P01"]] == [str(one(index, "truncated"))]
    assert cli(site) == 0
    out = capsys.readouterr().out
    assert "EXCLUDED" in out and "P01-000/P01-000-t2w.nii.gz: truncated" in out


def test_uncompressed_truncated_nii(tmp_path: Path) -> None:
    path = write_img(tmp_path / "x.nii")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ImageDefect, match="truncated"):
        read_image_checked(path)


def test_garbage_file(site: Path) -> None:
    f(site, "P03", "000", "t1n").write_bytes(os.urandom(500))
    index = validate_site(site, check_voxels=False)
    p = one(index, "unreadable header")
    assert p.path == "P03-000/P03-000-t1n.nii.gz" and "Unable to determine ImageIO reader" in p.reason
    assert "\n" not in p.reason and usable(index) == {"P01", "P02"}


def test_gzip_of_garbage_header(site: Path) -> None:
    f(site, "P03", "001", "t1n").write_bytes(gzip.compress(os.urandom(2000)))
    index = validate_site(site)
    assert one(index, "unreadable").path == "P03-001/P03-001-t1n.nii.gz"
    assert usable(index) == {"P01", "P02", "P03"}


def test_4d_image(site: Path) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), f(site, "P02", "000", "t1c"))
    index = validate_site(site)
    p = one(index, "4D image")
    assert p.path == "P02-000/P02-000-t1c.nii.gz" and "8x8x8x3" in p.reason
    assert usable(index) == {"P01", "P03"}


def test_4d_singleton_is_accepted(site: Path) -> None:
    import nibabel as nib

    data = np.random.default_rng(0).random((8, 8, 8, 1)).astype(np.float32) + 1
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), f(site, "P02", "001", "t2w"))
    assert read_image_checked(f(site, "P02", "001", "t2w")).GetDimension() == 3
    index = validate_site(site)
    assert index.problems == [] and len(index.patients[1].scans) == 3


def test_nan_voxel(site: Path) -> None:
    # ITK's NIfTI reader turns NaN/inf into 0: the check must read the raw bytes (nibabel confirms they are there)
    arr = np.random.default_rng(1).random((8, 8, 8), dtype=np.float32) + 1
    arr[3, 4, 5] = np.nan
    arr[0, 0, 0] = np.inf
    write_img(f(site, "P01", "001", "t2f"), arr)
    import nibabel as nib

    assert np.isnan(np.asarray(nib.load(f(site, "P01", "001", "t2f")).dataobj)).sum() == 1
    index = validate_site(site)
    p = one(index, "NaN/inf")
    assert p.path == "P01-001/P01-001-t2f.nii.gz" and p.reason.startswith("2 ")
    assert usable(index) == {"P01", "P02", "P03"} and len(index.patients[0].scans) == 2


def test_all_zero_volume(site: Path) -> None:
    write_img(f(site, "P01", "000", "t1n"), np.zeros((8, 8, 8), np.float32))
    index = validate_site(site)
    assert one(index, "all-zero volume").path == "P01-000/P01-000-t1n.nii.gz"
    assert usable(index) == {"P02", "P03"}


def test_missing_modality(site: Path) -> None:
    f(site, "P03", "000", "t2f").unlink()
    index = validate_site(site)
    p = one(index, "t2f missing")
    assert p.path == "P03-000" and "P03-000-t2f.nii.gz" in p.reason and "flair" in p.reason
    assert usable(index) == {"P01", "P02"} and index.excluded["P03"] == [p]


def test_seg_on_wrong_grid_is_dropped(site: Path) -> None:
    write_img(f(site, "P01", "001", "seg"), mask(1), origin=(4.0, 0.0, 0.0))
    index = validate_site(site)
    p = one(index, "seg grid differs")
    assert p.path == "P01-001/P01-001-seg.nii.gz" and "origin" in p.reason
    scans = index.patients[0].scans
    assert len(scans) == 3 and scans[1].seg is None and scans[0].seg is not None


def test_unread_file_in_a_scan_folder_warns(site: Path) -> None:
    """A file the validator does not read (an old copy, a note) is named in a warning; the scan stays usable."""
    stray = f(site, "P01", "001", "t1c").with_name("P01-001-t1c_old.nii.gz")
    stray.write_bytes(f(site, "P01", "001", "t1c").read_bytes())
    (site / "P01-001" / ".DS_Store").write_text("hidden entries are ignored")
    index = validate_site(site)
    p = one(index, "unexpected file in the scan folder")
    assert p.path == "P01-001/P01-001-t1c_old.nii.gz" and p.level == "warning" and p.patient_id == "P01"
    assert usable(index) == {"P01", "P02", "P03"} and len(index.patients[0].scans) == 3
    assert index.patients[0].scans[1].images["t1c"] == f(site, "P01", "001", "t1c")
    assert index.summary()["warnings"] == 1 and index.summary()["errors"] == 0


# ----------------------------------------------------------------------------------------------- identity, CSVs


def test_duplicate_id_2021_and_2023_naming(site: Path) -> None:
    folder = site / "P02_000"
    for m in MODS_2021:
        write_img(folder / f"P02_000_{m}.nii.gz")
    index = validate_site(site)
    p = one(index, "duplicate patient id P02")
    assert p.path == "P02_000" and "P02-000" in p.reason
    assert usable(index) == {"P01", "P03"} and "P02" in index.excluded


def test_duplicate_csv_rows(site: Path) -> None:
    with open(site / "outcomes.csv", "a") as fh:
        fh.write("P01,1,150\nP03,0,300\n")
    index = validate_site(site)
    dup = one(index, "duplicate of row")
    assert (dup.path, dup.level) == ("outcomes.csv:5", "warning")
    conflict = one(index, "conflicting duplicate rows")
    assert conflict.path == "outcomes.csv:6" and "outcomes.csv:4" in conflict.reason
    assert usable(index) == {"P01", "P02"}
    # a third row, identical to the first, does not hide the conflicting second one
    with open(site / "outcomes.csv", "a") as fh:
        fh.write("P03,1,100\n")
    conflicts = [p for p in validate_site(site).problems if "conflicting duplicate rows" in p.reason]
    assert [p.path for p in conflicts] == ["outcomes.csv:6", "outcomes.csv:7"]


def test_scan_without_date_row(site: Path) -> None:
    set_csv(site / "scan_dates.csv", "P02,001,60\n", "")
    set_csv(site / "scan_dates.csv", "P03,000,0\n", "")
    index = validate_site(site)
    follow = one(index, "timepoint 001")
    assert follow.path == "P02-001" and "no date row in scan_dates.csv" in follow.reason
    assert one(index, "timepoint 000").path == "P03-000"
    assert usable(index) == {"P01", "P02"} and [s.timepoint for s in index.patients[1].scans] == ["000", "002"]


def test_date_row_without_folder_warns(site: Path) -> None:
    with open(site / "scan_dates.csv", "a") as fh:
        fh.write("P01,003,300\n")
    index = validate_site(site)
    p = one(index, "without scan folder P01-003")
    assert (p.path, p.level) == ("scan_dates.csv:11", "warning")
    assert usable(index) == {"P01", "P02", "P03"}


def test_bad_days(site: Path) -> None:
    set_csv(site / "scan_dates.csv", "P01,001,60", "P01,001,sixty")
    set_csv(site / "scan_dates.csv", "P02,002,120", "P02,002,-5")
    set_csv(site / "scan_dates.csv", "P03,000,0", "P03,000,7")
    index = validate_site(site)
    assert one(index, "day is not a number").path == "scan_dates.csv:3"
    assert one(index, "day is negative").path == "scan_dates.csv:7"
    assert one(index, "must be at day 0").path == "scan_dates.csv:8"
    assert usable(index) == {"P01", "P02"}
    assert [len(p.scans) for p in index.patients] == [2, 2]


def test_days_out_of_timepoint_order_warn(site: Path) -> None:
    set_csv(site / "scan_dates.csv", "P02,001,60", "P02,001,130")
    index = validate_site(site)
    p = one(index, "days do not increase with the timepoint")
    assert (p.level, p.patient_id) == ("warning", "P02") and "000, 002, 001" in p.reason
    assert [s.timepoint for s in index.patients[1].scans] == ["000", "002", "001"]  # sorted by day


def test_timepoint_without_leading_zeros_is_accepted(site: Path) -> None:
    set_csv(site / "scan_dates.csv", "P01,001,60", "P01,1,60")
    assert validate_site(site).problems == []


def test_missing_preop_scan(site: Path) -> None:
    shutil.rmtree(site / "P02-000")
    index = validate_site(site)
    assert one(index, "pre-op scan 000 missing").path == "P02-000"
    assert usable(index) == {"P01", "P03"}


def test_outcome_missing(site: Path) -> None:
    set_csv(site / "outcomes.csv", "P02,0,200\n", "")
    index = validate_site(site)
    p = one(index, "no outcome row for patient P02")
    assert p.path == "outcomes.csv" and usable(index) == {"P01", "P03"}


def test_event_not_binary(site: Path) -> None:
    set_csv(site / "outcomes.csv", "P01,1,150", "P01,2,150")
    index = validate_site(site)
    p = one(index, "event must be 0 or 1, got '2'")
    assert p.path == "outcomes.csv:2" and usable(index) == {"P02", "P03"}


@pytest.mark.parametrize(("value", "reason"), [("-3", "time_days is negative: '-3'"),
                                              ("abc", "time_days is not a number: 'abc'"),
                                              ("1_00", "time_days is not a number: '1_00'"),  # float() reads 100
                                              ("", "time_days missing")])
def test_bad_time(site: Path, value: str, reason: str) -> None:
    set_csv(site / "outcomes.csv", "P03,1,100", f"P03,1,{value}")
    index = validate_site(site)
    assert one(index, reason).path == "outcomes.csv:4"
    assert usable(index) == {"P01", "P02"}


def test_missing_csv(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "outcomes.csv").unlink()
    index = validate_site(site)
    site_problem = [p for p in index.problems if p.patient_id is None]
    assert [str(p) for p in site_problem] == ["outcomes.csv: file missing"]
    assert index.patients == [] and set(index.excluded) == {"P01", "P02", "P03"}
    assert cli(site) == 1
    assert "0 usable, 3 excluded" in capsys.readouterr().out


def test_wrong_csv_header(site: Path) -> None:
    set_csv(site / "scan_dates.csv", "patient_id,timepoint,day", "patient,timepoint,days")
    index = validate_site(site)
    p = [q for q in index.problems if q.patient_id is None]
    assert len(p) == 1 and p[0].path == "scan_dates.csv:1" and "missing column(s) patient_id, day" in p[0].reason
    assert index.patients == []
    assert cli(site) == 1
    (site / "scan_dates.csv").write_text("\npatient_id,timepoint,day\nP01,000,0\n")  # was called "empty file"
    p = [q for q in validate_site(site).problems if q.patient_id is None]
    assert [str(q) for q in p] == ["scan_dates.csv:1: blank first line: header patient_id,timepoint,day expected "
                                   "on line 1"]


# ------------------------------------------------------------------------------------------------- recurrence


def test_recurrence_not_binary(site: Path) -> None:
    write_img(site / "recurrence" / "P01-recurrence.nii.gz", mask(3))
    index = validate_site(site)
    p = one(index, "not a binary mask")
    assert p.path == "recurrence/P01-recurrence.nii.gz" and "value 3" in p.reason
    assert usable(index) == {"P01", "P02", "P03"} and index.patients[0].recurrence is None
    strict = validate_site(site, require_recurrence=True)
    assert usable(strict) == {"P02", "P03"} and "not a binary mask" in strict.excluded["P01"][0].reason


def test_recurrence_wrong_geometry(site: Path) -> None:
    write_img(site / "recurrence" / "P03-recurrence.nii.gz", mask(), spacing=(2.0, 2.0, 2.0))
    index = validate_site(site, require_recurrence=True)
    p = one(index, "recurrence mask grid differs from the pre-op t1c")
    assert p.path == "recurrence/P03-recurrence.nii.gz" and "spacing" in p.reason
    assert usable(index) == {"P01", "P02"}


def test_recurrence_missing_when_required(site: Path) -> None:
    (site / "recurrence" / "P01-recurrence.nii.gz").unlink()
    assert usable(validate_site(site)) == {"P01", "P02", "P03"}
    index = validate_site(site, require_recurrence=True)
    assert one(index, "recurrence mask missing").path == "recurrence/P01-recurrence.nii.gz"
    assert usable(index) == {"P02", "P03"}
    assert cli(site, "--require-recurrence") == 0


# ---------------------------------------------------------------------------------------- file system, site level


def test_symlink_loops(site: Path) -> None:
    path = f(site, "P03", "001", "t1c")
    path.unlink()
    os.symlink(path.name, path)  # a link to itself
    os.symlink("P01-009", site / "P01-009")  # a scan folder that loops
    os.symlink("..", site / "P02-000" / "up")  # a cycle we must not walk
    index = validate_site(site)
    assert {p.path for p in index.problems if "symlink loop" in p.reason} == {"P03-001/P03-001-t1c.nii.gz", "P01-009"}
    assert usable(index) == {"P01", "P02", "P03"}


def test_empty_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    index = validate_site(empty)
    assert [str(p) for p in index.problems] == [f"{empty}: site folder is empty"]
    assert cli(empty) == 1
    assert "0 usable" in capsys.readouterr().out


def test_site_missing_or_not_a_folder(tmp_path: Path) -> None:
    assert validate_site(tmp_path / "nope").problems[0].reason == "site folder missing"
    (tmp_path / "file").write_text("x")
    assert validate_site(tmp_path / "file").problems[0].reason == "site folder is not a directory"
    assert cli(tmp_path / "nope") == 1


def test_site_without_scan_folders(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "outcomes.csv").write_text("patient_id,event,time_days\n")
    (tmp_path / "s" / "notes").mkdir()
    index = validate_site(tmp_path / "s")
    assert one(index, "no scan folders").level == "error"
    assert one(index, "not a scan folder").path == "notes"


# ------------------------------------------------------------------------------------------- synthetic cohort


def test_synthetic_ci_cohort_validates_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    args = ["synth", "--out", str(out), "--sites", "1", "--patients", "2", "--preset", "ci", "--seed", "0"]
    assert cli_main(args) == 0
    sites = sorted(p for p in out.iterdir() if p.name.startswith("site-"))
    assert sites
    for s in sites:
        index = validate_site(s, require_recurrence=True)
        assert [p for p in index.problems if p.level == "error"] == [], [str(p) for p in index.problems]
        assert len(index.patients) == 2


@pytest.mark.parametrize("content, expected", [
    ('{"site_name": "s", "preset": "ci", "synthetic": true}', "ci"),  # strpnet synth records its preset
    ('{"site_name": "s"}', "demo"),  # a real site: the default
    ('{"preset": "4mm"}', "demo"),  # an unknown name: the default
    ("{not json", "demo"),
    (None, "demo"),  # no site.json
])
def test_preprocess_preset_follows_a_synthetic_site(tmp_path: Path, content: str | None, expected: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from strpnet_core.commands.preprocess import site_preset

    site = tmp_path / "site"
    site.mkdir()
    if content is not None:
        (site / "site.json").write_text(content)
    assert site_preset(site)[0] == expected
    # The command says which preset it used and why (this site has no scans: exit 1 after the report).
    assert cli_main(["preprocess", str(site), "--out", str(tmp_path / "cache"), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert f"preset {expected} (" in out
    assert f"no usable patient: 0 rejected, see {tmp_path / 'cache' / 'preprocess_report.json'}" in err
    assert cli_main(["preprocess", str(site), "--out", str(tmp_path / "c2"), "--no-progress", "--preset", "brats"]) == 1
    assert "preset brats (--preset)" in capsys.readouterr().out
    # a mistyped site folder: a clear error, and nothing is created under --out
    assert cli_main(["preprocess", str(tmp_path / "typo"), "--out", str(tmp_path / "c3"), "--no-progress"]) == 2
    assert "typo: site folder missing" in capsys.readouterr().err and not (tmp_path / "c3").exists()


@pytest.mark.parametrize("gz, check_voxels", [(False, False), (True, True)])
def test_a_non_finite_voxel_offset_is_named_and_the_site_goes_on(site: Path, gz: bool, check_voxels: bool) -> None:
    """A NaN vox_offset in one header made the byte-count check (an uncompressed file's length, or every file's
    voxels) raise an uncaught ValueError: the whole site's validation stopped. Now the file is named and only its
    patient (pre-op scan) is excluded."""
    import gzip
    import struct

    pid = sorted(OUTCOMES)[0]
    path = f(site, pid, "000", "t2w")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[108:112] = struct.pack("<f", float("nan"))
    path.unlink()
    path = path if gz else path.with_suffix("")  # .nii
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    index = validate_site(site, check_voxels=check_voxels)
    p = one(index, "vox_offset")
    assert p.path.endswith(path.name) and p.patient_id == pid
    assert pid not in usable(index) and usable(index) == set(OUTCOMES) - {pid}


def test_a_voxel_of_metres_is_a_defect(tmp_path: Path) -> None:
    """Spacing (1, 1, 1e7) mm passed validation, and the isotropic copy of registration then tried to allocate
    16 x 16 x 160 million voxels."""
    from strpnet_core.site import ImageDefect, read_image_info_checked

    img = sitk.GetImageFromArray(np.ones((16, 16, 16), np.float32))
    for spacing, ok in (((1.0, 1.0, 6.0), True), ((1.0, 1.0, 1e7), False)):
        img.SetSpacing(spacing)
        path = tmp_path / f"s{spacing[2]:g}.nii.gz"
        sitk.WriteImage(img, str(path))
        if ok:
            read_image_info_checked(path)
        else:
            with pytest.raises(ImageDefect, match=r"larger than 20 mm along an axis"):
                read_image_info_checked(path)


def test_header_check_names_corrupt_gzip_data(tmp_path: Path) -> None:
    """A .nii.gz whose header decompresses but whose later data do not: ITK only says it finds no reader; the
    header-only check names the gzip defect instead of an "unreadable header"."""
    from strpnet_core.site import ImageDefect, read_image_info_checked

    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)),
                    str(path))
    data = bytearray(path.read_bytes())
    i = int(len(data) * 0.6)
    data[i:i + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDefect, match="corrupt gzip data") as info:
        read_image_info_checked(path)
    assert str(path) in str(info.value)
