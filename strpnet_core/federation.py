"""Logic shared by the Flower ClientApp, the ServerApp and the deployment/simulation commands.

Nothing here talks to Flower's network stack: this module turns the Flower *run config* (configuration as data,
``[tool.flwr.app.config]`` in ``pyproject.toml``, overridable with ``flwr run -c``) into ``ModelConfig`` /
``TrainConfig``, prepares a site's cache once (guarded against concurrent first use), runs a site's local training
and evaluation, and pools the sites' evaluation counts into federated metrics.

Privacy contract
----------------
A site sends only model weights and the aggregate numbers of :data:`EVAL_COUNT_KEYS` /
:func:`train_metrics` (counts, sums and means over its patients); no image, per-patient time, event or risk score.

Pooled concordance
------------------
Each site :math:`s` counts, over its own comparable pairs :math:`(i, j)` (``time_i < time_j`` and ``event_i = 1``),
the concordant pairs :math:`C_s` (``risk_i > risk_j``), discordant pairs :math:`D_s` and pairs tied in risk
:math:`T_s`; :math:`P_s = C_s + D_s + T_s` pairs are comparable. The federated Harrell's C is

.. math:: C_{fed} = \\frac{\\sum_s C_s + \\tfrac12 \\sum_s T_s}{\\sum_s P_s},

which equals Harrell's C over the union of the within-site pairs (pairs across sites are never formed: that would
need per-patient values to leave a site). A weighted mean of per-site C-indices is *not* this number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import cache_preset, list_cache
from .fsutil import atomic_write_json, exclusive_lock, private_dir

if TYPE_CHECKING:  # pragma: no cover - import cycles / heavy imports only for typing
    import torch

    from .model import ModelConfig
    from .training import TrainConfig

log = logging.getLogger(__name__)

#: Keys of a site's evaluation reply (besides ``num-examples``), the fields of ``EvalAggregates.to_metrics()``.
EVAL_COUNT_KEYS: tuple[str, ...] = (
    "concordant",
    "discordant",
    "tied_risk",
    "comparable",
    "dice_intersection",
    "dice_denominator",
    "loss_sum",
    "n_patients",
    "n_events",
    "n_labelled",
)
#: Risk-reference histogram of a site's training patients' risk scores (``strpnet_core.risk_reference``), sent with
#: the evaluation counts and summed by the server: :data:`RISK_HIST_BINS` equal bins over
#: [:data:`RISK_HIST_LOW`, :data:`RISK_HIST_HIGH`) plus an underflow and an overflow bin. Fixed in code, so every site
#: bins alike and the sums are meaningful.
RISK_HIST_LOW = -10.0
RISK_HIST_HIGH = 10.0
RISK_HIST_BINS = 40
#: ``risk_hist_00`` counts risk < LOW, ``risk_hist_01`` .. ``risk_hist_40`` the bins, ``risk_hist_41`` risk >= HIGH.
RISK_HIST_KEYS: tuple[str, ...] = tuple(f"risk_hist_{i:02d}" for i in range(RISK_HIST_BINS + 2))
#: No cell of a site's histogram stands for fewer training patients than this, or the site's ``min-eval-patients``
#: when larger (adjacent bins are grouped, ``risk_reference.k_anonymous_counts``); a site with fewer sends zeros.
RISK_HIST_MIN_PATIENTS = 5
#: Flower's weighting key (FedAvg's ``weighted_by_key``).
NUM_EXAMPLES_KEY = "num-examples"
#: Prefix of the training metrics a site sends (means over its local epochs).
TRAIN_METRIC_PREFIX = "train-"
#: Privacy allow-list of a train reply's MetricRecord (``client/audit.py`` blocks any other key): the output keys of
#: :func:`train_metrics` (example count, mean losses over the local epochs, compute time, and ``train-cuda``: 1 when
#: the site trained on a CUDA GPU, 0 on the CPU; its example-weighted mean is the share of the round's training
#: patients that went through a GPU; ``train-suppressed``: 1 when the site's small-count rule zeroed its means).
TRAIN_SUPPRESSED_KEY = f"{TRAIN_METRIC_PREFIX}suppressed"
TRAIN_CUDA_KEY = f"{TRAIN_METRIC_PREFIX}cuda"
TRAIN_REPLY_KEYS: tuple[str, ...] = (
    NUM_EXAMPLES_KEY,
    *(f"{TRAIN_METRIC_PREFIX}{name}" for name in ("loss", "seconds", "cuda", "dice", "bce", "cox")),
    TRAIN_SUPPRESSED_KEY,
)
#: The site's compute time (s) of an evaluate message (model forward passes), like ``train-seconds`` for training:
#: the server keeps the slowest site's (``eval_seconds_max``) so that benchmarks can tell compute from overhead.
EVAL_SECONDS_KEY = "eval-seconds"
#: Privacy allow-list of an evaluate reply's MetricRecord: the evaluation counts, the risk-reference histogram counts,
#: ``num-examples`` and the compute time. Add a new aggregate here (and only here) when the evaluate reply gains one.
EVAL_REPLY_KEYS: tuple[str, ...] = (*EVAL_COUNT_KEYS, *RISK_HIST_KEYS, NUM_EXAMPLES_KEY, EVAL_SECONDS_KEY)
#: Reply keys whose value may be a list of numbers (e.g. a histogram as one key); every other key must be a scalar.
LIST_REPLY_KEYS: tuple[str, ...] = ()
#: The only key of a query reply: the site's sampling key (:func:`sampling_key`), asked for by a message of type
#: ``query.`` + :data:`SAMPLING_QUERY`.
SAMPLING_KEY = "sampling-key"
SAMPLING_QUERY = "sampling_key"
#: Privacy allow-list of a query reply's MetricRecord.
QUERY_REPLY_KEYS: tuple[str, ...] = (SAMPLING_KEY,)
#: A site whose evaluation split has fewer patients than this sends zeros for :data:`EVAL_COUNT_KEYS` and
#: ``num-examples`` (with 1 patient, ``n_events`` and ``loss_sum`` *are* that patient's event and loss). A site may
#: raise it with its own node config ``min-eval-patients`` (``client/audit.py``); the server cannot lower it.
MIN_EVAL_PATIENTS = 2
#: Evaluation sums over the *labelled* patients only (those with a recurrence mask): zeroed when fewer than
#: :data:`MIN_EVAL_PATIENTS` held-out patients are labelled (one labelled patient's sums are its loss and mask sizes).
EVAL_LABELLED_KEYS: tuple[str, ...] = ("dice_intersection", "dice_denominator", "loss_sum", "n_labelled")
#: Marker written into a site's cache folder once it is complete.
READY_MARKER = ".strpnet-ready.json"
#: Lock file guarding the first use of a site's cache.
LOCK_FILE = ".strpnet-prepare.lock"

#: Run-config keys read by the server and the client, with their defaults (mirrors ``[tool.flwr.app.config]``).
RUN_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": 2,
    "sampling-keys": False,
    "round-timeout": 3600.0,
    "seed": 0,
    "preset": "demo",
    "val-fraction": 0.25,
    "run-dir": "",
    "resume": False,
    "data-root": "",
    "cache-root": "",
    "test-cache": "",
    # reliability and security (server/strategy.py, docs/reliability.md)
    "node-wait-timeout": 120.0,
    "start-wait-timeout": 3600.0,
    "aggregation": "fedavg",
    "trim-beta": 0.25,
    "krum-num-malicious": 1,
    "dp": "off",
    "dp-noise-multiplier": 1.0,
    "dp-clipping-norm": 1.0,
}
#: Values of ``aggregation`` (``server/strategy.py``).
AGGREGATIONS: tuple[str, ...] = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
#: Values of ``dp``: no differential privacy, Flower's central DP with server-side or client-side fixed clipping.
DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed")
#: Run-config prefix of ``ModelConfig`` fields (``model.<field-with-dashes>``).
MODEL_PREFIX = "model."


# ----------------------------------------------------------------------------------------------------------------------
# Run configuration
# ----------------------------------------------------------------------------------------------------------------------


def _dash(name: str) -> str:
    return name.replace("_", "-")


#: FederationConfig fields where ``inf`` is allowed (no time limit); NaN never is.
_UNBOUNDED_OK = frozenset({"round_timeout", "node_wait_timeout", "start_wait_timeout"})


@dataclass(frozen=True)
class FederationConfig:
    """The run configuration of one federated run, parsed from Flower's run config.

    Attributes
    ----------
    num_server_rounds, fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes:
        FedAvg knobs (see ``flwr.serverapp.strategy.FedAvg``).
    sampling_keys:
        When a fraction of the sites is sampled, order them by the keys they report (:func:`sampling_key`) instead
        of their node ids: for simulations (``strpnet simulate`` sets it), whose node ids change every session. A
        deployment keeps it off: its node ids are the SuperLink's, stable for a registered key, and a site could
        choose the key it reports.
    round_timeout:
        Seconds the server waits for the replies of one round.
    seed:
        Master seed: initial model, node sampling, every site's local training (with round and site name).
    preset:
        Resolution preset of the caches (``ci``, ``demo``, ``brats``); a site's cache must have been built with it.
    val_fraction:
        Fraction of each site's patients held out (deterministically) for the federated evaluation.
    run_dir:
        Output folder of the server (``""``: ``runs/run-<run id>`` under the server's working directory).
    resume:
        Continue from ``run_dir/checkpoint.npz`` when it exists.
    data_root, cache_root:
        Simulation only: folder of raw site folders and folder of per-site caches (partition ``p`` = ``p``-th site
        in name order).
    test_cache:
        Coordinator only (``""``: none): a ready cache of the coordinator's own held-out patients; the global model
        is evaluated on it after every round (server-side evaluation, :func:`evaluate_test_set`). No site sees it.
    node_wait_timeout, start_wait_timeout:
        Longest wait (s) of a node sampling for ``min-available-nodes`` during the run / before the first round;
        then the run goes on with the connected sites if at least ``min-train-nodes`` (``min-evaluate-nodes``) are
        there, else stops with the outputs of the completed rounds (``server/strategy.py``).
    aggregation, trim_beta, krum_num_malicious:
        ``fedavg``, ``fedmedian``, ``fedtrimmedavg`` (dropping ``floor(trim-beta * n)`` values at each end) or
        ``krum`` (``krum-num-malicious`` = assumed number of hostile sites).
    dp, dp_noise_multiplier, dp_clipping_norm:
        Central differential privacy with fixed clipping (Flower's wrappers): ``off``, ``server-fixed`` or
        ``client-fixed``; noise standard deviation = multiplier * norm / accepted replies.
    model:
        ``ModelConfig`` fields given as ``model.<field>`` (dashes or underscores).
    train:
        ``TrainConfig`` fields given at top level with dashes (``local-epochs``, ``lr``, ``w-cox``, ...).
    """

    num_server_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    sampling_keys: bool = False
    round_timeout: float = 3600.0
    seed: int = 0
    preset: str = "demo"
    val_fraction: float = 0.25
    run_dir: str = ""
    resume: bool = False
    data_root: str = ""
    cache_root: str = ""
    test_cache: str = ""
    node_wait_timeout: float = 120.0
    start_wait_timeout: float = 3600.0
    aggregation: str = "fedavg"
    trim_beta: float = 0.25
    krum_num_malicious: int = 1
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse Flower's (flat) run config.

        Parameters
        ----------
        run_config:
            ``context.run_config``: flat keys with dashes; nested TOML tables appear as ``model.<key>``.

        Returns
        -------
        FederationConfig

        Raises
        ------
        ValueError
            For a value of the wrong type or out of range, naming the key.
        """
        from .training import TrainConfig

        values: dict[str, Any] = {}
        for key, default in RUN_DEFAULTS.items():
            raw = run_config.get(key, default)
            values[key.replace("-", "_")] = _coerce(key, raw, type(default))
        train_fields = TrainConfig().to_dict()
        train: dict[str, Any] = {}
        for name in train_fields:
            for key in (_dash(name), name):
                if key in run_config and key not in RUN_DEFAULTS:
                    train[name] = run_config[key]
                    break
        if "seed" in train_fields:
            train["seed"] = values["seed"]
        model: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key.startswith(MODEL_PREFIX):
                model[key[len(MODEL_PREFIX):].replace("-", "_")] = raw
        known = set(RUN_DEFAULTS) | {_dash(n) for n in train_fields} | set(train_fields)
        unused = sorted(k for k in run_config if k not in known and not k.startswith(MODEL_PREFIX))
        if unused:
            raise ValueError(
                f"run config key(s) {', '.join(unused)} are not used by strpnet-fed (neither a FedAvg/run knob, a "
                f"TrainConfig field ({', '.join(_dash(n) for n in train_fields)}) nor model.<ModelConfig field>)"
            )
        cfg = cls(**values, model=model, train=train)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent knob."""
        for f in dataclasses.fields(self):  # NaN passes every comparison below; inf only means "no limit"
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v) and not (v == math.inf and f.name in _UNBOUNDED_OK):
                raise ValueError(f"{_dash(f.name)} must be a finite number, got {v}")
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        for name in ("fraction_train", "fraction_evaluate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{_dash(name)} must be in [0, 1], got {v}")
        for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_dash(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.round_timeout <= 0:
            raise ValueError(f"round-timeout must be > 0 s, got {self.round_timeout}")
        for name in ("node_wait_timeout", "start_wait_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_dash(name)} must be >= 0 s, got {getattr(self, name)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if self.krum_num_malicious < 0:
            raise ValueError(f"krum-num-malicious must be >= 0, got {self.krum_num_malicious}")
        if self.dp not in DP_MODES:
            raise ValueError(f"dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.dp_noise_multiplier < 0:
            raise ValueError(f"dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}")
        if self.dp_clipping_norm <= 0:
            raise ValueError(f"dp-clipping-norm must be > 0, got {self.dp_clipping_norm}")
        if self.dp != "off" and self.aggregation != "fedavg":
            raise ValueError(
                f"dp={self.dp} needs aggregation=fedavg (got {self.aggregation!r}): the noise is calibrated for the "
                f"mean of the clipped updates; a median, trimmed mean or Krum choice has another sensitivity"
            )

    def model_config(self) -> ModelConfig:
        """The ``ModelConfig`` of this run (defaults overridden by ``model.*`` keys)."""
        from .model import ModelConfig

        base = ModelConfig().to_dict()
        unknown = sorted(set(self.model) - set(base))
        if unknown:
            raise ValueError(
                f"unknown model key(s) in the run config: {', '.join(MODEL_PREFIX + _dash(k) for k in unknown)}; "
                f"ModelConfig has {', '.join(MODEL_PREFIX + _dash(k) for k in base)}"
            )
        return ModelConfig.from_dict({**base, **self.model})

    def train_config(self) -> TrainConfig:
        """The ``TrainConfig`` of this run (defaults overridden by the top-level training keys)."""
        from .training import TrainConfig

        return TrainConfig.from_dict({**TrainConfig().to_dict(), **self.train})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (for checkpoints and run summaries)."""
        return dataclasses.asdict(self)


def _coerce(key: str, raw: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                return low in ("true", "1", "yes")
            return bool(raw)
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"run config {key!r}: expected {kind.__name__}, got {raw!r}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Seeds and splits
# ----------------------------------------------------------------------------------------------------------------------


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed derived deterministically from ``seed`` and ``parts`` (e.g. round and site name).

    ``sha256("seed:part1:part2...")`` truncated: independent of Python's hash randomisation and of node ids.
    """
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def sampling_key(seed: int, site_name: str) -> int:
    """A site's place in the run's node sampling: ``derive_seed(seed, "sampling", site_name)``.

    When a simulation samples a fraction of the sites (run config ``sampling-keys``), the server orders the connected
    nodes by this key before it draws positions with the run's seeded RNG: a simulation draws new node ids every
    session, so sorted ids would sample other sites with the same seed. The key tells nothing about any patient;
    knowing the seed, the server could confirm a guess of the site's name.
    """
    return derive_seed(seed, "sampling", site_name)


def split_indices(n: int, val_fraction: float, seed: int, site_name: str) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of a site's ``n`` patients (cache order).

    Parameters
    ----------
    n:
        Number of patients of the site.
    val_fraction:
        Fraction held out for evaluation; ``round(n * val_fraction)`` patients, at most ``n - 1`` (training keeps one).
    seed, site_name:
        The split depends only on these (not on the round): the same patients are held out all run long.

    Returns
    -------
    (train, val):
        Sorted index lists; ``val`` is empty when ``val_fraction == 0`` (then evaluation uses every patient).
    """
    if n <= 0:
        return [], []
    n_val = min(int(round(n * val_fraction)), n - 1) if val_fraction > 0 else 0
    perm = np.random.default_rng(derive_seed(seed, "split", site_name)).permutation(n)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


# ----------------------------------------------------------------------------------------------------------------------
# Site cache (first use: validate + preprocess once, guarded by a file lock)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteCache:
    """A site's ready cache.

    Attributes
    ----------
    site_name:
        Name of the site (never sent anywhere except the site's own logs).
    cache_dir:
        Folder of ``<patient>.npz`` files.
    preset:
        Preset the cache was built with.
    num_patients:
        Number of cached patients.
    """

    site_name: str
    cache_dir: Path
    preset: str
    num_patients: int


def _read_marker(cache_dir: Path) -> dict[str, Any] | None:
    marker = cache_dir / READY_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _check_preset(cache_dir: Path, info: Mapping[str, Any], preset: str) -> None:
    got = info.get("preset")
    if got is not None and got != preset:
        raise ValueError(
            f"{cache_dir}: the cache was built with preset {got!r} but this run uses preset {preset!r}; "
            f"rebuild it (flower-client --preset {preset}, or delete the folder) or run with preset={got!r}"
        )


def prepare_site_cache(
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str],
    *,
    site_name: str,
    preset: str,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
    lock_timeout_s: float = 6 * 3600.0,
    refresh: bool = False,
) -> SiteCache:
    """Make sure ``cache_dir`` holds the site's preprocessed patients; return it.

    The first caller validates ``data_dir`` and preprocesses it into ``cache_dir`` (``strpnet_core.preprocessing``),
    then writes the marker :data:`READY_MARKER`; later callers (and concurrent ones, which wait on a file lock) reuse
    the cache. With ``refresh`` (``flower-client`` at start-up) a ready cache is brought up to date with
    ``data_dir`` instead: validation again, new or changed patients preprocessed, finished ones skipped
    (``preprocessing.pipeline.input_hash``), rejected ones' cache files removed. A cache filled by other means
    (``strpnet preprocess``, tests) is accepted when ``data_dir`` is None or does not exist and the folder holds
    cache files.

    Parameters
    ----------
    data_dir:
        The site's raw folder (data contract in ``docs/data-format.md``), or None.
    cache_dir:
        Where the cache lives (created).
    site_name:
        The site's name (for messages and the marker).
    preset:
        Resolution preset; a cache built with another preset is refused with a clear error.
    seed, workers, progress:
        Passed to ``preprocess_site`` (``workers`` None: one per core, within the available memory).
    lock_timeout_s:
        How long a concurrent first use waits for the one that holds the lock.
    refresh:
        Update a ready cache from ``data_dir`` (when it exists) instead of reusing it as it is.

    Returns
    -------
    SiteCache

    Raises
    ------
    FileNotFoundError
        When there is neither raw data nor a cache.
    strpnet_core.site.NoUsablePatientError
        (a ValueError) When no patient of the site is usable; its message holds only the site name, the number of
        rejected cases and the path of the site-local report (``CACHE_DIR/preprocess_report.json``), so it may
        leave the site as a ClientApp error reply. The site log gets the per-case table.
    ValueError
        When the cache's preset differs.
    """
    from .site import NoUsablePatientError

    cache = Path(cache_dir)
    update = refresh and data_dir is not None and Path(data_dir).is_dir()
    info = None if update else _read_marker(cache)
    if update and (built := cache_preset(cache) if cache.is_dir() else None) not in (None, preset):
        log.warning("site %s: %s was preprocessed with preset %r; preprocessing every patient anew with preset %r "
                    "(give --preset %s to keep it)", site_name, cache, built, preset, built)
    if info is None:
        private_dir(cache)  # before the lock creates it: closed to other users (preprocessing warns about an open one)
        with exclusive_lock(cache / LOCK_FILE, timeout_s=lock_timeout_s,
                            busy=f"{cache / LOCK_FILE}: another process has been preparing this cache for more than "
                            f"{lock_timeout_s:.0f} s"):
            info = None if update else _read_marker(cache)  # somebody may have finished while we waited
            if info is None:
                info = _build_cache(data_dir, cache, site_name=site_name, preset=preset, seed=seed,
                                    workers=workers, progress=progress)
    _check_preset(cache, info, preset)
    n = len(list_cache(cache))
    if n == 0:
        raise NoUsablePatientError(site_name, int(info.get("patients_total", 0) or 0), cache)
    return SiteCache(site_name=site_name, cache_dir=cache, preset=str(info.get("preset", preset)), num_patients=n)


def _build_cache(
    data_dir: str | os.PathLike[str] | None,
    cache: Path,
    *,
    site_name: str,
    preset: str,
    seed: int,
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    raw = Path(data_dir) if data_dir else None
    if raw is not None and raw.is_dir():
        from .preprocessing.pipeline import preprocess_site
        from .site import NoUsablePatientError

        log.info("site %s: validating and preprocessing %s into %s (preset %s)", site_name, raw, cache, preset)
        # (a case rejected now loses the cache file of an earlier build: preprocess_site removes it)
        report = preprocess_site(raw, cache, workers=workers, preset=preset, seed=seed, progress=progress)
        if report.rejected:
            log.warning("site %s: %d patient(s) rejected (details in %s):\n%s", site_name, report.rejected,
                        report.report_path, report.table())
        if not report.ok:
            # The message may leave the site (a ClientApp error reply): counts and the site name only.
            raise NoUsablePatientError(site_name, report.rejected, report.report_path)
        info = {"site_name": site_name, "preset": preset, "source": str(raw), "built": time.time(),
                "patients_ok": len(report.ok), "patients_total": len(report.results),
                "settings_hash": str(getattr(report, "settings_hash", ""))}
    elif list_cache(cache):
        cached_preset = cache_preset(cache)
        info = {"site_name": site_name, "preset": cached_preset or preset, "source": "existing cache",
                "built": time.time()}
    else:
        where = f"{raw} does not exist and " if raw is not None else ""
        raise FileNotFoundError(f"site {site_name}: {where}{cache} holds no cache file: nothing to train on")
    atomic_write_json(cache / READY_MARKER, info)
    return info


# ----------------------------------------------------------------------------------------------------------------------
# Local training and evaluation (what a site does with a message)
# ----------------------------------------------------------------------------------------------------------------------

_DATASETS: dict[str, Any] = {}


def load_site_dataset(cache_dir: str | os.PathLike[str]) -> Any:
    """The site's ``PatientDataset``, kept per process (simulation actors reuse it across rounds).

    Cache files that cannot be used (``strpnet_core.cache.cache_file_problem``: e.g. copied in half) are left out
    with a warning in the site's log; when none is usable, :class:`strpnet_core.site.NoUsablePatientError` (counts
    only: it may leave the site as an error reply).
    """
    from .cache import usable_cache_files
    from .dataset import PatientDataset
    from .site import NoUsablePatientError

    key = str(Path(cache_dir).resolve())
    if key not in _DATASETS:
        good = usable_cache_files(cache_dir)
        if not good:
            raise NoUsablePatientError(Path(cache_dir).name, len(list_cache(cache_dir)), cache_dir)
        _DATASETS[key] = PatientDataset(good, require_outcome=True)
    return _DATASETS[key]


def site_splits(dataset: Any, cfg: FederationConfig, site_name: str) -> tuple[Any, Any]:
    """The (train, evaluation) subsets of a site's dataset.

    Evaluation uses every patient only when val-fraction is 0. With val-fraction > 0 it is the held-out split, even
    when that is empty (``round(n * val_fraction) = 0``, or a one-patient site): then the site evaluates nobody and
    sends zero counts, instead of scoring its own training patients into the federated C-index.
    """
    from torch.utils.data import Subset

    train_idx, val_idx = split_indices(len(dataset), cfg.val_fraction, cfg.seed, site_name)
    train = Subset(dataset, train_idx)
    if cfg.val_fraction == 0:
        return train, dataset
    if not val_idx:
        log.warning("site %s: val-fraction %g of %d patient(s) holds out none; its evaluation sends zero counts",
                    site_name, cfg.val_fraction, len(dataset))
    return train, Subset(dataset, val_idx)


def build_model(cfg: FederationConfig, *, seed: int | None = None) -> torch.nn.Module:
    """A freshly initialised ``STRPNet`` of the run's ``ModelConfig`` (seeded: identical on every process)."""
    import torch

    from .model import STRPNet

    torch.manual_seed(cfg.seed if seed is None else seed)
    return STRPNet(cfg.model_config())


def local_train(
    state_dict: Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    cfg: FederationConfig,
    *,
    server_round: int,
    site_name: str,
) -> tuple[dict[str, Any], dict[str, float | int]]:
    """Train the global model on a site's training split for ``local-epochs`` epochs.

    Deterministic given (run seed, ``server_round``, ``site_name``): the seed of the local run is
    ``derive_seed(seed, "train", server_round, site_name)``.

    Parameters
    ----------
    state_dict:
        Global weights (``ArrayRecord.to_torch_state_dict()``).
    cache_dir:
        The site's ready cache.
    cfg:
        The run configuration.
    server_round:
        Global round number (1-based, continuing across a resume).
    site_name:
        The site's name.

    Returns
    -------
    (state_dict, metrics):
        Trained weights (CPU tensors) and the metrics a site may send: ``num-examples`` (training patients) and
        ``train-loss`` plus ``train-<part>`` means, ``train-seconds`` (the site's compute time) and ``train-cuda``
        (1 when the site trained on a CUDA GPU).
    """
    from .training import seed_everything, train_epochs

    train_cfg = cfg.train_config()
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    train_set, _ = site_splits(load_site_dataset(cache_dir), cfg, site_name)
    seed = derive_seed(cfg.seed, "train", server_round, site_name)
    seed_everything(seed)
    t0 = time.perf_counter()
    result = train_epochs(model, train_set, train_cfg, seed=seed)
    seconds = time.perf_counter() - t0
    log.info("site %s: round %d, %d training patient(s), %d local epoch(s) on %s (precision %s) in %.1f s", site_name,
             server_round, result.num_examples, train_cfg.local_epochs, result.device, train_cfg.precision, seconds)
    metrics = train_metrics(result.num_examples, result.loss, result.parts, seconds=seconds,
                            cuda=result.device.startswith("cuda"))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return weights, metrics


def train_metrics(
    num_examples: int, loss: float, parts: Mapping[str, float], *, seconds: float = 0.0, cuda: bool = False
) -> dict[str, float | int]:
    """The training MetricRecord content of a site: its example count, mean losses, compute time and whether it
    trained on a CUDA GPU (aggregates; ``train-suppressed`` 0: the site's small-count rule may set it)."""
    out: dict[str, float | int] = {
        NUM_EXAMPLES_KEY: int(num_examples),
        f"{TRAIN_METRIC_PREFIX}loss": float(loss),
        f"{TRAIN_METRIC_PREFIX}seconds": float(seconds),
        TRAIN_CUDA_KEY: 1.0 if cuda else 0.0,
        TRAIN_SUPPRESSED_KEY: 0.0,
    }
    for name in sorted(parts):
        out[f"{TRAIN_METRIC_PREFIX}{name.replace('_', '-')}"] = float(parts[name])
    return out


def local_evaluate(
    state_dict: Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    cfg: FederationConfig,
    *,
    site_name: str,
    server_round: int | None = None,
    min_patients: int = MIN_EVAL_PATIENTS,
) -> dict[str, float | int]:
    """Evaluate the global model on a site's held-out split; return aggregate counts only.

    Also counts the risk scores of the site's training patients in the fixed bins :data:`RISK_HIST_KEYS`
    (``strpnet_core.risk_reference``; grouped so that no cell stands for fewer than
    ``max(RISK_HIST_MIN_PATIENTS, min_patients)`` patients, all zeros below that many): the server sums them
    into the reference distribution that ``strpnet predict`` ranks a new patient's risk in.

    Parameters
    ----------
    server_round:
        Global round of this evaluation, when the caller knows it: the histogram is computed only in the final round
        (``num-server-rounds``; zeros before, saving a forward pass over the training split). None: every round.
    min_patients:
        The site's small-count minimum (its node config ``min-eval-patients``, ``client/audit.py``); the risk
        histogram's groups hold at least this many patients too when it is above :data:`RISK_HIST_MIN_PATIENTS`.

    Returns
    -------
    dict
        :data:`EVAL_COUNT_KEYS` (pair counts, Dice sums, loss sum, numbers of patients and events),
        :data:`RISK_HIST_KEYS` (counts), ``num-examples`` (= evaluated patients) and ``eval-seconds`` (the forward
        passes' compute time). No per-patient value.
    """
    from .risk_reference import dataset_risks, site_risk_histogram
    from .training import evaluate_model, seed_everything

    train_cfg = cfg.train_config()
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    train_set, val_set = site_splits(load_site_dataset(cache_dir), cfg, site_name)
    seed_everything(derive_seed(cfg.seed, "evaluate", site_name))
    t0 = time.perf_counter()
    agg = evaluate_model(model, val_set, train_cfg)
    metrics = dict(agg.to_metrics())
    missing = [k for k in EVAL_COUNT_KEYS if k not in metrics]
    if missing:
        raise RuntimeError(f"EvalAggregates.to_metrics() lacks {missing}: client and core disagree")
    out: dict[str, float | int] = {k: metrics[k] for k in EVAL_COUNT_KEYS}
    out[NUM_EXAMPLES_KEY] = int(metrics["n_patients"])
    if server_round is None or server_round >= cfg.num_server_rounds:
        out.update(site_risk_histogram(dataset_risks(model, train_set, train_cfg),
                                       min_patients=max(RISK_HIST_MIN_PATIENTS, int(min_patients))))
    else:
        out.update(dict.fromkeys(RISK_HIST_KEYS, 0))
    out[EVAL_SECONDS_KEY] = float(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Pooling (server side, pure functions over plain dicts)
# ----------------------------------------------------------------------------------------------------------------------


def check_reply_keys(replies: Sequence[Mapping[str, Any]], required: Sequence[str], *, what: str,
                     names: Sequence[str] | None = None) -> None:
    """Raise ValueError when a reply lacks a required key or the replies' key sets differ.

    Parameters
    ----------
    replies:
        One metrics mapping per site.
    required:
        Keys every reply must hold.
    what:
        ``"evaluate"`` or ``"train"`` (for the message).
    names:
        How to name each reply in the message (e.g. ``node 123``); default ``reply #i``.
    """
    if not replies:
        return
    names = list(names) if names is not None else [f"reply #{i}" for i in range(len(replies))]
    reference = set(replies[0])
    for name, rep in zip(names, replies, strict=True):
        missing = [k for k in required if k not in rep]
        if missing:
            raise ValueError(
                f"{what} reply from {name} lacks key(s) {missing}; got {sorted(rep)}. Every site must run the same "
                f"strpnet-fed version (client and server disagree on the message format)"
            )
        if set(rep) != reference:
            raise ValueError(
                f"{what} replies have mismatched keys: {name} has {sorted(rep)} but {names[0]} has "
                f"{sorted(reference)}; every site must run the same strpnet-fed version"
            )


def check_test_cache(cfg: FederationConfig) -> int:
    """Check the coordinator's ``test-cache`` before the first round; return its number of usable patients.

    Raises
    ------
    FileNotFoundError
        ``test-cache`` is not a folder.
    strpnet_core.site.NoUsablePatientError
        The folder holds no usable cache file.
    ValueError
        Its patients were preprocessed with another preset than the run's.
    """
    path = Path(cfg.test_cache)
    if not path.is_dir():
        raise FileNotFoundError(f"test-cache {path}: not a folder (the coordinator's preprocessed test patients)")
    preset = cache_preset(path)
    if preset is not None and preset != cfg.preset:
        raise ValueError(f"test-cache {path}: preprocessed with preset {preset!r}, the run uses {cfg.preset!r}")
    return len(load_site_dataset(path))


def evaluate_test_set(state_dict: Mapping[str, Any], cfg: FederationConfig) -> dict[str, float]:
    """Server-side evaluation of global weights on the coordinator's own held-out cache (``test-cache``).

    The same aggregates as a site's evaluation (:func:`local_evaluate` without the small-count rule: the data never
    leave the coordinator) and the same derived metrics (:func:`derived_eval_metrics`): Harrell's C over all pairs
    of the test patients, pooled Dice, mean segmentation loss.

    Raises
    ------
    ValueError
        ``test-cache`` is empty; :class:`strpnet_core.site.NoUsablePatientError` when the folder has no usable cache.
    """
    from .training import evaluate_model

    if not cfg.test_cache:
        raise ValueError("evaluate_test_set: the run config has no test-cache")
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    counts = evaluate_model(model, load_site_dataset(cfg.test_cache), cfg.train_config()).to_metrics()
    return {**{k: float(v) for k, v in counts.items()}, **derived_eval_metrics(counts)}


def pool_eval_counts(replies: Sequence[Mapping[str, float | int]],
                     names: Sequence[str] | None = None) -> dict[str, float]:
    """Sum the sites' evaluation counts and derive the federated metrics.

    Returns
    -------
    dict
        The summed :data:`EVAL_COUNT_KEYS`, ``sites`` (number of replies) and

        - ``c-index`` = (concordant + tied_risk / 2) / comparable  (NaN when no pair is comparable),
        - ``dice`` = 2 * dice_intersection / dice_denominator      (pooled over voxels; NaN when the denominator is 0),
        - ``loss`` = loss_sum / n_labelled                         (NaN without labelled patient)

        (:func:`derived_eval_metrics`).

        The risk-histogram counts :data:`RISK_HIST_KEYS` are summed too when the replies hold them, and
        ``eval-seconds-max`` is the slowest site's ``eval-seconds`` when the replies hold it.
    """
    check_reply_keys(replies, EVAL_COUNT_KEYS, what="evaluate", names=names)
    summed = EVAL_COUNT_KEYS + (RISK_HIST_KEYS if replies and all(k in replies[0] for k in RISK_HIST_KEYS) else ())
    # math.fsum: exactly rounded, so the pooled numbers do not depend on the order the replies arrived in
    pooled: dict[str, float] = {k: math.fsum(float(r[k]) for r in replies) for k in summed}
    if replies and EVAL_SECONDS_KEY in replies[0]:  # the key sets were checked equal
        pooled[f"{EVAL_SECONDS_KEY}-max"] = max(float(r[EVAL_SECONDS_KEY]) for r in replies)
    pooled.update(derived_eval_metrics(pooled))
    pooled["sites"] = float(len(replies))
    return pooled


def derived_eval_metrics(counts: Mapping[str, float]) -> dict[str, float]:
    """C-index (``metrics.ConcordanceCounts``; NaN without comparable pair), pooled Dice
    (``metrics.dice_from_counts``; NaN when no labelled patient was counted: a recurrence mask is never empty, so
    ``dice_denominator = 0`` means "no data", e.g. every site below its small-count rule) and the mean segmentation
    loss ``loss_sum / n_labelled`` (NaN without labelled patient) from (pooled) counts."""
    from .metrics import ConcordanceCounts, dice_from_counts

    c_index = ConcordanceCounts.from_dict(counts).c_index
    dice = (dice_from_counts(counts["dice_intersection"], counts["dice_denominator"])
            if counts["dice_denominator"] > 0 else math.nan)
    loss = counts["loss_sum"] / counts["n_labelled"] if counts["n_labelled"] > 0 else math.nan
    return {"c-index": float(c_index), "dice": float(dice), "loss": float(loss)}


def pool_train_metrics(replies: Sequence[Mapping[str, float | int]],
                       names: Sequence[str] | None = None) -> dict[str, float]:
    """Example-weighted means of the sites' ``train-*`` metrics over the sites that sent them.

    ``mean_x = sum_k n_k (1 - s_k) x_k / sum_k n_k (1 - s_k)`` with ``n_k`` = ``num-examples`` and ``s_k`` =
    ``train-suppressed`` (1: the site's small-count rule zeroed its means; absent: 0); NaN when no site counts.
    ``num-examples`` is summed over all sites and ``train-suppressed`` becomes the number of suppressed sites;
    ``train-cuda`` (which the rule keeps: a share of patients, not a value of theirs) is weighted by ``n_k`` over
    every site, the share of all the round's training patients that went through a GPU.
    """
    check_reply_keys(replies, (NUM_EXAMPLES_KEY, f"{TRAIN_METRIC_PREFIX}loss"), what="train", names=names)
    weights = [float(r[NUM_EXAMPLES_KEY]) * (1.0 - float(r.get(TRAIN_SUPPRESSED_KEY, 0.0))) for r in replies]
    total = math.fsum(weights)  # fsum here and below: the same bits whatever the order of the replies
    out: dict[str, float] = {NUM_EXAMPLES_KEY: math.fsum(float(r[NUM_EXAMPLES_KEY]) for r in replies),
                             "sites": float(len(replies))}
    for key in sorted(replies[0]) if replies else []:
        if key == NUM_EXAMPLES_KEY:
            continue
        if key == TRAIN_SUPPRESSED_KEY:
            out[key] = math.fsum(float(r[key]) for r in replies)
        elif key == TRAIN_CUDA_KEY:
            out[key] = math.fsum(float(r[key]) * float(r[NUM_EXAMPLES_KEY]) for r in replies) / out[NUM_EXAMPLES_KEY] \
                if out[NUM_EXAMPLES_KEY] > 0 else math.nan
        elif total > 0:
            out[key] = math.fsum(float(r[key]) * w for r, w in zip(replies, weights, strict=True)) / total
        else:
            out[key] = math.nan
    return out
