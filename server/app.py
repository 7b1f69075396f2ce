"""The Flower ServerApp: FedAvg over the sites, federated concordance, a checkpoint after every round, run outputs.

The strategy (``server/strategy.py``, from the run config): FedAvg, FedMedian, FedTrimmedAvg or Krum, optionally inside
Flower's DP wrappers; replies are checked before aggregation, node sampling waits a bounded time and goes on with a
quorum. When fewer sites than the quorum remain, the outputs of the completed rounds are written and the run fails
with a clear error (``resume=true`` continues it later).

Every knob is in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (``flwr run -c key=value`` overrides it); parsing is
``strpnet_core.federation.FederationConfig``. With ``resume=true`` the run continues from ``run-dir/checkpoint.npz``
(weights, completed rounds, metrics history, RNG states) and reaches the same final model as an uninterrupted run:
the sites see the global round number (``round-offset`` in the train/evaluate config) and FedAvg averages in a
content-defined order.
"""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from strpnet_core.federation import (
    FederationConfig,
    build_model,
    check_test_cache,
    evaluate_test_set,
)
from strpnet_core.risk_reference import RISK_REFERENCE_JSON, write_risk_reference_from_history

from .checkpoint import Checkpoint, capture_rng, load_checkpoint, restore_rng, save_checkpoint, seed_server_rngs
from .outputs import write_final_model, write_metrics, write_summary
from .strategy import QuorumNotReached, STRPNetStrategyMixin, core_strategy, make_strategy

app = ServerApp()

#: Metrics of the coordinator's test set kept per round (as ``test_<name>``) when ``test-cache`` is set.
TEST_METRICS = ("c-index", "comparable", "dice", "loss", "n_patients", "n_events")

#: Model-defining keys that must not change across a resume.
_FROZEN_ON_RESUME = ("model", "preset", "seed", "val_fraction")
#: Keys a resume may change (warned): the training, aggregation, privacy and sampling knobs. With another value the
#: resumed run no longer reaches the final model of an uninterrupted one.
_WARNED_ON_RESUME = ("train", "aggregation", "trim_beta", "krum_num_malicious", "dp", "dp_noise_multiplier",
                     "dp_clipping_norm", "fraction_train", "fraction_evaluate")


def resolve_run_dir(cfg: FederationConfig, run_id: int) -> Path:
    """The run directory: ``run-dir`` of the run config, else ``runs/run-<run id>`` (absolute)."""
    return (Path(cfg.run_dir).expanduser() if cfg.run_dir else Path("runs") / f"run-{run_id}").resolve()


def _weights(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}


def _round_row(server_round: int, strategy: STRPNetStrategyMixin, seconds: float, model_bytes: int) -> dict[str, Any]:
    row: dict[str, Any] = {"round": server_round, "round_seconds": seconds, "model_bytes": model_bytes}
    stats = strategy.pop_round_stats()
    if stats["train_metrics"] is not None:
        for k, v in stats["train_metrics"].items():
            row[k.replace("-", "_") if k.startswith("train-") else f"train_{k.replace('-', '_')}"] = v
    if stats["evaluate_metrics"] is not None:
        for k, v in stats["evaluate_metrics"].items():
            row[f"eval_{k.replace('-', '_')}" if k in ("loss", "sites", "num-examples") else k.replace("-", "_")] = v
    for key in ("train_failures", "eval_failures", "train_rejected", "eval_rejected", "sites_connected"):
        row[key] = stats[key]
    # per-site aggregate counts (node id -> what that site sent; `strpnet report`); metrics.json only, not the CSV
    if stats["site_metrics"]:
        row["per_site"] = [{"node": n, **v} for n, v in sorted(stats["site_metrics"].items())]
    return row


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated training described by the run config."""
    cfg = FederationConfig.from_run_config(context.run_config)
    run_dir = resolve_run_dir(cfg, context.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_cfg, train_cfg = cfg.model_config(), cfg.train_config()
    if cfg.test_cache:  # a bad test-cache stops the run here, not after the first round's training
        log(INFO, "[strpnet] coordinator test set %s: %d patients", cfg.test_cache, check_test_cache(cfg))

    ckpt = load_checkpoint(run_dir)
    if ckpt is not None and not cfg.resume:
        raise RuntimeError(
            f"{run_dir} already holds a checkpoint (round {ckpt.server_round}); run with resume=true to continue it "
            f"or give another run-dir"
        )
    if ckpt is not None:
        for key in _FROZEN_ON_RESUME:
            if ckpt.config.get(key) != cfg.to_dict().get(key):
                raise RuntimeError(
                    f"resume: {key} differs from the checkpoint's ({ckpt.config.get(key)!r} != "
                    f"{cfg.to_dict().get(key)!r}); a resumed run must keep the model and data settings"
                )
        for key in _WARNED_ON_RESUME:
            if key in ckpt.config and ckpt.config[key] != cfg.to_dict().get(key):
                log(WARNING, "[strpnet] resume: %s changed (%r -> %r): the final model will differ from that of an "
                    "uninterrupted run", key, ckpt.config[key], cfg.to_dict().get(key))
        restore_rng(ckpt.rng)
        done, history = ckpt.server_round, list(ckpt.history)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in ckpt.weights.items()})
        log(INFO, "[strpnet] resuming %s from round %d", run_dir, done)
    else:
        if cfg.resume:
            log(INFO, "[strpnet] resume=true but %s holds no checkpoint: starting a new run", run_dir)
        seed_server_rngs(cfg.seed, secret_numpy=cfg.dp != "off")  # DP noise: not from the seed every site knows
        model = build_model(cfg)
        arrays = ArrayRecord(model.state_dict())
        done, history = 0, []
        save_checkpoint(run_dir, Checkpoint(0, _weights(arrays), [], cfg.to_dict(), capture_rng()))

    total = cfg.num_server_rounds
    model_bytes = arrays.count_bytes()
    log(INFO, "[strpnet] run dir %s; rounds %d..%d; model %.2f MB", run_dir, done + 1, total, model_bytes / 1e6)
    strategy = make_strategy(cfg, round_offset=done)
    core = core_strategy(strategy)
    log(INFO, "[strpnet] aggregation %s, dp %s, quorum %d train / %d evaluate site(s) of %d, node-wait-timeout %.0f s",
        cfg.aggregation, cfg.dp, cfg.min_train_nodes, cfg.min_evaluate_nodes, cfg.min_available_nodes,
        cfg.node_wait_timeout)
    state: dict[str, Any] = {"arrays": arrays, "t": time.monotonic(), "start": time.monotonic()}

    def after_round(local_round: int, current: ArrayRecord) -> MetricRecord | None:
        """FedAvg's evaluate_fn: called before round 1 and after each round; checkpoints the global state."""
        now = time.monotonic()
        if local_round == 0:
            state["t"] = now
            return None
        server_round = done + local_round
        row = _round_row(server_round, core, now - state["t"], model_bytes)
        if cfg.test_cache:  # server-side evaluation on the coordinator's own held-out patients
            try:
                test = evaluate_test_set(current.to_torch_state_dict(), cfg)
            except Exception as exc:  # noqa: BLE001 - the round's checkpoint and metrics must still be written
                log(ERROR, "[strpnet] round %d/%d: coordinator test set %s failed: %s: %s; its metrics are NaN this "
                    "round", server_round, total, cfg.test_cache, type(exc).__name__, exc)
                test = dict.fromkeys(TEST_METRICS, float("nan"))
            row.update({f"test_{k.replace('-', '_')}": test[k] for k in TEST_METRICS})
            log(INFO, "[strpnet] round %d/%d: coordinator test set: C-index %s (%s comparable pairs of %s patients), "
                "Dice %s", server_round, total, _fmt(row["test_c_index"]), _fmt(row["test_comparable"], ".0f"),
                _fmt(row["test_n_patients"], ".0f"), _fmt(row["test_dice"]))
        state["t"], state["arrays"] = now, current
        history.append(row)
        save_checkpoint(run_dir, Checkpoint(server_round, _weights(current), history, cfg.to_dict(), capture_rng()))
        write_metrics(run_dir, history)
        log(
            INFO,
            "[strpnet] round %d/%d: federated C-index %s (%s comparable pairs), Dice %s, eval loss %s, "
            "train loss %s, %s s",
            server_round, total, _fmt(row.get("c_index")), _fmt(row.get("comparable"), ".0f"),
            _fmt(row.get("dice")), _fmt(row.get("eval_loss"), ".4f"), _fmt(row.get("train_loss"), ".4f"),
            _fmt(row["round_seconds"], ".1f"),
        )
        if row["train_failures"] or row["eval_failures"] or row["train_rejected"] or row["eval_rejected"]:
            log(WARNING, "[strpnet] round %d: %d train and %d evaluate site(s) failed or were lost; %d train and %d "
                "evaluate replies rejected", server_round, row["train_failures"], row["eval_failures"],
                row["train_rejected"], row["eval_rejected"])
        return None

    remaining = total - done
    stopped: str | None = None
    if remaining > 0:
        offset = ConfigRecord({"round-offset": done})
        try:
            strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=remaining,
                timeout=cfg.round_timeout,
                train_config=offset,
                evaluate_config=ConfigRecord({"round-offset": done}),
                evaluate_fn=after_round,
            )
        except QuorumNotReached as exc:
            stopped = str(exc)
            log(ERROR, "[strpnet] %s; writing the outputs of the %d completed round(s) (resume=true continues)",
                stopped, history[-1]["round"] if history else done)
    else:
        log(INFO, "[strpnet] the checkpoint already has %d of %d rounds: writing the outputs only", done, total)

    final: ArrayRecord = state["arrays"]
    model_path = write_final_model(run_dir, final.to_torch_state_dict(), model_cfg.to_dict(), train_cfg.to_dict(),
                                   server_round=max(done, history[-1]["round"] if history else 0))
    ref_path, why = write_risk_reference_from_history(run_dir, history)  # risk quantiles for `strpnet predict`
    if ref_path is None:
        log(WARNING, "[strpnet] no %s: %s; predictions of this model report no risk percentile",
            RISK_REFERENCE_JSON, why)
    write_metrics(run_dir, history)
    last = history[-1] if history else {}
    scored = [r for r in history if isinstance(r.get("c_index"), float) and r["c_index"] == r["c_index"]]
    best = max(scored, key=lambda r: r["c_index"]) if scored else None
    write_summary(run_dir, {
        "run_id": context.run_id,
        "run_dir": str(run_dir),
        "rounds_completed": last.get("round", done),
        "num_server_rounds": total,
        "resumed_from_round": done if ckpt is not None else None,
        "final": {**{k: last.get(k) for k in ("c_index", "dice", "eval_loss", "train_loss", "comparable",
                                               "n_patients", "n_events")},
                  **{k: v for k, v in last.items() if k.startswith("test_")}},
        "best_round_by_c_index": best["round"] if best else None,
        "best_c_index": best["c_index"] if best else None,
        "model_path": str(model_path),
        "model_bytes": model_bytes,
        "wall_seconds_this_session": time.monotonic() - state["start"],
        "config": cfg.to_dict(),
        "stopped": stopped,
        "privacy": "sites sent only weights and aggregate counts (pair counts, Dice sums, loss sums, numbers of "
                   "patients/events, training means)",
    })
    if stopped is not None:
        raise RuntimeError(f"the run stopped early: {stopped}; outputs of the completed rounds in {run_dir}")
    log(INFO, "[strpnet] done: outputs in %s", run_dir)
