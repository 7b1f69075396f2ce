"""The server strategy with constructed replies (fast): hostile replies are rejected and named, robust aggregation
resists a 1e3-scaled update that wrecks FedAvg, the DP wrappers keep the checks and the per-round hooks, node
sampling waits a bounded time and goes on with a quorum."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.strategy import (
    QuorumNotReached,
    STRPNetDPClientSide,
    STRPNetDPServerSide,
    STRPNetFedAvg,
    STRPNetFedMedian,
    STRPNetFedTrimmedAvg,
    STRPNetKrum,
    core_strategy,
    make_strategy,
)
from strpnet_core.federation import SAMPLING_KEY, SAMPLING_QUERY, FederationConfig, derive_seed, sampling_key

SHAPE = (4, 5)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their run/node/task ids from Flower's TaskIdentity, set by a running app; set them here."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def flwr_log() -> Iterator[list[str]]:
    """Messages logged by Flower's logger (where the strategy logs) during the test."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = _Keep(level=logging.INFO)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32)), "b": Array(np.zeros(3, np.float32))})


def _reply(node: int, w: np.ndarray, b: np.ndarray | None = None, *, n: int = 5, loss: float = 0.5) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    arrays = ArrayRecord({"w": Array(w), "b": Array(np.zeros(3, np.float32) if b is None else b)})
    return Message(content=RecordDict({"arrays": arrays,
                                       "metrics": MetricRecord({"num-examples": n, "train-loss": loss})}),
                   reply_to=ins)


def _error(node: int, reason: str) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(error=Error(code=0, reason=reason), reply_to=ins)


def _honest(seed: int = 0, k: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(1.0 + 0.1 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(k)]


class _Nodes(Grid):
    """A Grid that only answers which nodes are connected (the sampling under test asks nothing else)."""

    def __init__(self, nodes: Callable[[int], Iterable[int]]) -> None:
        self.calls = 0
        self._nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        self.calls += 1
        return list(self._nodes(self.calls))

    def set_run(self, run: object) -> None:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, *a: object, **k: object) -> Message:  # pragma: no cover - unused
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover - unused
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover - unused
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError  # pragma: no cover - unused


# ----------------------------------------------------------------------------------------------------------------------
# Rejected replies
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_reply_is_rejected_named_and_the_rest_averaged(flwr_log: list[str]) -> None:
    honest = _honest()
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2, 3, 4]))
    bad = np.full(SHAPE, np.nan, np.float32)
    replies = [_reply(i + 1, w) for i, w in enumerate(honest)] + [_reply(4, bad)]
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(honest, axis=0), rtol=1e-6)
    assert metrics["sites"] == 3
    assert s.last_train_rejected == 1 and s.last_train_failures == 0
    assert any("rejected the train reply of node 4" in x and "non-finite" in x for x in flwr_log)


def test_wrong_shape_dtype_and_keys_are_rejected_round_goes_on(flwr_log: list[str]) -> None:
    honest = _honest(k=2)
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2, 3, 4, 5]))
    ins = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    no_loss = Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(honest[0]),
                                                                 "b": Array(np.zeros(3, np.float32))}),
                                          "metrics": MetricRecord({"num-examples": 2})}), reply_to=ins)
    replies = [_reply(1, honest[0]), _reply(2, honest[1]), _reply(3, np.ones((5, 4), np.float32)),
               _reply(4, honest[0].astype(np.float64)), no_loss]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(honest, axis=0), rtol=1e-6)
    assert s.last_train_rejected == 3
    text = "\n".join(flwr_log)
    assert "node 3" in text and "shape (5, 4)" in text
    assert "node 4" in text and "dtype float64" in text
    assert "node 5" in text and "train-loss" in text


def test_error_and_missing_replies_are_logged_with_reason(flwr_log: list[str]) -> None:
    honest = _honest(k=2)
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2, 3, 4]))
    replies = [_reply(1, honest[0]), _reply(2, honest[1]),
               _error(3, "ValueError: site c: no usable case in /data/c")]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and s.last_train_failures == 2  # node 3 errored, node 4 sent nothing
    text = "\n".join(flwr_log)
    assert "node 3 sent an error" in text and "no usable case" in text
    assert "no train reply from node 4" in text


def test_no_usable_reply_keeps_the_model() -> None:
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1]))
    assert s.aggregate_train(1, [_reply(1, np.full(SHAPE, np.inf, np.float32))]) == (None, None)
    assert s.last_train_rejected == 1


def test_pop_round_stats_clears() -> None:
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2]))
    s.aggregate_train(1, [_reply(1, _honest()[0]), _reply(2, np.full(SHAPE, np.nan, np.float32))])
    stats = s.pop_round_stats()
    assert stats["train_rejected"] == 1 and stats["train_metrics"] is not None and stats["sites_connected"] == 2
    assert stats["site_metrics"] and list(stats["site_metrics"]) == ["1"]
    again = s.pop_round_stats()
    assert again["train_rejected"] == 0 and again["train_metrics"] is None


# ----------------------------------------------------------------------------------------------------------------------
# Robust aggregation against a 1e3-scaled update
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs", [(STRPNetFedMedian, {}), (STRPNetFedTrimmedAvg, {"beta": 0.25}),
                                        (STRPNetKrum, {"num_malicious_nodes": 1})])
def test_robust_aggregation_resists_a_scaled_update(cls: type, kwargs: dict) -> None:
    honest = _honest(seed=1)
    clean = np.mean(honest, axis=0)
    attacked = [_reply(i + 1, w) for i, w in enumerate(honest)] + [_reply(4, honest[0] * 1e3)]

    fedavg = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    fedavg_w = fedavg.aggregate_train(1, [_reply(i + 1, w) for i, w in enumerate(honest)]
                                      + [_reply(4, honest[0] * 1e3)])[0]["w"].numpy()
    robust = cls(min_train_nodes=1, min_available_nodes=1, **kwargs)
    robust_w = robust.aggregate_train(1, attacked)[0]["w"].numpy()
    err_avg = np.linalg.norm(fedavg_w - clean) / np.linalg.norm(clean)
    err_robust = np.linalg.norm(robust_w - clean) / np.linalg.norm(clean)
    assert err_avg > 100  # the attacker owns FedAvg's mean
    assert err_robust < 0.15  # within the spread of the honest updates (0.1 per coordinate)
    assert robust_w.dtype == np.float32


def test_aggregation_is_independent_of_reply_order() -> None:
    honest = _honest(seed=2, k=4)
    outs = set()
    for perm in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        s = STRPNetFedTrimmedAvg(min_train_nodes=1, min_available_nodes=1, beta=0.25)
        outs.add(s.aggregate_train(1, [_reply(i + 1, honest[i]) for i in perm])[0]["w"].numpy().tobytes())
    assert len(outs) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Strategy choice from the run config
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg,cls", [("fedavg", STRPNetFedAvg), ("fedmedian", STRPNetFedMedian),
                                     ("fedtrimmedavg", STRPNetFedTrimmedAvg), ("krum", STRPNetKrum)])
def test_make_strategy_follows_the_run_config(agg: str, cls: type) -> None:
    cfg = FederationConfig.from_run_config({"aggregation": agg, "trim-beta": 0.3, "krum-num-malicious": 2,
                                            "node-wait-timeout": 7.0})
    s = make_strategy(cfg)
    assert type(s) is cls and core_strategy(s) is s and s.node_wait_timeout == 7.0
    if agg == "fedtrimmedavg":
        assert s.beta == 0.3
    if agg == "krum":
        assert s.num_malicious_nodes == 2


def test_make_strategy_dp_wrappers() -> None:
    for mode, cls in (("server-fixed", STRPNetDPServerSide), ("client-fixed", STRPNetDPClientSide)):
        s = make_strategy(FederationConfig.from_run_config({"dp": mode, "dp-noise-multiplier": 0.5,
                                                            "dp-clipping-norm": 2.0}))
        assert type(s) is cls and isinstance(core_strategy(s), STRPNetFedAvg)
        assert s.noise_multiplier == 0.5 and s.clipping_norm == 2.0


@pytest.mark.parametrize("bad,match", [({"aggregation": "mean"}, "aggregation must be one of"),
                                       ({"trim-beta": 0.5}, "trim-beta"),
                                       ({"dp": "on"}, "dp must be one of"),
                                       ({"dp-clipping-norm": 0.0}, "dp-clipping-norm"),
                                       ({"dp": "server-fixed", "aggregation": "krum"}, "needs aggregation=fedavg"),
                                       ({"node-wait-timeout": -1.0}, "node-wait-timeout")])
def test_bad_knobs_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FederationConfig.from_run_config(bad)


# ----------------------------------------------------------------------------------------------------------------------
# Differential privacy wrappers
# ----------------------------------------------------------------------------------------------------------------------


def test_dp_server_side_clips_screens_and_keeps_hooks() -> None:
    cfg = FederationConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 0.0,
                                            "dp-clipping-norm": 1.0, "min-train-nodes": 1,
                                            "min-available-nodes": 1})
    s = make_strategy(cfg)
    core = core_strategy(s)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2, 3, 4]))
    big = np.full(SHAPE, 10.0, np.float32)  # update norm 10 * sqrt(20) -> clipped to 1
    replies = [_reply(1, big), _reply(2, big), _reply(3, np.full(SHAPE, np.nan, np.float32)),
               _error(4, "RuntimeError: out of memory")]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None  # Flower's wrapper alone skips a round with an error reply
    w = arrays["w"].numpy()
    assert np.sqrt(np.sum(w.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-5)
    assert core.last_train_metrics is metrics and core.last_train_rejected == 1 and core.last_train_failures == 1
    assert s.num_sampled_clients == 2


def test_dp_weights_every_site_equally() -> None:
    """Under DP each clipped update enters the mean with weight 1/m (what the noise z C / m is calibrated for);
    without DP FedAvg weights by num-examples. The training metrics stay example-weighted in both."""
    a, b = np.full(SHAPE, 0.01, np.float32), np.full(SHAPE, 0.03, np.float32)  # norms < C: no clipping

    def run(knobs: dict) -> tuple[float, float]:
        s = make_strategy(FederationConfig.from_run_config({**knobs, "min-train-nodes": 1, "min-available-nodes": 1}))
        s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2]))
        arrays, metrics = s.aggregate_train(1, [_reply(1, a, n=1, loss=1.0), _reply(2, b, n=9, loss=0.0)])
        return float(arrays["w"].numpy()[0, 0]), float(metrics["train-loss"])

    assert run({}) == pytest.approx((0.028, 0.1))  # (1 x 0.01 + 9 x 0.03) / 10
    for mode in ("server-fixed", "client-fixed"):
        assert run({"dp": mode, "dp-noise-multiplier": 0.0, "dp-clipping-norm": 1.0}) == pytest.approx((0.02, 0.1))


def test_dp_server_side_noise_has_the_calibrated_spread() -> None:
    cfg = FederationConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 2.0,
                                            "dp-clipping-norm": 0.5, "min-train-nodes": 1,
                                            "min-available-nodes": 1})
    s = make_strategy(cfg)
    big = ArrayRecord({"w": Array(np.zeros((200, 200), np.float32)), "b": Array(np.zeros(3, np.float32))})
    s.configure_train(1, big, ConfigRecord(), _Nodes(lambda _: [1, 2]))
    np.random.seed(0)
    replies = [_reply(n, np.zeros((200, 200), np.float32)) for n in (1, 2)]
    w = s.aggregate_train(1, replies)[0]["w"].numpy()
    assert np.std(w) == pytest.approx(2.0 * 0.5 / 2, rel=0.02)  # z * C / m with m = 2 accepted replies


def test_dp_client_side_refuses_an_unclipped_update(flwr_log: list[str]) -> None:
    cfg = FederationConfig.from_run_config({"dp": "client-fixed", "dp-noise-multiplier": 0.0,
                                            "dp-clipping-norm": 1.0, "min-train-nodes": 1,
                                            "min-available-nodes": 1})
    s = make_strategy(cfg)
    config = ConfigRecord()
    msgs = list(s.configure_train(1, _global(), config, _Nodes(lambda _: [1, 2])))
    assert all("clipping_norm" in m.content["config"] for m in msgs)
    small = np.full(SHAPE, 0.1, np.float32)  # norm 0.447
    arrays, _ = s.aggregate_train(1, [_reply(1, small), _reply(2, np.full(SHAPE, 5.0, np.float32))])
    np.testing.assert_allclose(arrays["w"].numpy(), small)
    assert core_strategy(s).last_train_rejected == 1
    assert any("exceeds dp-clipping-norm" in x for x in flwr_log)
    assert set(core_strategy(s).pop_round_stats()["site_metrics"]) == {"1"}  # the refused site is not listed


# ----------------------------------------------------------------------------------------------------------------------
# Bounded node sampling
# ----------------------------------------------------------------------------------------------------------------------


def _sampler(**kw: float) -> STRPNetFedAvg:
    return STRPNetFedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=4, node_wait_timeout=0.2,
                         start_wait_timeout=0.2, poll_interval=0.01, **kw)


def test_sampling_goes_on_with_the_quorum_after_a_bounded_wait(flwr_log: list[str]) -> None:
    s = _sampler()
    assert sorted(s.sample_nodes_bounded(_Nodes(lambda _: [1, 2, 3, 4]), server_round=1, fraction=1.0,
                                         min_nodes=3, step="train")) == [1, 2, 3, 4]
    grid = _Nodes(lambda _: [1, 2, 4])
    assert sorted(s.sample_nodes_bounded(grid, server_round=2, fraction=1.0, min_nodes=3, step="train")) == [1, 2, 4]
    assert grid.calls > 2  # it waited (polled) before going on
    assert any("lost node 3" in x for x in flwr_log)
    assert any("3 of 4 site(s) connected after" in x for x in flwr_log)
    again = _Nodes(lambda _: [1, 2, 4])
    s.sample_nodes_bounded(again, server_round=3, fraction=1.0, min_nodes=3, step="train")
    assert again.calls == 1  # the same missing site is not waited for again
    back = _Nodes(lambda _: [1, 2, 3, 4])
    assert len(s.sample_nodes_bounded(back, server_round=4, fraction=1.0, min_nodes=3, step="train")) == 4
    assert any("node 3 is back" in x for x in flwr_log)


def test_sampling_takes_a_site_that_joins_while_waiting() -> None:
    s = _sampler()
    s.node_wait_timeout = s.start_wait_timeout = 30.0  # ends as soon as the 4th site is there
    grid = _Nodes(lambda call: [1, 2, 3] if call < 5 else [1, 2, 3, 9])
    assert sorted(s.sample_nodes_bounded(grid, server_round=1, fraction=1.0, min_nodes=3, step="train")) == [1, 2, 3, 9]
    assert grid.calls == 5


class _Sites(_Nodes):
    """Connected nodes that answer the sampling-key query as the ClientApp does for their site names; ``silent``
    ones answer with an error (e.g. a site of an older version)."""

    def __init__(self, names: dict[int, str], seed: int, silent: frozenset[int] = frozenset()) -> None:
        super().__init__(lambda _: list(names))
        self.names, self.seed, self.silent = names, seed, silent
        self.asked: list[int] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for m in messages:
            assert m.metadata.message_type == f"query.{SAMPLING_QUERY}"
            node = m.metadata.dst_node_id
            self.asked.append(node)
            if node in self.silent:
                out.append(Message(error=Error(code=0, reason="no handler"), reply_to=m))
            else:
                key = sampling_key(self.seed, self.names[node])
                out.append(Message(content=RecordDict({"metrics": MetricRecord({SAMPLING_KEY: key})}), reply_to=m))
        return out


def _draw(seed: int, rnd: int, nodes: list[int], k: int) -> list[int]:
    """What the strategy draws among ``nodes`` (in their order) at global round ``rnd`` of training."""
    return random.Random(derive_seed(seed, "sampling", rnd, "train")).sample(nodes, k)


def _two_samplings(grid: _Nodes, seed: int) -> list[list[int]]:
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1, node_wait_timeout=0.2, start_wait_timeout=0.2,
                      poll_interval=0.01, sampling_keys=True, seed=seed)
    out = []
    for r in (1, 2):
        random.random()  # Flower's retries and heartbeats draw from the global RNG: the sampling must not care
        out.append(s.sample_nodes_bounded(grid, server_round=r, fraction=0.5, min_nodes=1, step="train"))
    return out


def test_sampling_a_fraction_picks_the_same_sites_whatever_their_node_ids() -> None:
    """A simulation draws new node ids every session: the same seed samples the same sites (their keys), where
    sampling among sorted node ids would not."""
    sites = [f"site-{i:02d}" for i in range(1, 7)]
    sessions = ([11, 52, 33, 94, 75, 16], [908, 7, 640, 51, 2, 333])
    picked, by_node_id = [], []
    for ids in sessions:
        grid = _Sites(dict(zip(ids, sites)), seed=5)
        picked.append([sorted(grid.names[n] for n in r) for r in _two_samplings(grid, 5)])
        assert sorted(grid.asked) == sorted(ids)  # each node asked once, at the first sampling
        by_node_id.append(sorted(grid.names[n] for n in _draw(5, 1, sorted(ids), 3)))
    assert picked[0] == picked[1] and [len(r) for r in picked[0]] == [3, 3]
    assert by_node_id[0] != by_node_id[1]  # what sorted node ids gave for these two sessions


def test_a_site_without_a_sampling_key_is_ordered_last_and_asked_again(flwr_log: list[str]) -> None:
    grid = _Sites({4: "a", 9: "b", 2: "c", 7: "d"}, seed=1, silent=frozenset({2}))
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1, sampling_keys=True)
    order = s.site_order(grid, [2, 4, 7, 9])
    keyed = sorted((4, 7, 9), key=lambda n: sampling_key(1, grid.names[n]))
    assert order == [*keyed, 2]
    assert any("no sampling key from node(s) 2" in x for x in flwr_log)
    grid.silent = frozenset()  # it answers now
    assert s.site_order(grid, [2, 4, 7, 9]) == sorted((2, 4, 7, 9), key=lambda n: sampling_key(1, grid.names[n]))
    assert sorted(grid.asked) == [2, 2, 4, 7, 9]  # the keyed nodes are not asked again


def test_a_deployment_samples_among_node_ids_without_asking() -> None:
    """``sampling-keys`` off (the default; a deployment's node ids are stable, and a site could choose its key)."""
    s = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1, seed=3, round_offset=4)  # resumed after round 4
    picked = s.sample_nodes_bounded(_Nodes(lambda _: [5, 1, 3, 2]), server_round=1, fraction=0.5, min_nodes=1,
                                    step="train")  # _Nodes answers no message: a query would raise
    assert picked == _draw(3, 5, [1, 2, 3, 5], 2)  # global round 5: what an uninterrupted run draws


def test_below_quorum_stops_with_a_clear_error() -> None:
    s = _sampler()
    with pytest.raises(QuorumNotReached, match=r"round 3 \(evaluate\): 2 site\(s\) connected .* quorum min-evaluate-nodes = 3"):
        s.round_offset = 2
        s.configure_evaluate(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2]))


def test_dp_server_side_survives_a_zero_update() -> None:
    """Flower's own clipping divides by the update norm; a reply equal to the global model must not kill the round."""
    cfg = FederationConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 0.0,
                                            "dp-clipping-norm": 1.0, "min-train-nodes": 1, "min-available-nodes": 1})
    s = make_strategy(cfg)
    s.configure_train(1, _global(), ConfigRecord(), _Nodes(lambda _: [1, 2]))
    arrays, _ = s.aggregate_train(1, [_reply(1, np.zeros(SHAPE, np.float32)), _reply(2, np.zeros(SHAPE, np.float32))])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.zeros(SHAPE, np.float32))
