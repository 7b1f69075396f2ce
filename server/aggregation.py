"""Server-side aggregation: FedAvg with deterministic weight averaging and federated (pooled) metrics.

- :func:`evaluate_metrics_aggr_fn`: sums the sites' concordance pair counts and Dice sums and derives the federated
  C-index and pooled Dice (``strpnet_core.federation.pool_eval_counts``). FedAvg's default weighted mean of
  per-site values would be wrong for Harrell's C.
- :func:`train_metrics_aggr_fn`: example-weighted means of the sites' training losses.
- :class:`STRPNetFedAvg`: ``flwr.serverapp.strategy.FedAvg`` that (1) checks every reply's keys and names the node
  in a clear error, (2) averages the weights in an order fixed by their content (not by arrival), so that a run and
  its resumed twin reach bit-identical weights, (3) remembers each round's aggregated metrics for checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strpnet_core.federation import (
    EVAL_COUNT_KEYS,
    NUM_EXAMPLES_KEY,
    TRAIN_METRIC_PREFIX,
    check_reply_keys,
    pool_eval_counts,
    pool_train_metrics,
)


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


def _reply_name(msg: Message) -> str:
    return f"node {msg.metadata.src_node_id}"


class STRPNetFedAvg(FedAvg):
    """FedAvg with clear reply checks, content-ordered averaging and per-round metric memory.

    Parameters are those of ``flwr.serverapp.strategy.FedAvg``; the metric aggregation functions default to
    :func:`train_metrics_aggr_fn` and :func:`evaluate_metrics_aggr_fn`.

    Attributes
    ----------
    last_train_metrics, last_evaluate_metrics:
        The aggregated metrics of the latest round (None when that step had no valid reply); the server's
        per-round hook reads and clears them.
    last_train_failures, last_evaluate_failures:
        Number of error replies in the latest round.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", train_metrics_aggr_fn)
        kwargs.setdefault("evaluate_metrics_aggr_fn", evaluate_metrics_aggr_fn)
        super().__init__(**kwargs)
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate_metrics: MetricRecord | None = None
        self.last_train_failures = 0
        self.last_evaluate_failures = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, order them by weight content, then FedAvg them."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        self.last_train_failures = len(replies) - len(valid)
        if valid:
            names = [_reply_name(m) for m in valid]
            for name, m in zip(names, valid, strict=True):
                if len(m.content.array_records) != 1:
                    raise ReplyFormatError(f"train reply from {name}: expected one ArrayRecord (the weights)")
            try:
                check_reply_keys([_metrics_of([m.content], "train")[0] for m in valid],
                                 (NUM_EXAMPLES_KEY, f"{TRAIN_METRIC_PREFIX}loss"), what="train", names=names)
            except ValueError as exc:
                raise ReplyFormatError(str(exc)) from None
            valid.sort(key=lambda m: arrays_digest(next(iter(m.content.array_records.values()))))
        ordered = valid + [m for m in replies if m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, ordered)
        self.last_train_metrics = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check the replies' keys (naming the node), then pool the counts."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        self.last_evaluate_failures = len(replies) - len(valid)
        if valid:
            try:
                check_reply_keys([_metrics_of([m.content], "evaluate")[0] for m in valid],
                                 (*EVAL_COUNT_KEYS, NUM_EXAMPLES_KEY), what="evaluate",
                                 names=[_reply_name(m) for m in valid])
            except ValueError as exc:
                raise ReplyFormatError(str(exc)) from None
        metrics = super().aggregate_evaluate(server_round, replies)
        self.last_evaluate_metrics = metrics
        return metrics
