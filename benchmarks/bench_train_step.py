"""Training-step time and peak memory of ST-RPNet against a MONAI reference network, fp32 and bf16.

Each configuration (network x precision) runs in a FRESH subprocess, so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: tracemalloc does not see torch's allocations) is its own; on CUDA the
peak of ``torch.cuda.max_memory_allocated`` is reported instead. A timed step is: forward under autocast, loss,
backward, Adam step (``zero_grad`` runs before the timer); one warm-up step is not timed.

Networks (same input batch of B patients x T timepoints, 4 channels, size^3):

- ``strpnet``: the default ``STRPNet`` (shared encoder over the B*T volumes, ConvLSTM, decoder once per patient,
  multi-task loss with a Cox term).
- ``dynunet``: MONAI ``DynUNet`` with the same residual blocks and widths run on all B*T volumes (a per-timepoint
  U-Net, Dice + BCE loss): the reference of similar parameters and FLOPs. The ratio shows the temporal module's
  overhead net of the decoder it saves.

Usage::

    .venv/bin/python benchmarks/bench_train_step.py                       # 96^3, T=3, batch 1, fp32 + bf16
    .venv/bin/python benchmarks/bench_train_step.py --size 32 --repeats 2 # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

NETWORKS = ("strpnet", "dynunet")
PRECISIONS = ("fp32", "bf16")


def _batch(b: int, t: int, size: int, device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    spatial = (size, size, size)
    rec = (torch.rand(b, 1, *spatial, generator=g) > 0.95).float()
    return {
        "images": torch.randn(b, t, 4, *spatial, generator=g).to(device),
        "days": (torch.arange(t, dtype=torch.float32) * 90.0).expand(b, t).contiguous().to(device),
        "time_mask": torch.ones(b, t, dtype=torch.bool, device=device),
        "recurrence": rec.to(device),
        "has_label": torch.ones(b, dtype=torch.bool, device=device),
        "brain_mask": torch.ones(b, 1, *spatial, device=device),
        "event": torch.ones(b, device=device),
        "time": torch.linspace(100, 400, b).to(device),
        "patient_id": [f"p{i}" for i in range(b)],
    }


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.repeats`` training steps of one (network, precision); return a result row."""
    import torch
    from monai.networks.nets import DynUNet

    from strpnet_core.losses import MultiTaskLoss, dice_loss, weighted_bce
    from strpnet_core.model import ModelConfig, STRPNet, count_parameters
    from strpnet_core.training import deterministic_cuda, select_autocast, select_device

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = select_device(args.device)
    enabled, dtype = select_autocast(device, args.precision)
    cfg = ModelConfig()
    b, t = args.batch, args.timepoints
    batch = _batch(b, t, args.size, device)
    if args.network == "strpnet":
        model = STRPNet(cfg).to(device)
        loss_fn = MultiTaskLoss(memory_size=64).to(device)

        def step() -> float:
            with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                out = model(batch["images"], batch["days"], batch["time_mask"])
            loss = loss_fn(out.recurrence_logits.float(), out.risk.float(), batch).total
            loss.backward()
            return float(loss)
    else:
        w = cfg.widths
        model = DynUNet(3, 4, 1, kernel_size=[3] * len(w), strides=[1] + [2] * (len(w) - 1),
                        upsample_kernel_size=[2] * (len(w) - 1), filters=list(w),
                        norm_name=("instance", {"affine": True}), res_block=True).to(device)
        flat = batch["images"].reshape(b * t, 4, *batch["images"].shape[3:])
        target = batch["recurrence"].repeat_interleave(t, dim=0)

        def step() -> float:
            with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                logits = model(flat)
            logits = logits.float()
            loss = dice_loss(logits, target) + weighted_bce(logits, target, pos_weight=10.0)
            loss.backward()
            return float(loss)

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with deterministic_cuda(device) if args.deterministic else contextlib.nullcontext():
        for i in range(args.repeats + 1):
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:  # the first step is a warm-up
                times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    row = {
        "network": args.network, "precision": args.precision, "device": str(device), "threads": args.threads,
        "size": args.size, "timepoints": t, "batch": b, "params": count_parameters(model),
        "step_median_s": statistics.median(times), "step_min_s": min(times), "repeats": len(times),
        "peak_rss_mb": peak_mb, "rss_before_steps_mb": rss_before / 1024.0, "deterministic": args.deterministic,
    }
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _run_child(args: argparse.Namespace, network: str, precision: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--network", network, "--precision", precision,
           "--size", str(args.size), "--timepoints", str(args.timepoints), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
           *(["--deterministic"] if args.deterministic else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"network": network, "precision": precision, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the results with ratios (ST-RPNet / DynUNet at equal precision; bf16 / fp32 per network)."""
    ok = {(r["network"], r["precision"]): r for r in rows if "error" not in r}
    head = (f"{'network':<9} {'prec':<5} {'params':>9} {'step s':>8} {'min s':>8} {'peak MB':>9} "
            f"{'step MB':>8} {'vs dynunet':>10} {'vs fp32':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['network']:<9} {r['precision']:<5} FAILED: {r['error']}")
            continue
        ref = ok.get(("dynunet", r["precision"]))
        fp = ok.get((r["network"], "fp32"))
        mem = r.get("peak_cuda_mb", r["peak_rss_mb"])
        delta = "-" if "peak_cuda_mb" in r else f"{r['peak_rss_mb'] - r['rss_before_steps_mb']:.0f}"
        vs_ref = f"{r['step_median_s'] / ref['step_median_s']:.2f}x" if ref else "-"
        vs_fp = f"{r['step_median_s'] / fp['step_median_s']:.2f}x" if fp else "-"
        print(f"{r['network']:<9} {r['precision']:<5} {r['params']:>9,} {r['step_median_s']:>8.3f} "
              f"{r['step_min_s']:>8.3f} {mem:>9.0f} {delta:>8} {vs_ref:>10} {vs_fp:>8}")
    if ok:
        any_row = next(iter(ok.values()))
        kind = "CUDA max_memory_allocated" if "peak_cuda_mb" in any_row else "process peak RSS (ru_maxrss)"
        print(f"\nsize {any_row['size']}^3, T={any_row['timepoints']}, batch {any_row['batch']}, device "
              f"{any_row['device']}{' (deterministic kernels)' if any_row.get('deterministic') else ''}, "
              f"{any_row['threads']} thread(s), median of {any_row['repeats']} step(s); "
              f"peak MB = {kind}; step MB = peak RSS minus the RSS after imports, model and batch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96, help="cubic volume size (multiple of 8; default 96)")
    p.add_argument("--timepoints", type=int, default=3, help="timepoints per patient (default 3)")
    p.add_argument("--batch", type=int, default=1, help="patients per step (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--deterministic", action="store_true",
                   help="CUDA: time the steps under training.deterministic_cuda (what training uses) instead of "
                   "cuDNN's default kernel choice")
    p.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated subset of strpnet,dynunet")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16")
    p.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--network", choices=NETWORKS, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size % 8 or args.size < 16:
        p.error("--size must be a multiple of 8, >= 16")
    if args.repeats < 1 or args.timepoints < 1 or args.batch < 1 or args.threads < 1:
        p.error("--repeats, --timepoints, --batch and --threads must be >= 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for network in [n for n in args.networks.split(",") if n]:
        for precision in [q for q in args.precisions.split(",") if q]:
            if network not in NETWORKS or precision not in PRECISIONS:
                p.error(f"unknown network/precision {network}/{precision}")
            rows.append(_run_child(args, network, precision))
            print(f"done {network} {precision}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
