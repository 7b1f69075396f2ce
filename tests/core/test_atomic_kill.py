"""A process SIGKILLed while it writes a cache file or a checkpoint leaves no partial file under the final name,
and a killed preprocessing run resumes: the rerun skips exactly the patients finished before the kill; its pool
workers die with it (none is left running).

The writers are the project's own (``strpnet_core.cache.save_cached_patient``, ``server.checkpoint.save_checkpoint``,
both through ``strpnet_core.fsutil.atomic_path``), run in a child process that writes large files in a loop and is
killed after a seeded random delay: it spends most of its time inside the writer, so most kills land mid-write
(4 of 6 in a measurement; the others between two writes, while the next arrays are built).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from strpnet_core.cache import load_cached_patient
from strpnet_core.fsutil import remove_stale_parts
from strpnet_core.reaper import is_gone

#: The child: write generation g = 0, 1, 2, ... of a ~24 MB file with every voxel/weight equal to g; print g after
#: each completed write.
_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    kind, folder = sys.argv[1], sys.argv[2]
    shape = (2, 4, 48, 48, 48)
    if kind == "cache":
        from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient
        def write(g):
            p = CachedPatient(patient_id="P1", site="s", images=np.full(shape, g, np.float32),
                              days=np.array([0.0, 30.0], np.float32), timepoints=["000", "001"],
                              brain_mask=np.ones(shape[2:], np.uint8), event=1, time=float(g))
            save_cached_patient(cache_path(folder, "P1"), p)
    else:
        from server.checkpoint import Checkpoint, save_checkpoint
        def write(g):
            weights = {"a": np.full(shape, g, np.float32), "b": np.full((10,), g, np.float32)}
            save_checkpoint(folder, Checkpoint(g, weights, [{"round": g}], {"seed": 0}, {}))
    g = 0
    while True:
        write(g)
        print(g, flush=True)
        g += 1
""")


def _final_generation(kind: str, folder: Path) -> int:
    """Load the file under its final name completely and return its generation (every value must agree)."""
    if kind == "cache":
        p = load_cached_patient(folder / "P1.npz")
        values, g = np.unique(p.images), int(p.time)
    else:
        from server.checkpoint import load_checkpoint

        ckpt = load_checkpoint(folder)
        assert ckpt is not None
        values, g = np.unique(np.concatenate([ckpt.weights["a"].ravel(), ckpt.weights["b"]])), ckpt.server_round
    assert values.tolist() == [g], f"mixed content {values[:5]} in generation {g}"
    return g


@pytest.mark.parametrize("kind", ["cache", "checkpoint"])
@pytest.mark.parametrize("trial", range(3))
def test_sigkill_mid_write_leaves_old_or_new_file(kind: str, trial: int, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(1000 + trial)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # generation 0 is complete: there is an old file from now on
        assert first.strip() == "0", f"writer failed to start: {first!r}"
        time.sleep(float(rng.uniform(0.05, 1.5)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    printed = [int(x) for x in ["0", *proc.stdout.read().split()]]
    proc.stdout.close()
    g = _final_generation(kind, folder)
    # the file is the last announced write, or the next one if the kill came between rename and print
    assert printed[-1] <= g <= printed[-1] + 1
    final = "P1.npz" if kind == "cache" else "checkpoint.npz"
    names = sorted(p.name for p in folder.iterdir())
    assert final in names and all(n == final or (n.startswith(f".{final}.") and ".part" in n) for n in names), names
    removed = remove_stale_parts(folder)
    assert sorted(p.name for p in folder.iterdir()) == [final]
    assert len(removed) == len(names) - 1
    assert _final_generation(kind, folder) == g


def test_remove_stale_parts_keeps_live_writers_and_final_files(tmp_path: Path) -> None:
    from strpnet_core.fsutil import atomic_path

    (tmp_path / "x.npz").write_bytes(b"final")
    with atomic_path(tmp_path / "y.npz") as tmp:  # this process is alive: its temporary file stays
        tmp.write_bytes(b"half")
        assert remove_stale_parts(tmp_path) == []
        assert tmp.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    host = tmp.name.split(".")[3].rsplit("-", 1)[0]
    stale = tmp_path / f".z.npz.{host}-{dead}.abc123.part.npz"
    stale.write_bytes(b"half")
    assert remove_stale_parts(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "y.npz"]


# -------------------------------------------------------------------------------------- killed preprocessing


@pytest.fixture(scope="module")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ci site of 3 patients reduced to their pre-op scans (fast to preprocess)."""
    from strpnet_core.synth import generate_cohort

    out = tmp_path_factory.mktemp("kill-cohort")
    generate_cohort(out, sites=1, patients=[3], preset="ci", seed=5, png=False, progress=False)
    site = out / "site-01"
    for folder in site.glob("*-0[0-9][1-9]"):
        shutil.rmtree(folder)
    dates = (site / "scan_dates.csv").read_text().splitlines()
    (site / "scan_dates.csv").write_text("\n".join([dates[0], *(r for r in dates[1:] if r.split(",")[1] == "000")])
                                         + "\n")
    return site


def _done(cache: Path) -> set[str]:
    out = set()
    for qc in cache.glob("*.qc.json"):
        try:
            if json.loads(qc.read_text()).get("status") == "ok":
                out.add(qc.name.removesuffix(".qc.json"))
        except ValueError:
            pytest.fail(f"{qc} is not complete JSON after the kill")
    return out


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_preprocessing_resumes_and_skips_only_finished_patients(small_site: Path, tmp_path: Path) -> None:
    from strpnet_core.preprocessing.pipeline import preprocess_site

    cache = tmp_path / "cache"
    code = ("import sys; from strpnet_core.preprocessing.pipeline import preprocess_site; "
            "preprocess_site(sys.argv[1], sys.argv[2], preset='ci', seed=0, progress=False, threads=1, workers=2)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(small_site), str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (cache.is_dir() and _done(cache)):
            assert proc.poll() is None, f"preprocessing ended early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no patient finished within 300 s"
            time.sleep(0.1)
        time.sleep(float(np.random.default_rng(7).uniform(0.0, 1.0)))
        workers = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert workers, "no pool worker found"
    deadline = time.monotonic() + 30
    while (alive := [w for w in workers if not is_gone(w)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"pool workers {alive} outlived the killed preprocessing"
    finished = _done(cache)
    for f in cache.glob("*.npz"):  # whatever exists under a final name is complete
        load_cached_patient(f)
    # A worker stopped between its cache file and its QC record leaves a complete cache file that is not "done":
    # the rerun preprocesses that patient again (is_done needs both).
    assert finished <= {f.name.removesuffix(".npz") for f in cache.glob("*.npz")}
    assert 1 <= len(finished) <= 3

    report = preprocess_site(small_site, cache, preset="ci", seed=0, progress=False, threads=1)
    status = {r.patient_id: r.status for r in report.results}
    assert {p for p, s in status.items() if s == "skipped"} == finished
    assert {p for p, s in status.items() if s == "ok"} == set(status) - finished
    assert len(status) == 3 and not list(cache.glob(".*.part*"))
    for f in cache.glob("*.npz"):
        assert load_cached_patient(f).patient_id == f.name.removesuffix(".npz")
