"""Shared helpers of the federation tests (importable from every test folder: tests/ is on sys.path).

- :func:`make_site_caches`: site caches written directly (no synth/preprocessing): tiny random volumes with a
  learnable signal.
- :data:`TINY_RUN_CONFIG`: run-config overrides of a tiny ST-RPNet for simulations.
- :func:`assert_same_final_model`: two run directories hold bit-identical final weights (resume tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient

#: A tiny ST-RPNet (every key exists in [tool.flwr.app.config]); val-fraction 0.4: 6 patients -> 2 held out, 3 -> 1.
TINY_RUN_CONFIG: dict[str, object] = {
    "val-fraction": 0.4,
    "local-epochs": 1,
    "lr": 0.003,
    "num-threads": 1,
    "model.widths": "4,8",
    "model.lstm-hidden": 8,
    "model.risk-hidden": 8,
}


def make_site_caches(root: Path, *, sites: int = 3, patients: int = 6, size: int = 16, seed: int = 0) -> Path:
    """Write ``root/site-0k/<patient>.npz`` for ``sites`` sites; returns ``root``.

    Each patient has T=2 timepoints of 4 modalities on a ``size``^3 grid; a bright blob marks the recurrence
    (event = 1) and its intensity drives the time to event, so both tasks are learnable.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for s in range(sites):
        site = f"site-{s + 1:02d}"
        for i in range(patients):
            c = rng.integers(size // 4, 3 * size // 4, 3)
            r = size / 6
            blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
            strength = float(rng.uniform(0.5, 2.5))
            images = rng.normal(0, 0.3, (2, 4, size, size, size)).astype(np.float32)
            images[:, 1][:, blob] += strength
            event = int(rng.random() < 0.7)
            time = float(np.clip(900 / strength + rng.normal(0, 40), 30, 1500))
            brain = np.ones((size,) * 3, dtype=np.uint8)
            patient = CachedPatient(
                patient_id=f"S{s + 1:02d}-{i:03d}", site=site, images=images,
                days=np.array([0.0, 60.0 + i], dtype=np.float32), timepoints=["000", "001"], brain_mask=brain,
                recurrence=blob.astype(np.uint8) if event else None, event=event, time=time,
                meta={"preset": "ci", "synthetic_test_cache": True},
            )
            save_cached_patient(cache_path(root / site, patient.patient_id), patient)
    return root


def assert_same_final_model(expected_run: Path, run: Path) -> None:
    """Assert that ``run/final_model.pt`` holds exactly the weights (names, order, bits) of ``expected_run``'s."""
    a = torch.load(expected_run / "final_model.pt", weights_only=True)["state_dict"]
    b = torch.load(run / "final_model.pt", weights_only=True)["state_dict"]
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between {expected_run} and {run}"
