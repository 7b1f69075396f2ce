"""Helpers of the deployment tests: site caches written directly, and the programs they start (logged, own session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient


def write_site_cache(site_dir: Path, site: str, *, patients: int = 5, size: int = 16, seed: int = 0) -> Path:
    """Write ``patients`` tiny cached patients (T=2, 4 modalities, ``size``^3) into ``site_dir``."""
    rng = np.random.default_rng(seed)
    for i in range(patients):
        images = rng.normal(0, 0.3, (2, 4, size, size, size)).astype(np.float32)
        blob = np.zeros((size,) * 3, dtype=np.uint8)
        blob[4:9, 4:9, 4:9] = 1
        images[:, 1][:, blob.astype(bool)] += 1.0 + i * 0.3
        event = int(i % 3 != 2)
        p = CachedPatient(patient_id=f"{site}-{i:03d}", site=site, images=images,
                          days=np.array([0.0, 90.0], dtype=np.float32), timepoints=["000", "001"],
                          brain_mask=np.ones((size,) * 3, dtype=np.uint8), recurrence=blob if event else None,
                          event=event, time=float(800 - 100 * i), meta={"preset": "ci"})
        save_cached_patient(cache_path(site_dir, p.patient_id), p)
    return site_dir


REPO = Path(__file__).resolve().parents[2]


def console_command(script: str, module: str) -> list[str]:
    """The installed console script ``script`` next to this Python, else ``python -m module``."""
    exe = Path(sys.executable).parent / script
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", module]


def tls_server_command(certs: Path, work: Path, *, port: int, rounds: int, sites: tuple[str, ...] = ("a", "b")
                       ) -> list[str]:
    """``flower-server`` with TLS and SuperNode authentication on 127.0.0.1:``port`` for the keys of ``sites`` (made
    by ``deploy/make_certs.sh certs --site ...``), state and run directory under ``work``, a tiny configuration."""
    keys = [arg for s in sites for arg in ("--site-key", str(certs / f"sites/{s}/{s}.pub"))]
    return console_command("flower-server", "server.coordinator") + [
        "--certs", str(certs), *keys, "--host", "127.0.0.1", "--port", str(port),
        "--state-dir", str(work / "coordinator"), "--run-dir", str(work / "run"), "--rounds", str(rounds),
        "--timeout", "600",
        "-c", "preset=ci", "-c", "val-fraction=0.4", "-c", "local-epochs=1", "-c", "num-threads=1",
        "-c", 'model.widths="4,8" model.lstm-hidden=8 model.risk-hidden=8', "--app-dir", str(REPO),
    ]


def start_logged(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the repository, in its own session (stopped by its process group); output appended to
    ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True)
