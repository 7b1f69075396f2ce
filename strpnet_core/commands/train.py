"""``strpnet train``: centralised training on one site's cache (single-site baseline) or several pooled.

Writes into RUN_DIR (atomically): ``final_model.pt`` (the ``strpnet-fed-model/1`` format of the federated server's
model, readable by ``strpnet predict``), ``model_config.json`` and ``metrics.json`` (one row per epoch: training
loss and, with ``--val-cache``, the validation C-index, Dice and loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_json

FINAL_MODEL = "final_model.pt"
MODEL_CONFIG_JSON = "model_config.json"
METRICS_JSON = "metrics.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand to ``strpnet``."""
    from ..model import ModelConfig
    from ..training import TrainConfig

    mdef, tdef = ModelConfig(), TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train ST-RPNet centrally on one or several (pooled) site caches",
        description="Train ST-RPNet on preprocessed caches: one folder = single-site baseline, several = pooled "
        "(centralised upper bound of the federation). Prints the loss per epoch and, with --val-cache, the "
        "validation C-index and Dice; saves RUN_DIR/final_model.pt.",
    )
    p.add_argument("--cache", nargs="+", required=True, metavar="DIR", help="training cache folder(s)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="output folder")
    p.add_argument("--val-cache", nargs="+", metavar="DIR", help="validation cache folder(s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs (default 20)")
    p.add_argument("--lr", type=float, default=tdef.lr, help=f"Adam learning rate (default {tdef.lr:g})")
    p.add_argument("--batch-size", type=int, default=tdef.batch_size, help="patients per step (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling (default 0)")
    p.add_argument("--model-widths", type=int, nargs="+", default=list(mdef.widths), metavar="C",
                   help=f"encoder channels per level (default {' '.join(map(str, mdef.widths))})")
    p.add_argument("--lstm-hidden", type=int, default=mdef.lstm_hidden,
                   help=f"ConvLSTM channels (default {mdef.lstm_hidden})")
    p.add_argument("--dropout", type=float, default=mdef.dropout,
                   help=f"dropout probability (default {mdef.dropout:g})")
    p.add_argument("--w-dice", type=float, default=tdef.w_dice,
                   help=f"weight of the Dice loss (default {tdef.w_dice:g})")
    p.add_argument("--w-bce", type=float, default=tdef.w_bce,
                   help=f"weight of the weighted BCE loss (default {tdef.w_bce:g})")
    p.add_argument("--w-cox", type=float, default=tdef.w_cox,
                   help=f"weight of the Cox loss (default {tdef.w_cox:g})")
    p.add_argument("--pos-weight", type=float, default=tdef.pos_weight,
                   help=f"BCE positive-class weight (default {tdef.pos_weight:g})")
    p.add_argument("--risk-memory", type=int, default=tdef.risk_memory,
                   help=f"Cox risk-set memory size (default {tdef.risk_memory})")
    p.add_argument("--max-timepoints", type=int, default=None, help="keep at most this many scans per patient (default: all)")
    p.add_argument("--device", default=tdef.device, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default=tdef.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on a CPU with native bf16 (else fp32), bf16/fp16 on CUDA (default auto)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing RUN_DIR/final_model.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``strpnet train``; returns the exit code (2 on a usage or data error)."""
    try:
        return train_command(args)
    except ValueError as exc:
        print(f"strpnet train: error: {exc}", file=sys.stderr)
        return 2


def train_command(args: argparse.Namespace) -> int:
    """Train, print one line per epoch, save the model and the history (see the module docstring)."""
    import torch

    from ..cache import cache_preset
    from ..dataset import PatientDataset
    from ..model import ModelConfig, STRPNet, count_parameters
    from ..training import TrainConfig, evaluate_model, save_trained_model, seed_everything, train_epochs

    out = Path(args.out)
    if (out / FINAL_MODEL).exists() and not args.force:
        raise ValueError(f"--out: {out / FINAL_MODEL} exists (use --force to overwrite)")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    caches = [Path(c).resolve() for c in [*args.cache, *(args.val_cache or [])]]
    presets = {c: cache_preset(c) for c in caches if c.is_dir()}
    if len(set(presets.values()) - {None}) > 1:
        raise ValueError("the caches were preprocessed with different presets ("
                         + ", ".join(f"{c}: {p}" for c, p in presets.items()) + "); train on one preset")
    model_cfg = ModelConfig(widths=tuple(args.model_widths), lstm_hidden=args.lstm_hidden, dropout=args.dropout)
    train_cfg = TrainConfig(
        lr=args.lr, local_epochs=args.epochs, batch_size=args.batch_size, w_dice=args.w_dice, w_bce=args.w_bce,
        w_cox=args.w_cox, pos_weight=args.pos_weight, risk_memory=args.risk_memory, seed=args.seed,
        device=args.device, precision=args.precision, num_threads=args.num_threads,
    )
    train_set = PatientDataset(args.cache, max_timepoints=args.max_timepoints, require_outcome=True)
    val_set = (PatientDataset(args.val_cache, max_timepoints=args.max_timepoints, require_outcome=True)
               if args.val_cache else None)
    seed_everything(args.seed)
    model = STRPNet(model_cfg)
    progress = not args.no_progress
    print(
        f"training ST-RPNet ({count_parameters(model):,} parameters) on {len(train_set)} patients from "
        f"{len(args.cache)} cache folder(s)" + (f", validating on {len(val_set)}" if val_set is not None else ""),
        flush=True,
    )
    header = f"{'epoch':>5}  {'loss':>9}  {'val C':>7}  {'val Dice':>8}  {'val loss':>9}  {'seconds':>7}"
    print(header, flush=True)
    history: list[dict[str, Any]] = []
    t_epoch = [time.perf_counter()]

    def on_epoch(epoch: int, loss: float) -> None:
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss}
        if val_set is not None:
            agg = evaluate_model(model, val_set, train_cfg)
            row.update(val_c_index=agg.c_index, val_dice=agg.dice, val_loss=agg.mean_loss, **{
                f"val_{k}": v for k, v in agg.to_metrics().items()})
        row["seconds"] = time.perf_counter() - t_epoch[0]
        t_epoch[0] = time.perf_counter()
        history.append(row)
        print(
            f"{row['epoch']:>5}  {loss:>9.4f}  {_f(row.get('val_c_index'), 7, 3)}  {_f(row.get('val_dice'), 8, 3)}  "
            f"{_f(row.get('val_loss'), 9, 4)}  {row['seconds']:>7.1f}",
            flush=True,
        )
        atomic_write_json(out / METRICS_JSON, [_clean(r) for r in history])

    train_epochs(model, train_set, train_cfg, seed=args.seed, progress=progress, on_epoch=on_epoch)
    model.to(torch.device("cpu"))
    # the preset (which `strpnet predict` preprocesses with) and absolute cache paths: readable from any folder
    info = {"epochs": args.epochs, "preset": next((p for p in presets.values() if p), None),
            "train_cache": [str(Path(c).resolve()) for c in args.cache],
            "val_cache": [str(Path(c).resolve()) for c in args.val_cache or []],
            "history": [_clean(r) for r in history]}
    path = save_trained_model(out / FINAL_MODEL, model, train_cfg, info=info)
    atomic_write_json(out / MODEL_CONFIG_JSON,
                      {"model_config": model_cfg.to_dict(), "train_config": dataclasses.asdict(train_cfg)})
    print(f"saved {path}")
    return 0


def _f(v: float | None, width: int, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    return f"{v:>{width}.{digits}f}"


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
