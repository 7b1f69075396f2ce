"""Training and evaluation of ST-RPNet on one site's (or a pooled) dataset.

- :class:`TrainConfig`: every training knob (configuration as data; the Flower run config overrides it).
- :func:`select_device`, :func:`select_autocast` (:func:`cpu_has_native_bf16`), :func:`seed_everything`: where and in
  which precision to run.
- :func:`train_step`, :func:`train_epochs`: Adam on the multi-task loss (``losses.MultiTaskLoss``), deterministic
  given a seed.
- :func:`evaluate_model` -> :class:`EvalAggregates`: only aggregates (pair counts, Dice sums, loss sum, counts of
  patients and events): what a site may send.
- :func:`predict_batch`: probability maps and risks for inference.
- :func:`save_trained_model`, :func:`load_trained_model`: the model file (``strpnet-fed-model/1``, the format of the
  server's ``final_model.pt``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .dataset import collate_patients
from .fsutil import atomic_path
from .losses import MultiTaskLoss, dice_loss, weighted_bce
from .metrics import ConcordanceCounts, concordance_counts, dice_counts, dice_from_counts
from .model import ModelConfig, STRPNet

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EvalAggregates",
    "EVAL_METRIC_KEYS",
    "MODEL_FILE_FORMAT",
    "select_device",
    "select_autocast",
    "seed_everything",
    "build_loss",
    "batch_to_device",
    "train_step",
    "train_epochs",
    "evaluate_model",
    "predict_batch",
    "save_trained_model",
    "load_trained_model",
]

#: Keys of :meth:`EvalAggregates.to_metrics`, in this order (what a site sends after evaluation).
EVAL_METRIC_KEYS: tuple[str, ...] = (
    "concordant", "discordant", "tied_risk", "comparable",
    "dice_intersection", "dice_denominator", "loss_sum", "n_patients", "n_events", "n_labelled",
)
#: Format tag of a model file (shared with the server's ``final_model.pt``).
MODEL_FILE_FORMAT = "strpnet-fed-model/1"

_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_TIES = ("efron", "breslow")

Autocast = tuple[bool, torch.dtype]


# ----------------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Training configuration (configuration as data: run config, checkpoints).

    Attributes
    ----------
    lr:
        Adam learning rate (> 0).
    local_epochs:
        Passes over the dataset per :func:`train_epochs` call (a federated round's local work).
    batch_size:
        Patients per step (1 is as fast per patient as 2 on CPU for 3D volumes).
    w_dice, w_bce, w_cox:
        Weights of the loss terms ``w_dice Dice + w_bce BCE_w + w_cox Cox`` (>= 0, not all 0).
    pos_weight:
        Positive-class weight of the BCE (recurrence voxels are rare).
    risk_memory:
        Size of the per-site risk-set memory of the Cox loss (0: batch-only Cox loss).
    ties:
        Cox ties, "efron" or "breslow".
    seed:
        Default seed of :func:`train_epochs` (shuffling, dropout).
    device:
        "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    precision:
        "auto" (bf16 autocast on a CPU with native bf16, else fp32; bf16 or fp16 AMP on CUDA), "fp32", "bf16" or
        "fp16" (CUDA only).
    grad_clip:
        Maximum global gradient norm (0 disables clipping).
    weight_decay:
        Adam's L2 weight decay.
    num_threads:
        torch intra-op threads during training/evaluation (None or 0: leave torch's setting).
    """

    lr: float = 1e-3
    local_epochs: int = 1
    batch_size: int = 1
    w_dice: float = 1.0
    w_bce: float = 1.0
    w_cox: float = 1.0
    pos_weight: float = 10.0
    risk_memory: int = 64
    ties: str = "efron"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "w_dice", "w_bce", "w_cox", "pos_weight", "grad_clip", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.pos_weight <= 0:
            raise ValueError(f"TrainConfig.pos_weight must be > 0, got {self.pos_weight}")
        for name in ("w_dice", "w_bce", "w_cox", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.w_dice + self.w_bce + self.w_cox == 0:
            raise ValueError("TrainConfig: w_dice, w_bce and w_cox are all 0")
        for name, low in (("local_epochs", 1), ("batch_size", 1), ("risk_memory", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        if self.num_threads is not None:
            v = self.num_threads
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.num_threads must be None or an integer >= 0, got {v!r}")
            if v == 0:
                object.__setattr__(self, "num_threads", None)
        if self.ties not in _TIES:
            raise ValueError(f"TrainConfig.ties must be one of {_TIES}, got {self.ties!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.device, str) or not (self.device in _DEVICES or self.device.startswith("cuda:")):
            raise ValueError(f"TrainConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises
        ------
        ValueError
            An unknown key (named) or an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"TrainConfig.from_dict: d must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(d))


@dataclass
class TrainResult:
    """Outcome of :func:`train_epochs`.

    Attributes
    ----------
    num_examples:
        Patients in the dataset (FedAvg's weight).
    loss:
        Mean total loss per patient over all steps of all epochs.
    parts:
        Means per patient of the loss terms ``dice``, ``bce``, ``cox``.
    epoch_losses:
        Mean total loss per patient of each epoch.
    device:
        The torch device the steps ran on (``"cpu"``, ``"cuda:0"``, ...).
    """

    num_examples: int
    loss: float
    parts: dict[str, float] = field(default_factory=dict)
    epoch_losses: list[float] = field(default_factory=list)
    device: str = "cpu"


@dataclass(frozen=True)
class EvalAggregates:
    """Evaluation aggregates of a set of patients: sums and counts only, no per-patient value.

    Attributes
    ----------
    concordant, discordant, tied_risk, comparable:
        Harrell's pair counts over the comparable pairs of the evaluated set (``metrics.concordance_counts``).
    dice_intersection, dice_denominator:
        ``sum_i |P_i n G_i|`` and ``sum_i (|P_i| + |G_i|)`` over patients with a known recurrence mask ``G_i``,
        ``P_i = {v : sigmoid(logit_i(v)) > 0.5} n brain_i``.
    loss_sum:
        ``sum_i w_dice Dice_i + w_bce BCE_i`` over labelled patients (per-patient segmentation loss; the Cox term is a
        property of a whole risk set, not of a patient, and is assessed through the concordance counts).
    n_patients, n_events, n_labelled:
        Evaluated patients, those with an observed recurrence, and those with a recurrence mask (the patients
        ``loss_sum`` and the Dice sums run over).

    Sums of aggregates (``+``) pool sets: Dice sums, loss and counts are exactly those of the union; concordance
    counts are those of the within-set pairs (the federated C-index: pairs across sites are never formed).
    """

    concordant: int = 0
    discordant: int = 0
    tied_risk: int = 0
    comparable: int = 0
    dice_intersection: int = 0
    dice_denominator: int = 0
    loss_sum: float = 0.0
    n_patients: int = 0
    n_events: int = 0
    n_labelled: int = 0

    def __add__(self, other: EvalAggregates) -> EvalAggregates:
        if not isinstance(other, EvalAggregates):
            return NotImplemented
        return EvalAggregates(**{k: getattr(self, k) + getattr(other, k) for k in EVAL_METRIC_KEYS})

    @property
    def concordance(self) -> ConcordanceCounts:
        """The pair counts as :class:`metrics.ConcordanceCounts`."""
        return ConcordanceCounts(self.concordant, self.discordant, self.tied_risk, self.comparable)

    @property
    def c_index(self) -> float:
        """Harrell's C, ``(concordant + tied_risk / 2) / comparable`` (nan without comparable pair)."""
        return self.concordance.c_index

    @property
    def dice(self) -> float:
        """Pooled Dice ``2 sum I / sum D`` (1.0 when every mask is empty)."""
        return dice_from_counts(self.dice_intersection, self.dice_denominator)

    @property
    def mean_loss(self) -> float:
        """``loss_sum / n_labelled``: the mean segmentation loss of the labelled patients (nan without one)."""
        return self.loss_sum / self.n_labelled if self.n_labelled else math.nan

    def to_metrics(self) -> dict[str, int | float]:
        """The fixed-key mapping a site sends (:data:`EVAL_METRIC_KEYS`; ints, ``loss_sum`` float)."""
        return {k: (float(getattr(self, k)) if k == "loss_sum" else int(getattr(self, k))) for k in EVAL_METRIC_KEYS}

    @classmethod
    def from_metrics(cls, d: Mapping[str, Any]) -> EvalAggregates:
        """Inverse of :meth:`to_metrics` (extra keys such as ``num-examples`` are ignored).

        Raises
        ------
        ValueError
            A missing key or a negative / non-integral count.
        """
        values: dict[str, Any] = {}
        for k in EVAL_METRIC_KEYS:
            if k not in d:
                raise ValueError(f"EvalAggregates.from_metrics: missing key {k!r}")
            v = float(d[k])
            if not math.isfinite(v) or (k != "loss_sum" and (v < 0 or v != int(v))):
                raise ValueError(f"EvalAggregates.from_metrics: invalid {k} = {d[k]!r}")
            values[k] = v if k == "loss_sum" else int(v)
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------------
# device, precision, seeds
# ----------------------------------------------------------------------------------------------------------------------
def select_device(spec: str = "auto") -> torch.device:
    """The torch device of ``spec``: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".

    Raises
    ------
    ValueError
        Unknown ``spec``, or CUDA requested but unavailable (or N out of range).
    """
    if not isinstance(spec, str):
        raise ValueError(f"select_device: spec must be a string, got {type(spec).__name__}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"select_device: spec {spec!r} asks for CUDA, which is not available here")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"select_device: spec {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise ValueError(f"select_device: spec must be auto, cpu, cuda or cuda:N, got {spec!r}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: x86 with AVX512-BF16 or AMX (torch's own CPU probes).

    Only there is a bf16-autocast training step faster than fp32 (about 1.9x at 96^3 on a CPU with it). Without it
    oneDNN emulates bf16 and the step is several times SLOWER (4.5x for the tiny ci model at 48^3 on a 2-core AVX2
    AMD EPYC, docs/performance.md), so ``precision = "auto"`` keeps fp32 there. Other architectures: False
    (``precision = "bf16"`` still forces it).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def select_autocast(device: torch.device, precision: str = "auto") -> Autocast:
    """Whether to autocast, and to which dtype, for ``precision`` on ``device``.

    ============  ===========================================  =========================================
    precision     CPU                                          CUDA
    ============  ===========================================  =========================================
    auto          (True, bfloat16) if :func:`cpu_has_native_  (True, bfloat16) if supported else fp16
                  bf16` else (False, float32)
    fp32          (False, float32)                             (False, float32)
    bf16          (True, bfloat16)                             (True, bfloat16), error if unsupported
    fp16          error                                        (True, float16) (+ GradScaler in training)
    ============  ===========================================  =========================================

    bf16 autocast halves a 3D CNN training step on CPUs with native bf16 and slows it several-fold on the others
    (docs/performance.md); other device types run fp32 under "auto".

    Raises
    ------
    ValueError
        Unknown ``precision``, or a precision the device cannot run.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"select_autocast: precision must be one of {_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return False, torch.float32
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("select_autocast: precision 'fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
        if precision == "auto" and not cpu_has_native_bf16():
            return False, torch.float32
        return True, torch.bfloat16
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16_ok:
            raise ValueError("select_autocast: precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'")
        if precision == "fp16" or (precision == "auto" and not bf16_ok):
            return True, torch.float16
        return True, torch.bfloat16
    if precision == "auto":
        return False, torch.float32
    raise ValueError(f"select_autocast: precision {precision!r} is not supported on device type {device.type!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG and torch (CPU and every CUDA device).

    Raises
    ------
    ValueError
        ``seed`` not an integer in ``[0, 2**32)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed_everything: seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic_cuda(device: torch.device) -> Iterator[None]:
    """On a CUDA ``device``: deterministic kernels for the duration (restored afterwards); a no-op elsewhere.

    cuDNN picks its convolution algorithms by benchmarking and some backward kernels accumulate with atomics, so two
    CUDA runs with one seed can end a few ulps apart. Inside this context cuDNN uses deterministic algorithms (no
    benchmarking) and ``torch.use_deterministic_algorithms`` switches ops such as ``index_add_`` (the Cox loss's
    tied-time sums) to their deterministic kernels (warn-only: an op without one warns instead of failing).
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set when unset (cuBLAS reads it when a process first uses it).
    """
    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


def build_loss(cfg: TrainConfig) -> MultiTaskLoss:
    """The :class:`losses.MultiTaskLoss` of ``cfg`` (fresh risk-set memory)."""
    return MultiTaskLoss(cfg.w_dice, cfg.w_bce, cfg.w_cox, pos_weight=cfg.pos_weight, ties=cfg.ties,
                         memory_size=cfg.risk_memory)


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Copy of ``batch`` with every tensor on ``device`` (other values unchanged)."""
    nb = torch.device(device).type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _loader(dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0,
                      collate_fn=collate_patients)


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------
def train_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: MultiTaskLoss,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    autocast: Autocast,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
) -> dict[str, float]:
    """One optimisation step on ``batch``: forward under autocast, loss, backward, clip, step.

    Parameters
    ----------
    model, loss_fn, optimizer:
        The network (already on ``device``), the multi-task loss (train mode updates its risk-set memory) and the
        optimiser of ``model``'s parameters.
    batch:
        A :func:`dataset.collate_patients` batch.
    device:
        Where the model is.
    autocast:
        ``(enabled, dtype)`` from :func:`select_autocast`.
    scaler:
        A GradScaler for fp16 (None otherwise).
    grad_clip:
        Maximum global gradient norm (0: no clipping).

    Returns
    -------
    dict
        The loss parts (``dice``, ``bce``, ``cox``, ``total``, ``n_labelled``, ``n_events``) and ``grad_norm``
        (before clipping; nan when not computed).

    Raises
    ------
    FloatingPointError
        Non-finite model outputs, loss or (without a GradScaler, which skips such steps itself) gradient: the step is
        not applied, and the risk-set memory is left as it was before the step.
    """
    enabled, dtype = autocast
    model.train()
    loss_fn.train()
    b = batch_to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled):
        out = model(b["images"], b["days"], b["time_mask"])
    if not (torch.isfinite(out.risk).all() and torch.isfinite(out.recurrence_logits).all()):
        # before the loss: the Cox loss would call non-finite risks bad input, and its risk-set memory keep them
        raise FloatingPointError("train_step: the model's outputs are not finite (diverged weights, or an overflow "
                                 "under autocast); step not applied")
    memory = loss_fn.memory.snapshot()  # a rejected step must not leave this batch's risks in the risk-set memory
    loss = loss_fn(out.recurrence_logits.float(), out.risk.float(), b)
    if not torch.isfinite(loss.total):
        loss_fn.memory.restore(memory)
        raise FloatingPointError(f"train_step: non-finite loss {loss.parts}; step not applied")
    grad_norm = math.nan
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss.total).backward()
        scaler.unscale_(optimizer)
        if grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.total.backward()
        # the total norm (inf: no clipping) also finds a non-finite gradient under a finite loss
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf))
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            loss_fn.memory.restore(memory)
            raise FloatingPointError(f"train_step: non-finite gradient (norm {grad_norm}); step not applied")
        optimizer.step()
    return {**loss.parts, "grad_norm": grad_norm}


def train_epochs(
    model: nn.Module,
    dataset: Dataset[Any],
    cfg: TrainConfig,
    *,
    seed: int | None = None,
    progress: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.local_epochs`` epochs of Adam on ``dataset``; the model is left on the device.

    Deterministic given ``seed``: the epoch order is ``torch.randperm`` of a ``torch.Generator(seed)``, dropout
    draws from torch's global RNG seeded with ``seed`` inside a forked RNG state (the caller's RNG is untouched),
    and the risk-set memory and Adam state start empty. Same model weights + dataset + cfg + seed -> identical
    weights (on CPU; on CUDA with :func:`deterministic_cuda`, which training uses).

    The reported loss is per patient: ``sum_steps total_step * B_step / sum_steps B_step``.

    Parameters
    ----------
    model:
        The network (moved to the selected device).
    dataset:
        Items as :class:`dataset.PatientDataset` (a ``Subset`` is fine).
    cfg:
        Training configuration.
    seed:
        Seed of this call (default ``cfg.seed``).
    progress:
        Show a tqdm progress bar per epoch.
    on_epoch:
        Called with ``(epoch index, mean loss of the epoch)`` after each epoch.

    Raises
    ------
    ValueError
        Empty dataset, bad ``seed``.
    FloatingPointError
        The loss became non-finite.
    """
    seed = cfg.seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"train_epochs: seed must be a non-negative integer, got {seed!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("train_epochs: dataset is empty")
    device = select_device(cfg.device)
    autocast = select_autocast(device, cfg.precision)
    model.to(device)
    loss_fn = build_loss(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and autocast == (True, torch.float16))
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    totals = {"total": 0.0, "dice": 0.0, "bce": 0.0, "cox": 0.0}
    seen = 0
    epoch_losses: list[float] = []
    with _threads(cfg.num_threads), torch.random.fork_rng(devices=fork_devices), deterministic_cuda(device):
        torch.manual_seed(seed)
        loader = _loader(dataset, cfg.batch_size, shuffle=True, seed=seed)
        for epoch in range(cfg.local_epochs):
            ep_sum, ep_n = 0.0, 0
            batches = _progress(loader, progress, f"epoch {epoch + 1}/{cfg.local_epochs}")
            for batch in batches:
                parts = train_step(model, batch, loss_fn, optimizer, device=device, autocast=autocast,
                                   scaler=scaler, grad_clip=cfg.grad_clip)
                bsz = len(batch["patient_id"])
                for k in totals:
                    totals[k] += parts[k] * bsz
                ep_sum += parts["total"] * bsz
                ep_n += bsz
                if progress:
                    batches.set_postfix(loss=f"{ep_sum / ep_n:.4f}")  # type: ignore[attr-defined]
            seen += ep_n
            epoch_losses.append(ep_sum / ep_n)
            if on_epoch is not None:
                on_epoch(epoch, epoch_losses[-1])
    return TrainResult(
        num_examples=n,
        loss=totals["total"] / seen,
        parts={k: totals[k] / seen for k in ("dice", "bce", "cox")},
        epoch_losses=epoch_losses,
        device=str(device),
    )


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)


# ----------------------------------------------------------------------------------------------------------------------
# evaluation and inference
# ----------------------------------------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _forward_eval(model: nn.Module, batch: Mapping[str, Any], device: torch.device, autocast: Autocast
                  ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    model.eval()
    b = batch_to_device(batch, device)
    enabled, dtype = autocast
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled):
        out = model(b["images"], b["days"], b["time_mask"])
    return out.recurrence_logits.float(), out.risk.float(), b


def evaluate_model(
    model: nn.Module, dataset: Dataset[Any], cfg: TrainConfig, *, progress: bool = False,
    risks_out: list[float] | None = None,
) -> EvalAggregates:
    """Evaluate ``model`` on ``dataset``; return aggregates only (see :class:`EvalAggregates`).

    Runs in eval mode (no dropout) with ``cfg``'s device, precision and batch size; the result does not depend on
    the batch size (per-sample normalisation, padding-invariant model, per-patient loss). Risks are collected on
    the site only to count concordant pairs at the end (``metrics.concordance_counts``, O(n log n)).
    ``risks_out``, when given, is extended with the per-patient risks in dataset order: for the coordinator's own
    test patients (``strpnet report``), never for a site's reply.

    Raises
    ------
    ValueError
        From the model or the metrics on malformed data.
    """
    device = select_device(cfg.device)
    autocast = select_autocast(device, cfg.precision)
    model.to(device)
    risks: list[np.ndarray] = []
    times: list[np.ndarray] = []
    events: list[np.ndarray] = []
    inter = denom = labelled = 0
    loss_sum = 0.0
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return EvalAggregates()
    with _threads(cfg.num_threads):
        for batch in _progress(_loader(dataset, cfg.batch_size, shuffle=False), progress, "evaluate"):
            logits, risk, b = _forward_eval(model, batch, device, autocast)
            target = b["recurrence"].float()
            pred = (logits > 0) & (b["brain_mask"] > 0.5)  # sigmoid(logit) > 0.5 inside the brain
            for i in torch.nonzero(b["has_label"]).flatten().tolist():
                li, ti = logits[i: i + 1], target[i: i + 1]
                loss_sum += cfg.w_dice * float(dice_loss(li, ti)) + cfg.w_bce * float(
                    weighted_bce(li, ti, pos_weight=cfg.pos_weight))
                a, d = dice_counts(pred[i].cpu().numpy(), (ti[0] > 0.5).cpu().numpy())
                inter += a
                denom += d
                labelled += 1
            risks.append(risk.cpu().double().numpy())
            times.append(b["time"].cpu().double().numpy())
            events.append(b["event"].cpu().double().numpy())
    r, t, e = (np.concatenate(x) for x in (risks, times, events))
    if risks_out is not None:
        risks_out.extend(r.tolist())
    cc = concordance_counts(r, t, e)
    return EvalAggregates(
        concordant=cc.concordant, discordant=cc.discordant, tied_risk=cc.tied_risk, comparable=cc.comparable,
        dice_intersection=int(inter), dice_denominator=int(denom), loss_sum=float(loss_sum),
        n_patients=int(r.shape[0]), n_events=int((e > 0).sum()), n_labelled=labelled,
    )


def predict_batch(model: nn.Module, batch: Mapping[str, Any], cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """Recurrence probability maps and risks of a batch, on the CPU, float32.

    Runs on the model's current device in eval mode, with autocast per ``cfg.precision`` on that device.

    Returns
    -------
    (probs, risk):
        ``sigmoid(recurrence_logits)`` (B, 1, D, H, W) and the log-hazard risk (B,) (higher = earlier recurrence).
    """
    device = _model_device(model)
    logits, risk, _ = _forward_eval(model, batch, device, select_autocast(device, cfg.precision))
    return torch.sigmoid(logits).cpu(), risk.cpu()


# ----------------------------------------------------------------------------------------------------------------------
# model files
# ----------------------------------------------------------------------------------------------------------------------
def save_trained_model(
    path: str | os.PathLike[str],
    model: STRPNet,
    train_cfg: TrainConfig,
    *,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"format", "state_dict", "model_config", "train_config", "server_round": 0, "info"}`` atomically.

    The format is that of the server's ``final_model.pt`` (``strpnet-fed-model/1``), so ``strpnet predict`` reads
    both. ``info`` holds plain JSON-like values (epochs, metrics history).
    """
    if not isinstance(model, STRPNet):
        raise ValueError(f"save_trained_model: model must be an STRPNet, got {type(model).__name__}")
    payload = {
        "format": MODEL_FILE_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_config": model.cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "server_round": 0,
        "info": dict(info or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_trained_model(path: str | os.PathLike[str]) -> tuple[STRPNet, TrainConfig, dict[str, Any]]:
    """Read a model file (:func:`save_trained_model` or the server's ``final_model.pt``).

    Returns
    -------
    (model, train_cfg, payload):
        The network on the CPU with its weights, its training configuration and the raw payload.

    Raises
    ------
    ValueError
        Not a model file of :data:`MODEL_FILE_FORMAT`.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, missing file, ...
        raise ValueError(f"load_trained_model: {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"load_trained_model: {path} is not a {MODEL_FILE_FORMAT} file")
    try:
        model = STRPNet(ModelConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["state_dict"])
        train_cfg = TrainConfig.from_dict(payload.get("train_config", {}))
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:  # a key missing, weights of another model
        raise ValueError(f"load_trained_model: {path}: {type(exc).__name__}: {exc}") from exc
    return model, train_cfg, payload
