"""Configurations of the study (configuration as data: the run directory keeps a copy and refuses another one)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StudyConfig:
    """One study configuration.

    Attributes
    ----------
    name:
        ``smoke`` or ``full``.
    preset:
        Resolution preset of the cohort, the preprocessing and the model (``ci``, ``demo``).
    train_patients:
        Patients of each training site (their number = the number of sites of the federation).
    test_patients:
        Patients of the held-out test site (generated in the same cohort as one more site, never trained on).
    data_seed:
        Master seed of the synthetic cohort and of the preprocessing.
    seeds:
        Training seeds (initial weights, shuffling, the federation's local seeds); every deep model is trained once
        per seed.
    rounds, local_epochs:
        Federated rounds and local epochs per round; centralised and local-only models get ``rounds * local_epochs``
        epochs (the same budget of local epochs).
    run_config:
        ``[tool.flwr.app.config]`` keys shared by all deep models (model size, learning rate, loss weights).
        ``val-fraction`` is 0: every training patient trains (the test site evaluates).
    uno_horizon_days:
        Uno's truncation time tau = min(this, largest training time).
    n_boot, boot_seed:
        Bootstrap resamples over test patients and their seed.
    margins_mm:
        Candidate margins of the cavity-margin baseline (chosen on the training sites).
    cox_penalizer:
        Ridge penalty of the Cox baseline.
    workers:
        Processes for cohort generation and preprocessing.
    threads:
        torch threads of the centralised and local-only training and of the predictions (the federation's sites
        use the run config's ``num-threads``, 1: two simulated sites train in parallel on 2 cores). One thread:
        on a shared 2-core machine two threads were 13x slower than one (84 s vs 6 s for a smoke epoch).
    est_synth_s, est_preprocess_s, est_train_s:
        Rough cost per patient (generation, preprocessing on ``workers`` processes: wall seconds) and per
        patient-epoch of training (2 cores), for the time estimate printed before a run.
    """

    name: str
    preset: str
    train_patients: tuple[int, ...]
    test_patients: int
    data_seed: int = 0
    seeds: tuple[int, ...] = (0,)
    rounds: int = 2
    local_epochs: int = 1
    run_config: dict[str, Any] = field(default_factory=dict)
    uno_horizon_days: float = 730.0
    n_boot: int = 1000
    boot_seed: int = 12345
    margins_mm: tuple[float, ...] = (4.0, 6.0, 8.0, 12.0, 16.0)
    cox_penalizer: float = 0.1
    workers: int = 2
    threads: int = 1
    est_synth_s: float = 3.0
    est_preprocess_s: float = 35.0
    est_train_s: float = 2.2

    @property
    def n_sites(self) -> int:
        return len(self.train_patients)

    @property
    def epochs(self) -> int:
        """Epochs of the centralised and local-only models (= every site's local epochs in the federation)."""
        return self.rounds * self.local_epochs

    def fl_overrides(self) -> dict[str, Any]:
        """Run-config overrides of the federated runs."""
        return {"val-fraction": 0.0, "local-epochs": self.local_epochs, **self.run_config}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train_patients"] = list(self.train_patients)
        d["seeds"] = list(self.seeds)
        d["margins_mm"] = list(self.margins_mm)
        return d

    def estimate_seconds(self) -> dict[str, float]:
        """Rough wall time of each stage on 2 cores (``est_*`` figures; preprocessing is done once and cached)."""
        n_train = sum(self.train_patients)
        n_all = n_train + self.test_patients
        # FL: two sites in parallel, one thread each; centralised + local-only: one thread (~1.5x slower than two)
        per_seed_train = n_train * self.epochs * self.est_train_s * (1 + 2 * 1.5)
        per_seed_eval = (2 + self.n_sites) * self.test_patients * self.est_train_s / 3 + 30.0 * (self.epochs > 0)
        fl_overhead = 20.0 + self.rounds * n_train * self.est_train_s / 3  # Flower start-up, per-round evaluation
        return {
            "cohort": n_all * self.est_synth_s,
            "preprocessing": n_all * self.est_preprocess_s,
            "training": len(self.seeds) * (per_seed_train + fl_overhead),
            "evaluation": len(self.seeds) * per_seed_eval + n_all * 1.0,
        }


#: The CI smoke test (ci preset, tiny model): asserts only that the pipeline completes and writes the table.
#: 8 patients: ci preprocessing (~20-50 CPU-s per patient) dominates; the sites and the test set are preprocessed one
#: after another with 2 workers, so each group of 2 takes one wave (a third test patient cost another wave).
SMOKE = StudyConfig(
    name="smoke",
    preset="ci",
    train_patients=(2, 2, 2),
    test_patients=2,
    seeds=(0,),
    rounds=2,
    local_epochs=1,
    run_config={"lr": 0.003, "num-threads": 1, "model.widths": "4,8", "model.lstm-hidden": 8,
                "model.risk-hidden": 8},
    n_boot=200,
    est_synth_s=2.0,
    est_preprocess_s=12.0,
    est_train_s=0.05,
)

#: The study of issue 7 (demo preset, 96^3 grid, default model): about an hour on one 2-core machine.
FULL = StudyConfig(
    name="full",
    preset="demo",
    train_patients=(5, 7, 9, 6),
    test_patients=16,
    seeds=(0, 1, 2),
    rounds=3,
    local_epochs=1,
    run_config={"num-threads": 1},
    n_boot=1000,
    est_synth_s=3.0,
    est_preprocess_s=35.0,
    est_train_s=2.2,
)

CONFIGS: dict[str, StudyConfig] = {"smoke": SMOKE, "full": FULL}


def get_config(name: str) -> StudyConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown study config {name!r}: choose one of {', '.join(CONFIGS)}") from None
