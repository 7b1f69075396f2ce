"""Fuzz-style bad input at scale: a synthetic ci site (6 patients) gets seeded random corruptions drawn from
``fuzz_corruptions.KINDS`` (truncated/bit-flipped gzip, garbage header, huge/zero/NaN header fields, 2D/4D/vector
images, NaN/inf/all-zero voxels, empty/missing files, folders instead of files, symlink loops and dangling links,
bad CSV values and lines, missing rows, duplicate rows, missing pre-op folder), then runs validation, preprocessing,
the client's site preparation and the CLI.

Asserted for every corruption: a message names the file (or ``csv:line``) and the reason; the patient (pre-op scan
or outcome hit) is excluded, or only the hit follow-up scan is dropped; every clean patient goes through; nothing
raises and no traceback reaches the user. A site with no usable case raises ``NoUsablePatientError`` whose message
holds counts only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from strpnet_core.cache import cache_path, list_cache
from strpnet_core.cli import main as cli_main
from strpnet_core.federation import READY_MARKER, load_site_dataset, prepare_site_cache
from strpnet_core.preprocessing.pipeline import REPORT_NAME
from strpnet_core.site import NoUsablePatientError, validate_site

from fuzz_corruptions import IMAGE_CORRUPTIONS, KINDS, Expect, corrupt_patient, corrupt_site, model_input_scans

#: Seeds of the validation-only rounds (cheap: every voxel is read, nothing is registered).
VALIDATE_SEEDS = tuple(range(8))
#: The seed of the round that also preprocesses: 2 patients are registered (the clean one and one whose follow-up
#: has NaN voxels, found when preprocessing reads it); 4 are rejected, 2 of them (inf voxels, flipped gzip bytes in
#: the pre-op scan) only when preprocessing reads the voxels.
PREPROCESS_SEED = 5


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic ci site of 6 patients (about 20 s)."""
    from strpnet_core.synth import generate_cohort

    out = tmp_path_factory.mktemp("fuzz-cohort")
    generate_cohort(out, sites=1, patients=[6], preset="ci", seed=11, png=False, progress=False)
    return out / "site-01"

def _copy(template: Path, dest: Path) -> Path:
    return Path(shutil.copytree(template, dest, symlinks=True))

def _named(expect: Expect, lines: list[str]) -> bool:
    """Some line names the expected file and matches the expected reason."""
    return any(expect.path in line and re.search(expect.reason, line) for line in lines)

def _check_validation(site: Path, expects: list[Expect], clean: list[str], inputs: dict[str, list[str]]) -> None:
    """``inputs``: the model-input timepoints of every patient before the corruption."""
    index = validate_site(site)
    lines = [str(p) for p in index.problems]
    usable = {p.patient_id: p for p in index.patients}
    for e in expects:
        assert _named(e, lines), f"{e}: no message names it; got {lines}"
        if e.scope == "patient":
            assert e.patient_id in index.excluded and e.patient_id not in usable, e
        else:
            assert e.patient_id in usable, e
            assert e.timepoint not in [s.timepoint for s in usable[e.patient_id].scans], e
    for pid in clean:
        assert pid in usable, f"clean patient {pid} not usable: {index.patient_problems(pid)}"
        assert [s.timepoint for s in usable[pid].scans] == inputs[pid]
        assert [p for p in index.patient_problems(pid) if p.level == "error"] == []

@pytest.mark.parametrize("seed", VALIDATE_SEEDS)
def test_validate_names_every_corruption(template: Path, tmp_path: Path, seed: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    site = _copy(template, tmp_path / "site-01")
    expects, clean = corrupt_site(site, seed, n_corrupt=5, keep=1)
    _check_validation(site, expects, clean, model_input_scans(template))
    assert cli_main(["validate", str(site)]) == 0
    out = capsys.readouterr().out
    for e in expects:
        assert e.path in out, f"{e.path} not in the validate output"

def test_every_kind_is_drawn_and_checked(template: Path, tmp_path: Path) -> None:
    """Each kind once (on the pre-op scan or a follow-up, as drawn), so that no kind is left to chance."""
    patients = sorted(model_input_scans(template))
    for k, kind in enumerate(KINDS):
        site = _copy(template, tmp_path / f"k{k}")
        rng = np.random.default_rng(k)

        scans = model_input_scans(site)
        pid = patients[k % len(patients)]
        expects = [corrupt_patient(site, pid, kind, scans[pid], rng)]
        _check_validation(site, expects, [p for p in patients if p != pid], model_input_scans(template))
        shutil.rmtree(site)
    assert len(IMAGE_CORRUPTIONS) >= 15

@pytest.mark.integration
@pytest.mark.slow
def test_preprocess_and_site_preparation_on_a_fuzzed_site(template: Path, tmp_path: Path) -> None:
    site = _copy(template, tmp_path / "site-01")
    expects, clean = corrupt_site(site, PREPROCESS_SEED, n_corrupt=5, keep=1)
    cache = tmp_path / "cache"
    info = prepare_site_cache(site, cache, site_name="site-01", preset="ci", seed=0)

    patient_scope = {e.patient_id for e in expects if e.scope == "patient"}
    expected_ok = sorted({*clean, *(e.patient_id for e in expects)} - patient_scope)
    assert sorted(p.name.removesuffix(".npz") for p in list_cache(cache)) == expected_ok
    assert info.num_patients == len(expected_ok) and (cache / READY_MARKER).is_file()
    report = json.loads((cache / REPORT_NAME).read_text())
    lines = [*report["validation_problems"], *(r["error"] or "" for r in report["results"]),
             *(f"{why}" for r in report["results"] for why in r["excluded_scans"].values())]
    for e in expects:
        assert _named(e, lines), f"{e}: not named in {REPORT_NAME}"
        if e.scope == "scan":
            tps = [r["timepoints"] for r in report["results"] if r["patient_id"] == e.patient_id][0]
            assert e.timepoint not in tps, e
    assert not list(cache.glob(".*.part*")), "temporary files left behind"

    # The CLI on the same cache: finished patients are skipped, the rest fail again with a clear line; no traceback.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "strpnet_core.cli", "preprocess", str(site), "--out", str(cache), "--preset", "ci",
         "--no-progress"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    skipped = [line.split()[0] for line in proc.stdout.splitlines() if " skipped " in line]
    assert skipped == expected_ok
    for e in expects:
        assert e.path in proc.stdout, f"{e.path} not in the preprocess output:\n{proc.stdout}"

    # A cache file copied in half is left out of the dataset (site log), the others are used.
    victim = cache_path(cache, expected_ok[0])
    victim.write_bytes(victim.read_bytes()[:1000])
    ds = load_site_dataset(cache)
    assert len(ds) == len(expected_ok) - 1

def _all_rejected(template: Path, dest: Path) -> Path:
    """A site whose every patient has a defective pre-op scan (found by validation or when preprocessing reads)."""
    site = _copy(template, dest)
    kinds = ("truncated gzip", "NaN voxels", "garbage header", "missing file", "all-zero volume", "4D image")
    for i, pid in enumerate(sorted(model_input_scans(site))):
        target = site / f"{pid}-000" / f"{pid}-000-t1c.nii.gz"
        IMAGE_CORRUPTIONS[kinds[i % len(kinds)]](target, np.random.default_rng(i))
    return site

def _empty(template: Path, dest: Path) -> Path:
    dest.mkdir()
    return dest

def _bad_header_csv(template: Path, dest: Path) -> Path:
    site = _copy(template, dest)
    (site / "outcomes.csv").write_text("id;event;time\n")
    return site

@pytest.mark.parametrize("make", [_empty, _bad_header_csv, _all_rejected], ids=["empty", "csv-header", "all-bad"])
def test_site_without_usable_case_is_a_clear_error_with_counts_only(template: Path, tmp_path: Path, make) -> None:
    site = make(template, tmp_path / "site-07")
    patients = sorted(model_input_scans(template))
    cache = tmp_path / "cache" / "site-07"
    with pytest.raises(NoUsablePatientError) as info:
        prepare_site_cache(site, cache, site_name="site-07", preset="ci", seed=0)
    msg = str(info.value)
    n = 0 if make is _empty else len(patients)
    assert msg == f"site site-07: no usable patient: {n} rejected, see {cache / REPORT_NAME}"
    assert not any(pid in msg for pid in patients)
    assert not (cache / READY_MARKER).exists() and list_cache(cache) == []
    report = json.loads((cache / REPORT_NAME).read_text())
    if make is _all_rejected:
        text = json.dumps(report)
        for pid in patients:
            assert f"{pid}-000-t1c.nii.gz" in text or f"{pid}-000: t1c missing" in text
    else:
        assert report["site_problems"], report
