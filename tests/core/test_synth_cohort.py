"""Synthetic cohort on disk: data contract, determinism, truth transforms, recurrence geometry (ci preset)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from strpnet_core import contract
from strpnet_core.synth import generate_cohort, parse_patient_counts
from strpnet_core.synth.settings import get_settings

SEED = 7


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    kw = dict(sites=2, patients=[2, 1], preset="ci", progress=False, png=False)
    generate_cohort(root / "a", seed=SEED, workers=1, **kw)
    generate_cohort(root / "b", seed=SEED, workers=2, **kw)  # same seed, other worker count
    generate_cohort(root / "c", seed=SEED + 1, workers=1, sites=1, patients=[1], preset="ci", progress=False,
                    png=False)
    return {"a": root / "a", "b": root / "b", "c": root / "c"}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_same_bytes_whatever_the_workers(cohorts: dict[str, Path]) -> None:
    a, b = _digests(cohorts["a"]), _digests(cohorts["b"])
    assert len(a) > 40 and a == b
    gz = next(cohorts["a"].rglob("*.nii.gz")).read_bytes()
    assert gz[:2] == b"\x1f\x8b" and gz[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_other_seed_other_bytes(cohorts: dict[str, Path]) -> None:
    a, c = _digests(cohorts["a"]), _digests(cohorts["c"])
    name = "site-01/SYN01-0001-000/SYN01-0001-000-t1c.nii.gz"
    assert a[name] != c[name]


def test_site_folders_follow_the_contract(cohorts: dict[str, Path]) -> None:
    out = cohorts["a"]
    grid = get_settings("ci").grid
    cohort = json.loads((out / "truth" / "cohort.json").read_text())
    assert [s["name"] for s in cohort["sites"]] == ["site-01", "site-02"]
    assert 0.0 <= cohort["oracle_c_index"] <= 1.0 or np.isnan(cohort["oracle_c_index"])
    for site in ("site-01", "site-02"):
        sdir = out / site
        assert json.loads((sdir / contract.SITE_JSON).read_text())["site_name"] == site
        outcomes = {r["patient_id"]: r for r in _csv(sdir / contract.OUTCOMES_CSV)}
        dates = _csv(sdir / contract.SCAN_DATES_CSV)
        assert tuple(_csv(sdir / contract.OUTCOMES_CSV)[0]) == contract.OUTCOMES_COLUMNS
        assert tuple(dates[0]) == contract.SCAN_DATES_COLUMNS
        for row in dates:
            pid, ttt, day = row["patient_id"], row["timepoint"], int(row["day"])
            event, time = int(outcomes[pid]["event"]), float(outcomes[pid]["time_days"])
            assert day < time if event else day <= time
            if ttt == contract.PREOP_TIMEPOINT:
                assert day == 0
            scan = sdir / contract.scan_dir_name(pid, ttt)
            for mod in contract.MODALITIES:
                f = contract.find_modality_file(scan, mod)
                assert f is not None and f.name == contract.scan_file_name(pid, ttt, mod)
                img = nib.load(f)
                assert img.shape == (grid.shape[2], grid.shape[1], grid.shape[0])
                np.testing.assert_allclose(np.diag(img.affine)[:3], [-4.0, -4.0, 4.0])
                data = np.asanyarray(img.dataobj)
                assert np.isfinite(data).all() and data.max() > 0
                s = sitk.ReadImage(str(f))
                np.testing.assert_allclose(s.GetOrigin(), grid.origin, atol=1e-4)
                np.testing.assert_allclose(s.GetDirection(), np.eye(3).ravel())
        for pid, row in outcomes.items():
            rec = sdir / contract.RECURRENCE_DIR / contract.recurrence_file_name(pid)
            assert rec.exists() == (row["event"] == "1")
            if rec.exists():
                ref = sitk.ReadImage(str(sdir / contract.scan_dir_name(pid, "000")
                                         / contract.scan_file_name(pid, "000", "t1c")))
                lab = sitk.ReadImage(str(rec))
                assert lab.GetSize() == ref.GetSize() and lab.GetSpacing() == ref.GetSpacing()
                assert lab.GetOrigin() == ref.GetOrigin() and lab.GetDirection() == ref.GetDirection()
                arr = sitk.GetArrayViewFromImage(lab)
                assert set(np.unique(arr)) == {0, 1}


def test_truth_files_and_transforms(cohorts: dict[str, Path]) -> None:
    out = cohorts["a"]
    truth_dir = out / "truth" / "site-01" / "SYN01-0001"
    truth = json.loads((truth_dir / "truth.json").read_text())
    for key in ("d_white_mm2_per_day", "rho_per_day", "seed_point_lps_mm", "true_risk", "censor_time_days",
                "event_time_uncensored_days", "site"):
        assert key in truth
    pid = "SYN01-0001"
    # Pre-op T1c: identity.
    s0 = sitk.ReadTransform(str(truth_dir / f"{pid}-000-t1c.tfm"))
    np.testing.assert_allclose(s0.TransformPoint((10.0, -20.0, 30.0)), (10.0, -20.0, 30.0), atol=1e-9)
    last = f"{len(truth['scan_days']) - 1:03d}"
    assert last != "000"
    s = sitk.ReadTransform(str(truth_dir / f"{pid}-{last}-t1c.tfm"))
    assert np.linalg.norm(np.subtract(s.TransformPoint((0.0, 17.0, 10.0)), (0.0, 17.0, 10.0))) > 0.1
    # The true brain mask of a later scan is the pre-op brain mask seen through S (ITK evaluates the saved file).
    mask0 = sitk.ReadImage(str(truth_dir / f"{pid}-000-brainmask.nii.gz"), sitk.sitkFloat32)
    mask_k = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / f"{pid}-{last}-brainmask.nii.gz")))
    via_s = sitk.GetArrayFromImage(sitk.Resample(mask0, mask0, s, sitk.sitkNearestNeighbor, 0.0)) > 0.5
    assert np.mean(via_s == (mask_k > 0)) > 0.99
    # Intensities: the later T1c divided by its true bias matches the pre-op T1c / bias pulled through S far better
    # than without S (misalignment is real and S undoes it).
    def unbiased(ttt: str) -> sitk.Image:
        img = sitk.ReadImage(str(out / "site-01" / f"{pid}-{ttt}" / f"{pid}-{ttt}-t1c.nii.gz"), sitk.sitkFloat32)
        bias = sitk.ReadImage(str(truth_dir / f"{pid}-{ttt}-t1c-bias.nii.gz"), sitk.sitkFloat32)
        return img / bias
    ref, mov = unbiased("000"), sitk.GetArrayFromImage(unbiased(last))
    pulled = sitk.GetArrayFromImage(sitk.Resample(ref, ref, s, sitk.sitkLinear, 0.0))
    unmoved = sitk.GetArrayFromImage(ref)
    brain = (mask_k > 0) & (sitk.GetArrayFromImage(sitk.Resample(
        sitk.ReadImage(str(out / "site-01" / contract.RECURRENCE_DIR / f"{pid}-recurrence.nii.gz"), sitk.sitkFloat32)
        if truth["event"] else mask0 * 0, ref, s, sitk.sitkNearestNeighbor, 0.0)) == 0)
    r_with = np.corrcoef(pulled[brain], mov[brain])[0, 1]
    r_without = np.corrcoef(unmoved[brain], mov[brain])[0, 1]
    assert r_with > 0.6 and r_with > r_without + 0.05
    bias = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / f"{pid}-000-t1n-bias.nii.gz")))
    assert 0.3 < bias.min() < 1.0 < bias.max() < 3.0


def test_site_sizes_differ_around_m() -> None:
    counts = parse_patient_counts(10, 4, seed=0)
    assert len(set(counts)) == 4 and sum(counts) == 40
    assert parse_patient_counts("3,5", 2, seed=0) == [3, 5]
    assert parse_patient_counts(6, 1, seed=0) == [6]
    with pytest.raises(ValueError, match="2 patient counts given for 3 sites"):
        parse_patient_counts("3,5", 3, seed=0)


def test_cli_registers_synth_subcommand() -> None:
    from strpnet_core.cli import build_parser

    args = build_parser().parse_args(["synth", "--out", "X", "--sites", "4", "--patients", "20", "--preset", "demo",
                                      "--seed", "3", "--no-png"])
    assert (args.command, args.sites, args.patients, args.preset, args.seed, args.png) == (
        "synth", 4, "20", "demo", 3, False)
    assert callable(args.func)


def test_cli_refuses_to_mix_two_cohorts(tmp_path: Path) -> None:
    """A second `strpnet synth` into a non-empty --out is refused; --force replaces the earlier cohort (its site-NN
    folders and truth/), so no site of the first one is left to train on; foreign files are never removed."""
    from strpnet_core.cli import main as cli_main

    out = tmp_path / "cohort"
    base = ["synth", "--out", str(out), "--patients", "1", "--preset", "ci", "--no-png", "--no-progress"]
    assert cli_main([*base, "--sites", "2"]) == 0 and (out / "site-02").is_dir()
    assert cli_main([*base, "--sites", "1", "--seed", "5"]) == 2  # refused, nothing touched
    assert (out / "site-02").is_dir()
    assert cli_main([*base, "--sites", "1", "--seed", "5", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["site-01", "truth"]
    (out / "notes.txt").write_text("mine")
    assert cli_main([*base, "--sites", "1", "--force"]) == 2 and (out / "notes.txt").read_text() == "mine"
