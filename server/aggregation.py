"""Server-side aggregation: FedAvg with deterministic weight averaging and federated (pooled) metrics.

- :func:`evaluate_metrics_aggr_fn`: sums the sites' concordance pair counts and Dice sums and derives the federated
  C-index and pooled Dice (``strpnet_core.federation.pool_eval_counts``). FedAvg's default weighted mean of
  per-site values would be wrong for Harrell's C.
- :func:`train_metrics_aggr_fn`: example-weighted means of the sites' training losses.
- :func:`arrays_digest`: the content key by which the strategy orders replies before averaging, so that a run and
  its resumed twin reach bit-identical weights.

The strategies themselves (FedAvg, FedMedian, FedTrimmedAvg, Krum, DP wrappers; reply checks, bounded node sampling)
are in ``server/strategy.py``; ``STRPNetFedAvg`` is still importable from here.
"""

from __future__ import annotations

import hashlib
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from strpnet_core.federation import NUM_EXAMPLES_KEY, TRAIN_METRIC_PREFIX, pool_eval_counts, pool_train_metrics


class ReplyFormatError(ValueError):
    """A site's reply does not have the message format of this strpnet-fed version."""


def _metrics_of(records: list[RecordDict], what: str) -> list[dict[str, Any]]:
    out = []
    for i, rec in enumerate(records):
        mrs = list(rec.metric_records.values())
        if len(mrs) != 1:
            raise ReplyFormatError(f"{what} reply #{i}: expected exactly one MetricRecord, got {len(mrs)}")
        out.append(dict(mrs[0]))
    return out


def evaluate_metrics_aggr_fn(records: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES_KEY) -> MetricRecord:
    """Pool the sites' evaluation counts (FedAvg's ``evaluate_metrics_aggr_fn``).

    Parameters
    ----------
    records:
        The replies' contents; each holds one MetricRecord with :data:`EVAL_COUNT_KEYS` and ``num-examples``.
    weighted_by_key:
        Ignored (counts are summed, not averaged); kept for FedAvg's signature.

    Returns
    -------
    MetricRecord
        Summed counts, ``c-index`` (pooled Harrell's C), ``dice`` (pooled), ``loss`` and ``sites``.

    Raises
    ------
    ReplyFormatError
        When a reply lacks a key or the replies' keys differ.
    """
    metrics = _metrics_of(records, "evaluate")
    try:
        pooled = pool_eval_counts(metrics)
    except ValueError as exc:
        raise ReplyFormatError(str(exc)) from None
    return MetricRecord(pooled)


def train_metrics_aggr_fn(records: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES_KEY) -> MetricRecord:
    """Example-weighted means of the sites' ``train-*`` metrics (``num-examples`` summed, ``train-seconds-max``)."""
    metrics = _metrics_of(records, "train")
    try:
        pooled = pool_train_metrics(metrics)
    except ValueError as exc:
        raise ReplyFormatError(str(exc)) from None
    seconds = [float(m[f"{TRAIN_METRIC_PREFIX}seconds"]) for m in metrics if f"{TRAIN_METRIC_PREFIX}seconds" in m]
    if seconds:
        pooled[f"{TRAIN_METRIC_PREFIX}seconds-max"] = max(seconds)
    return MetricRecord(pooled)


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 of an ArrayRecord's keys and bytes: a content key independent of node ids and arrival order."""
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        h.update(key.encode("utf-8"))
        h.update(arrays[key].data)
    return h.hexdigest()


def __getattr__(name: str) -> object:
    """``STRPNetFedAvg`` moved to ``server/strategy.py`` (with FedMedian, FedTrimmedAvg, Krum and DP); kept importable."""
    if name == "STRPNetFedAvg":
        from .strategy import STRPNetFedAvg

        return STRPNetFedAvg
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
