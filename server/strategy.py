"""The server strategy: Flower's FedAvg / FedMedian / FedTrimmedAvg / Krum with the ST-RPNet behaviours, optionally
wrapped by Flower's differential-privacy wrappers; chosen by the run config (:func:`make_strategy`).

ST-RPNet behaviours (:class:`STRPNetStrategyMixin`, placed before the Flower strategy in the bases):

- **Bounded node sampling.** Flower's ``sample_nodes`` waits forever for ``min-available-nodes`` (a killed SuperNode
  is declared offline after ~1 min and never comes back), and samples among node ids, which a simulation draws anew
  each session. Here a simulation's sampling of a fraction orders the sites by a seeded key of their names first
  (``sampling-keys``, :meth:`STRPNetStrategyMixin.site_order`), and a sampling waits at most ``node-wait-timeout`` seconds
  (``start-wait-timeout`` before the first round, while the federation assembles); then it goes on with the connected
  sites when at least the quorum (``min-train-nodes`` / ``min-evaluate-nodes``) is there, and otherwise raises
  :class:`QuorumNotReached` (the ServerApp writes the outputs of the completed rounds and stops). After one such wait
  the next rounds do not wait again for the same missing site. Sites that were connected at the previous sampling
  and are gone ("lost node N"), that come back, or that are new are logged.
- **Reply screening** (``server/update_checks.py``): an error reply is logged with its reason; a reply with missing
  or extra arrays, a wrong shape or dtype, non-finite values, or unusable metrics is *rejected* (logged with the node
  id and the reason) and the round aggregates the others; a sampled site that sent nothing (lost, timed out) is named.
  Counts go to the round's metrics row (``train_rejected``, ``train_failures``, ...).
- **Content-ordered aggregation**: accepted replies are aggregated in the order of the SHA-256 of their weights, not
  of their arrival, so a resumed run reaches bit-identical weights.
- **Per-round memory** of the aggregated metrics for the checkpoint hook.

Robust aggregation: ``aggregation = "fedmedian"`` (coordinate-wise median, Yin et al. 2018), ``"fedtrimmedavg"``
(coordinate-wise mean after dropping ``floor(trim-beta * n)`` values at each end), ``"krum"`` (the one update with the
smallest sum of squared distances to its ``n - f - 2`` nearest others, Blanchard et al. 2017; ``f`` =
``krum-num-malicious``).

Differential privacy (``dp = "server-fixed"`` or ``"client-fixed"``): Flower's
``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping`` around the FedAvg above. Each
accepted update :math:`\\Delta_k = w_k - w` is clipped to norm :math:`C` (``dp-clipping-norm``; on the server, or at the
site by ``fixedclipping_mod``), the clipped updates are averaged with equal weights and Gaussian noise
:math:`\\mathcal N(0, (z C / m)^2)` is added (``z`` = ``dp-noise-multiplier``, ``m`` = the number of accepted replies
of the round: rejected or missing sites do not shrink the noise below what the mean of ``m`` updates needs).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_clip_model_update

from strpnet_core.environment import CONFIG_KEY as VERSIONS_KEY
from strpnet_core.environment import library_versions
from strpnet_core.federation import (
    AGGREGATIONS,
    DP_MODES,
    EVAL_COUNT_KEYS,
    EVAL_SECONDS_KEY,
    NUM_EXAMPLES_KEY,
    SAMPLING_KEY,
    SAMPLING_QUERY,
    TRAIN_METRIC_PREFIX,
    TRAIN_SUPPRESSED_KEY,
    FederationConfig,
    derive_seed,
)

from .aggregation import arrays_digest, evaluate_metrics_aggr_fn, train_metrics_aggr_fn
from .update_checks import (
    array_signature,
    check_evaluate_reply,
    check_train_reply,
    majority_keys,
    metric_keys,
)

#: This coordinator's library versions (JSON), sent with every train message.
_COORDINATOR_VERSIONS = json.dumps(library_versions(), sort_keys=True)

#: Relative slack of the server's check that a client-side clipped update has norm <= C (float32 rounding).
_CLIP_SLACK = 1e-3


class QuorumNotReached(RuntimeError):
    """Fewer sites than the quorum were connected when the bounded wait ended: the run cannot go on."""


class STRPNetStrategyMixin:
    """ST-RPNet behaviours over a Flower ``FedAvg``-family strategy (see the module docstring).

    Use as the first base: ``class S(STRPNetStrategyMixin, FedMedian)``.

    Parameters
    ----------
    node_wait_timeout:
        Longest wait (s) of one node sampling for ``min-available-nodes`` once the run has started.
    start_wait_timeout:
        Longest wait (s) of the first sampling of the run (sites still starting). None: ``node_wait_timeout``.
    poll_interval:
        Seconds between two looks at the connected nodes while waiting.
    round_offset:
        Rounds completed before this session (resume); only for the global round numbers in the logs.
    sampling_keys:
        Sample a fraction of the sites in the order of their reported keys (:meth:`site_order`), not of node ids.
    seed:
        The run's seed: a sampling of a fraction draws with ``random.Random(derive_seed(seed, "sampling", global
        round, step))``, its own generator (Flower's retries and heartbeats draw from Python's global one, as many
        times as the network makes them, so its state at a sampling is not a function of the seed).
    **kwargs:
        The Flower strategy's parameters; ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn`` default to
        :func:`server.aggregation.train_metrics_aggr_fn` / :func:`server.aggregation.evaluate_metrics_aggr_fn`.

    Attributes
    ----------
    last_train_metrics, last_evaluate_metrics:
        Aggregated metrics of the latest round (None when that step had no usable reply); the server's per-round
        hook reads and clears them (:meth:`pop_round_stats`).
    last_train_failures, last_evaluate_failures:
        Sampled sites that gave no usable content (error reply, lost, timed out).
    last_train_rejected, last_evaluate_rejected:
        Replies refused by the checks.
    last_connected:
        Number of connected sites at the latest sampling.
    last_site_metrics:
        Node id -> that site's own aggregate counts of the latest round (``train_examples``, ``train_loss`` and
        the evaluation counts), from its accepted replies; the server stores them as ``per_site`` rows
        (``strpnet report``). Never a site's risk histogram.
    """

    def __init__(
        self,
        *args: Any,
        node_wait_timeout: float = 120.0,
        start_wait_timeout: float | None = None,
        poll_interval: float = 1.0,
        round_offset: int = 0,
        sampling_keys: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", train_metrics_aggr_fn)
        kwargs.setdefault("evaluate_metrics_aggr_fn", evaluate_metrics_aggr_fn)
        super().__init__(*args, **kwargs)
        if node_wait_timeout < 0 or (start_wait_timeout is not None and start_wait_timeout < 0):
            raise ValueError("node/start wait timeouts must be >= 0 s")
        self.node_wait_timeout = float(node_wait_timeout)
        self.start_wait_timeout = float(node_wait_timeout if start_wait_timeout is None else start_wait_timeout)
        self.poll_interval = float(poll_interval)
        self.round_offset = int(round_offset)
        self.sampling_keys = bool(sampling_keys)
        self.seed = int(seed)
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate_metrics: MetricRecord | None = None
        self.last_train_failures = 0
        self.last_evaluate_failures = 0
        self.last_train_rejected = 0
        self.last_evaluate_rejected = 0
        self.last_connected = 0
        self.last_site_metrics: dict[str, dict[str, float]] = {}
        self.current_arrays: ArrayRecord | None = None
        self._reference: dict[str, tuple[tuple[int, ...], str]] | None = None
        self._sampled: dict[str, list[int]] = {}
        self._screened_round: int | None = None
        self._last_nodes: set[int] | None = None
        self._seen: set[int] = set()
        self._degraded: int | None = None
        self._site_keys: dict[int, int] = {}

    # ------------------------------------------------------------------------------------------------------------------
    # Node sampling
    # ------------------------------------------------------------------------------------------------------------------

    def _round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _note_membership(self, nodes: Iterable[int]) -> None:
        now = set(nodes)
        if self._last_nodes is not None:
            for n in sorted(self._last_nodes - now):
                log(WARNING, "[strpnet] lost node %d: connected at the previous sampling, gone now", n)
            for n in sorted(now - self._last_nodes):
                if n in self._seen:
                    log(INFO, "[strpnet] node %d is back", n)
                else:
                    log(INFO, "[strpnet] new node %d joined", n)
        self._seen |= now
        self._last_nodes = now

    def sample_nodes_bounded(self, grid: Grid, *, server_round: int, fraction: float, min_nodes: int,
                             step: str) -> list[int]:
        """Sample ``max(int(n * fraction), min_nodes)`` of the ``n`` connected nodes after a bounded wait.

        Waits until ``max(min-available-nodes, min_nodes)`` nodes are connected, at most ``node_wait_timeout``
        seconds (``start_wait_timeout`` at the first sampling of the run; no wait when the previous sampling already
        accepted this many nodes after a wait). Then needs at least the quorum ``max(1, min_nodes)``.

        Raises
        ------
        QuorumNotReached
            When fewer than the quorum are connected after the wait.
        """
        need = max(self.min_available_nodes, min_nodes)  # type: ignore[attr-defined]
        quorum = max(1, min_nodes)
        first = self._last_nodes is None
        timeout = self.start_wait_timeout if first else self.node_wait_timeout
        nodes = sorted(grid.get_node_ids())
        already_accepted = self._degraded is not None and len(nodes) >= self._degraded
        waited = 0.0
        if len(nodes) < need and not already_accepted:
            log(INFO, "[strpnet] round %d (%s): %d of %d site(s) connected; waiting up to %.0f s",
                self._round(server_round), step, len(nodes), need, timeout)
            t0 = time.monotonic()
            deadline = t0 + timeout
            while len(nodes) < need and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(self.poll_interval, left))
                nodes = sorted(grid.get_node_ids())
            waited = time.monotonic() - t0
        self._note_membership(nodes)
        self.last_connected = len(nodes)
        if len(nodes) >= need:
            self._degraded = None
        elif len(nodes) >= quorum:
            if self._degraded != len(nodes):
                log(WARNING, "[strpnet] round %d (%s): %d of %d site(s) connected after %.0f s; going on with them "
                    "(quorum %d)", self._round(server_round), step, len(nodes), need, waited, quorum)
            self._degraded = len(nodes)
        else:
            raise QuorumNotReached(
                f"round {self._round(server_round)} ({step}): {len(nodes)} site(s) connected after waiting "
                f"{waited:.0f} s, fewer than the quorum min-{step}-nodes = {quorum} (min-available-nodes = "
                f"{self.min_available_nodes}); stopping the run"  # type: ignore[attr-defined]
            )
        size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
        if size < len(nodes) and self.sampling_keys:  # positions of the seeded RNG: in an order the seed repeats
            nodes = self.site_order(grid, nodes)
        rng = random.Random(derive_seed(self.seed, "sampling", self._round(server_round), step))
        sampled = rng.sample(nodes, size)
        self._sampled[step] = sampled
        log(INFO, "[strpnet] round %d (%s): sampled %d of %d connected site(s)", self._round(server_round), step,
            len(sampled), len(nodes))
        return sampled

    def site_order(self, grid: Grid, nodes: list[int]) -> list[int]:
        """``nodes`` ordered by their sites' sampling keys (``federation.sampling_key``: seed and site name), asked
        of each node with a ``query.sampling_key`` message until it has answered once; a node without a key goes
        after the others, by node id (logged). The query waits at most ``max(10, min(node-wait-timeout, 120))``
        seconds, and expires at the SuperLink after that time.

        For simulations (``sampling-keys``): they draw new node ids every session, so sorted node ids would sample
        other sites in two runs of one seed, or in a run and its resumption. A deployment's node ids are stable,
        and a site could choose the key it reports.
        """
        missing = [n for n in nodes if n not in self._site_keys]
        if missing:
            wait = max(10.0, min(self.node_wait_timeout, 120.0))
            ask = [Message(content=RecordDict(), dst_node_id=n, message_type=f"{MessageType.QUERY}.{SAMPLING_QUERY}",
                           ttl=wait) for n in missing]
            for reply in grid.send_and_receive(ask, timeout=wait):
                if reply.has_error():  # e.g. a site of an older version without this query
                    continue
                try:
                    key = reply.content["metrics"][SAMPLING_KEY]
                except (KeyError, TypeError):
                    continue
                if isinstance(key, int) and not isinstance(key, bool) and reply.metadata.src_node_id in missing:
                    self._site_keys[reply.metadata.src_node_id] = key
            unknown = [n for n in missing if n not in self._site_keys]
            if unknown:
                log(WARNING, "[strpnet] no sampling key from node(s) %s: sampled after the others, by node id, and "
                    "asked again at the next sampling (a run with the same seed may sample other sites)",
                    ", ".join(map(str, unknown)))
        keys = self._site_keys
        return sorted(nodes, key=lambda n: (n not in keys, keys.get(n, 0), n))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's ``configure_train`` with the bounded sampling; remembers the global model for the checks."""
        self.current_arrays = arrays
        self._reference = array_signature(arrays)
        return self._configure("train", server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's ``configure_evaluate`` with the bounded sampling."""
        return self._configure("evaluate", server_round, arrays, config, grid)

    def _configure(self, step: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                   grid: Grid) -> Iterable[Message]:
        """The messages of one step (``"train"`` or ``"evaluate"``) to the nodes of the bounded sampling."""
        train = step == "train"
        fraction = self.fraction_train if train else self.fraction_evaluate  # type: ignore[attr-defined]
        if fraction == 0.0:
            self._sampled[step] = []
            return []
        nodes = self.sample_nodes_bounded(grid, server_round=server_round, fraction=fraction, step=step,
                                          min_nodes=self.min_train_nodes if train  # type: ignore[attr-defined]
                                          else self.min_evaluate_nodes)  # type: ignore[attr-defined]
        config["server-round"] = server_round
        if train:  # each site compares them with its own libraries (strpnet_core.environment)
            config[VERSIONS_KEY] = _COORDINATOR_VERSIONS
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})  # type: ignore[attr-defined]
        return self._construct_messages(record, nodes,  # type: ignore[attr-defined]
                                        MessageType.TRAIN if train else MessageType.EVALUATE)

    # ------------------------------------------------------------------------------------------------------------------
    # Reply screening
    # ------------------------------------------------------------------------------------------------------------------

    def reject(self, server_round: int, step: str, node: int, reason: str) -> None:
        """Log a refused reply (node and reason), count it in the round's ``<step>_rejected`` and drop what
        :meth:`_remember_sites` kept of it (a later check, e.g. the DP norm check, may refuse a screened reply)."""
        log(WARNING, "[strpnet] round %d: rejected the %s reply of node %d: %s", self._round(server_round), step,
            node, reason)
        if step == "train":
            self.last_train_rejected += 1
        else:
            self.last_evaluate_rejected += 1
        row = self.last_site_metrics.get(str(node))
        if row is not None:
            for k in [k for k in row if k.startswith("train_") == (step == "train")]:
                del row[k]
            if not row:
                del self.last_site_metrics[str(node)]

    def _screen(self, server_round: int, replies: list[Message], step: str,
                check: Callable[[RecordDict], str | None]) -> list[Message]:
        sampled = self._sampled.get(step, [])
        if step == "train":
            self.last_train_rejected = 0
        else:
            self.last_evaluate_rejected = 0
        content_nodes: set[int] = set()
        unavailable: list[str] = []
        errors = 0
        passed: list[Message] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                errors += 1
                if node in sampled:
                    log(WARNING, "[strpnet] round %d: node %d sent an error instead of its %s reply: %s",
                        self._round(server_round), node, step, msg.error.reason)
                    content_nodes.add(node)
                else:  # generated by the SuperLink for a message whose node went offline or expired
                    unavailable.append(str(msg.error.reason))
                continue
            content_nodes.add(node)
            why = check(msg.content)
            if why is not None:
                self.reject(server_round, step, node, why)
            else:
                passed.append(msg)
        keys = majority_keys(metric_keys(m.content) for m in passed)
        accepted = []
        for msg in passed:
            own = metric_keys(msg.content)
            if own != keys:
                self.reject(server_round, step, int(msg.metadata.src_node_id),
                            f"metric keys {sorted(own)} differ from the other sites' {sorted(keys or ())}")
            else:
                accepted.append(msg)
        missing = [n for n in sampled if n not in content_nodes]
        for n in missing:
            log(WARNING, "[strpnet] round %d: no %s reply from node %d (%s)", self._round(server_round), step, n,
                unavailable[0] if unavailable else "timed out: round-timeout reached")
        failures = (len(set(sampled) - {int(m.metadata.src_node_id) for m in replies if not m.has_error()})
                    if sampled else errors)
        if step == "train":
            self.last_train_failures = failures
        else:
            self.last_evaluate_failures = failures
        if not accepted:
            log(WARNING, "[strpnet] round %d: no usable %s reply", self._round(server_round), step)
        self._remember_sites(accepted, step)
        return accepted

    def _remember_sites(self, accepted: list[Message], step: str) -> None:
        for m in accepted:
            got = next(iter(m.content.metric_records.values()))
            row = self.last_site_metrics.setdefault(str(m.metadata.src_node_id), {})
            if step == "train":
                row["train_examples"] = float(got[NUM_EXAMPLES_KEY])
                suppressed = float(got.get(TRAIN_SUPPRESSED_KEY, 0.0)) > 0
                if not suppressed:  # a suppressed site's zeros are no loss
                    row["train_loss"] = float(got[f"{TRAIN_METRIC_PREFIX}loss"])
                for name in ("seconds", "cuda", "suppressed"):
                    if f"{TRAIN_METRIC_PREFIX}{name}" in got:
                        row[f"train_{name}"] = float(got[f"{TRAIN_METRIC_PREFIX}{name}"])
            else:
                row.update({k: float(got[k]) for k in EVAL_COUNT_KEYS})
                if EVAL_SECONDS_KEY in got:
                    row["eval_seconds"] = float(got[EVAL_SECONDS_KEY])

    def _train_check(self, content: RecordDict) -> str | None:
        return check_train_reply(content, self._reference or {})

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Check the train replies (logging and counting the refused and missing ones); return the accepted ones.

        A wrapper (DP) may call this before :meth:`aggregate_train`, which then does not check them again.
        """
        replies = list(replies)
        if self._reference is None:  # aggregate_train without configure_train (direct use): the majority shapes
            sigs = Counter(tuple(sorted(array_signature(next(iter(m.content.array_records.values()))).items()))
                           for m in replies if not m.has_error() and len(m.content.array_records) == 1)
            if sigs:
                self._reference = dict(min(sigs, key=lambda s: (-sigs[s], s)))
        accepted = self._screen(server_round, replies, "train", self._train_check)
        self._screened_round = server_round
        return accepted

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies (unless a wrapper did), aggregate the accepted ones in content order."""
        replies = list(replies)
        valid = replies if self._screened_round == server_round else self.screen_train(server_round, replies)
        self._screened_round = None
        self.last_train_metrics = None
        if not valid:
            return None, None
        valid.sort(key=lambda m: arrays_digest(next(iter(m.content.array_records.values()))))
        arrays, metrics = self._aggregate_sorted(server_round, valid)
        if arrays is not None and self._reference is not None:
            arrays = _cast_like(arrays, self._reference)
        self.last_train_metrics = metrics
        return arrays, metrics

    def _aggregate_sorted(self, server_round: int,
                          valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's aggregation of the screened replies, in content order."""
        return super().aggregate_train(server_round, valid)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Screen the evaluate replies, then pool the accepted ones' counts."""
        valid = self._screen(server_round, list(replies), "evaluate", check_evaluate_reply)
        self.last_evaluate_metrics = None
        if not valid:
            return None
        metrics = super().aggregate_evaluate(server_round, valid)  # type: ignore[misc]
        self.last_evaluate_metrics = metrics
        return metrics

    def pop_round_stats(self) -> dict[str, Any]:
        """The latest round's metrics and counters (then cleared), for the server's metrics row."""
        out = {
            "train_metrics": self.last_train_metrics,
            "evaluate_metrics": self.last_evaluate_metrics,
            "train_failures": self.last_train_failures,
            "eval_failures": self.last_evaluate_failures,
            "train_rejected": self.last_train_rejected,
            "eval_rejected": self.last_evaluate_rejected,
            "sites_connected": self.last_connected,
            "site_metrics": self.last_site_metrics,
        }
        self.last_site_metrics = {}
        self.last_train_metrics = self.last_evaluate_metrics = None
        self.last_train_failures = self.last_evaluate_failures = 0
        self.last_train_rejected = self.last_evaluate_rejected = 0
        return out


def _cast_like(arrays: ArrayRecord, reference: Mapping[str, tuple[tuple[int, ...], str]]) -> ArrayRecord:
    """Give every aggregated array the dtype of the global model's (median/trimmed mean may change it)."""
    if all(str(arrays[k].dtype) == reference[k][1] for k in arrays.keys() if k in reference):
        return arrays
    out = {}
    for k in arrays.keys():
        a = arrays[k].numpy()
        dtype = np.dtype(reference[k][1]) if k in reference else a.dtype
        out[k] = Array(np.asarray(np.rint(a) if dtype.kind in "iu" and a.dtype.kind == "f" else a).astype(dtype))
    return ArrayRecord(out)


class STRPNetFedAvg(STRPNetStrategyMixin, FedAvg):
    """FedAvg with the ST-RPNet behaviours: the example-weighted mean ``sum_k n_k w_k / sum_k n_k`` of the accepted
    weights, or with ``equal_weights`` the plain mean ``(1/m) sum_k w_k`` (under DP: the noise ``z C / m`` bounds one
    site's influence only when each clipped update enters with weight ``1/m``). The training metrics stay
    example-weighted means either way."""

    def __init__(self, *args: Any, equal_weights: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.equal_weights = bool(equal_weights)

    def _aggregate_sorted(self, server_round: int,
                          valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.equal_weights:
            return super()._aggregate_sorted(server_round, valid)
        records = [next(iter(m.content.array_records.values())) for m in valid]
        arrays = ArrayRecord({k: Array(np.asarray(np.mean([r[k].numpy() for r in records], axis=0)))
                              for k in records[0].keys()})
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class STRPNetFedMedian(STRPNetStrategyMixin, FedMedian):
    """Coordinate-wise median of the accepted updates (robust to a minority of arbitrary updates)."""


class STRPNetFedTrimmedAvg(STRPNetStrategyMixin, FedTrimmedAvg):
    """Coordinate-wise mean after dropping ``floor(beta * n)`` values at each end (``trim-beta``)."""


class STRPNetKrum(STRPNetStrategyMixin, Krum):
    """Krum: the accepted update closest to its ``n - f - 2`` nearest others (``krum-num-malicious`` = f)."""


class _ScreenBeforeDP:
    """For Flower's DP wrappers: screen the replies first (the wrapper skips a round with any error reply and would
    clip malformed arrays), then calibrate the noise to the number of accepted replies."""

    strategy: STRPNetStrategyMixin
    num_sampled_clients: int

    def _accepted(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        return self.strategy.screen_train(server_round, replies)

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The accepted replies; the noise is calibrated to their number (none: the round keeps the old model)."""
        valid = self._accepted(server_round, replies)
        if valid:
            self.num_sampled_clients = len(valid)
        else:
            self.strategy._screened_round = None
            self.strategy.last_train_metrics = None
        return valid

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, then clip/aggregate/noise with Flower's wrapper over the accepted replies."""
        valid = self._screen(server_round, replies)
        if not valid:
            return None, None
        return super().aggregate_train(server_round, valid)  # type: ignore[misc]


class STRPNetDPServerSide(_ScreenBeforeDP, DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP with server-side fixed clipping over the ST-RPNet FedAvg.

    Flower 1.42's clipping divides by the update norm: a reply equal to the global model (zero update; a hostile
    site can send it) raises ZeroDivisionError and kills the round. Here the accepted replies are clipped with
    Flower's ``compute_clip_model_update`` except zero updates (nothing to clip), then Flower's wrapper adds the noise.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip each accepted update to ``dp-clipping-norm``, aggregate, add N(0, (z C / m)^2) noise."""
        valid = self._screen(server_round, replies)
        if not valid:
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in valid:
            for name, record in list(reply.content.array_records.items()):
                values = record.to_numpy_ndarrays()
                if any(np.any(v != c) for v, c in zip(values, current, strict=True)):
                    compute_clip_model_update(param1=values, param2=current, clipping_norm=self.clipping_norm)
                reply.content[name] = ArrayRecord({k: Array(np.asarray(v))
                                                   for k, v in zip(record.keys(), values, strict=True)})
        log(INFO, "[strpnet] round %d: %d update(s) clipped to norm %g", self.strategy._round(server_round),
            len(valid), self.clipping_norm)
        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        return arrays, metrics


class STRPNetDPClientSide(_ScreenBeforeDP, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP with client-side fixed clipping (``fixedclipping_mod`` at the sites) over the ST-RPNet
    FedAvg. The server also refuses an update whose norm exceeds the clipping norm (a site that did not clip)."""

    def _accepted(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        valid = self.strategy.screen_train(server_round, replies)
        current = self.strategy.current_arrays
        if current is None:
            return valid
        ref = {k: current[k].numpy() for k in current.keys()}
        kept = []
        for msg in valid:
            arrays = next(iter(msg.content.array_records.values()))
            norm = float(np.sqrt(sum(float(np.sum((arrays[k].numpy().astype(np.float64) - ref[k]) ** 2))
                                     for k in ref)))
            if norm > self.clipping_norm * (1.0 + _CLIP_SLACK):
                self.strategy.reject(server_round, "train", int(msg.metadata.src_node_id),
                                     f"update norm {norm:.4g} exceeds dp-clipping-norm {self.clipping_norm:g} "
                                     f"(the site did not clip: is fixedclipping_mod in its ClientApp?)")
            else:
                kept.append(msg)
        return kept


def core_strategy(strategy: Strategy) -> STRPNetStrategyMixin:
    """The :class:`STRPNetStrategyMixin` inside ``strategy`` (itself, or the strategy a DP wrapper holds)."""
    s: Any = strategy
    while not isinstance(s, STRPNetStrategyMixin):
        if not hasattr(s, "strategy"):
            raise TypeError(f"{type(strategy).__name__} holds no STRPNet strategy")
        s = s.strategy
    return s


def make_strategy(cfg: FederationConfig, *, round_offset: int = 0, poll_interval: float = 1.0) -> Strategy:
    """The strategy the run config asks for.

    Parameters
    ----------
    cfg:
        Run configuration: ``aggregation`` (``fedavg``, ``fedmedian``, ``fedtrimmedavg``, ``krum``), ``trim-beta``,
        ``krum-num-malicious``, ``dp`` (``off``, ``server-fixed``, ``client-fixed``), ``dp-noise-multiplier``,
        ``dp-clipping-norm``, the sampling knobs and ``node-wait-timeout`` / ``start-wait-timeout``.
    round_offset:
        Completed rounds before this session (resume), for the logs.
    poll_interval:
        Seconds between looks at the connected nodes while waiting.

    Returns
    -------
    Strategy
        A :class:`STRPNetStrategyMixin` strategy, or a DP wrapper around :class:`STRPNetFedAvg`; use
        :func:`core_strategy` to reach its per-round statistics.
    """
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        node_wait_timeout=cfg.node_wait_timeout,
        start_wait_timeout=cfg.start_wait_timeout,
        poll_interval=poll_interval,
        round_offset=round_offset,
        sampling_keys=cfg.sampling_keys,
        seed=cfg.seed,
    )
    if cfg.aggregation == "fedavg":
        inner: STRPNetStrategyMixin = STRPNetFedAvg(**common, equal_weights=cfg.dp != "off")
    elif cfg.aggregation == "fedmedian":
        inner = STRPNetFedMedian(**common)
    elif cfg.aggregation == "fedtrimmedavg":
        inner = STRPNetFedTrimmedAvg(**common, beta=cfg.trim_beta)
    elif cfg.aggregation == "krum":
        inner = STRPNetKrum(**common, num_malicious_nodes=cfg.krum_num_malicious)
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {cfg.aggregation!r}")
    if cfg.dp == "off":
        return inner  # type: ignore[return-value]
    expected = max(1, cfg.min_train_nodes)
    wrapper = STRPNetDPServerSide if cfg.dp == "server-fixed" else STRPNetDPClientSide
    if cfg.dp not in DP_MODES:
        raise ValueError(f"dp must be one of {DP_MODES}, got {cfg.dp!r}")
    return wrapper(inner, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, expected)  # type: ignore[arg-type]
