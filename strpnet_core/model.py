"""ST-RPNet: a spatio-temporal network for glioblastoma recurrence location (voxel map) and risk (log-hazard).

Architecture (names kept from the seed notebook)::

    images (B, T, 4, D, H, W) ──CNN3DEncoder (shared weights, every real timepoint)──> skips_0..skips_{L-1}
                                                                                        │ bottleneck x_t
    days (B, T), time_mask (B, T) ──Δt──> TemporalLSTM (ConvLSTM at the bottleneck, time-aware) ──> h_T, c_T
    [h_T, x_last] ──fuse──> CNN3DDecoder (skips of each patient's LAST real timepoint) ──> recurrence_logits (B,1,D,H,W)
    h_T ──global avg+max pooling──> MLP ──(+ beta log1p(elapsed))──> risk (B,)   (higher = earlier recurrence)

Variable numbers of timepoints per patient are handled by ``time_mask``: the encoder only sees real timepoints,
the recurrent state is carried unchanged over padded steps, and every normalisation is per sample (instance norm),
so a patient's outputs do not depend on the padding nor on the other patients of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from monai.networks.blocks import Convolution, UnetOutBlock, UnetResBlock
from torch import Tensor, nn

__all__ = [
    "ModelConfig",
    "CNN3DEncoder",
    "TemporalLSTM",
    "CNN3DDecoder",
    "STRPNet",
    "STRPNetOutput",
    "count_parameters",
]

#: Instance norm with a learned affine per channel (per-sample statistics: batch composition never matters).
_NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": True})
_ACT: tuple[str, dict[str, Any]] = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
#: Initial voxel probability of recurrence (the decoder's output bias): recurrences are ~0.1-2 % of the brain.
RECURRENCE_PRIOR: float = 0.01


# ----------------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Configuration of :class:`STRPNet` (configuration as data: checkpoints and the Flower run config hold it).

    Attributes
    ----------
    in_channels:
        Input modalities per timepoint (4: T1n, T1c, T2w, T2-FLAIR).
    widths:
        Channels of the encoder levels, full resolution first; ``depth = len(widths)`` (>= 2). Level ``l`` works at
        ``1 / 2**l`` of the input resolution, so the spatial size must be divisible by ``2**(depth - 1)``.
    lstm_hidden:
        Hidden (and cell) channels of the bottleneck ConvLSTM.
    lstm_kernel:
        Odd kernel size of the ConvLSTM's gate convolution.
    risk_hidden:
        Hidden units of the risk MLP.
    dropout:
        Dropout probability in ``[0, 1)`` (channel dropout on the fused bottleneck, dropout in the risk MLP).
    time_scale_days:
        Days per time unit: ``Δt = Δdays / time_scale_days`` enters the ConvLSTM (30: months).
    risk_uses_elapsed:
        Give the risk head ``log1p(days_last / time_scale_days)``, the time since pre-op of the last scan (a patient
        still recurrence-free at a late scan is at lower risk: information a clinician has).
    """

    in_channels: int = 4
    widths: tuple[int, ...] = (8, 16, 32, 64)
    lstm_hidden: int = 48
    lstm_kernel: int = 3
    risk_hidden: int = 32
    dropout: float = 0.1
    time_scale_days: float = 30.0
    risk_uses_elapsed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", _parse_widths(self.widths))
        for name in ("in_channels", "lstm_hidden", "risk_hidden", "lstm_kernel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        if self.lstm_kernel % 2 == 0:
            raise ValueError(f"ModelConfig.lstm_kernel must be odd, got {self.lstm_kernel}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        ts = self.time_scale_days
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not (0 < ts < math.inf):
            raise ValueError(f"ModelConfig.time_scale_days must be positive and finite, got {ts!r}")
        if not isinstance(self.risk_uses_elapsed, bool):
            raise ValueError(f"ModelConfig.risk_uses_elapsed must be a bool, got {self.risk_uses_elapsed!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "time_scale_days", float(ts))

    @property
    def depth(self) -> int:
        """Number of encoder levels (``len(widths)``)."""
        return len(self.widths)

    @property
    def divisor(self) -> int:
        """Every spatial size must be a multiple of this (``2**(depth - 1)``)."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dict (``widths`` as a list)."""
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        ``widths`` may be a list/tuple of ints or a string such as ``"8,16,32,64"`` (Flower run configs hold
        scalars only).

        Raises
        ------
        ValueError
            An unknown key (named), or an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"ModelConfig.from_dict: d must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(d))


def _parse_widths(widths: Any) -> tuple[int, ...]:
    if isinstance(widths, str):
        try:
            widths = [int(w) for w in widths.replace(" ", "").split(",") if w]
        except ValueError:
            raise ValueError(f"ModelConfig.widths: cannot parse {widths!r} as comma-separated integers") from None
    if not isinstance(widths, Sequence) or isinstance(widths, (bytes, str)):
        raise ValueError(f"ModelConfig.widths must be a sequence of positive integers, got {widths!r}")
    out = tuple(widths)
    if len(out) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in out):
        raise ValueError(f"ModelConfig.widths must hold >= 2 positive integers, got {widths!r}")
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------------
class CNN3DEncoder(nn.Module):
    """Multi-level residual 3D CNN encoder, shared by every timepoint.

    Level 0 is a residual block at full resolution (``in_channels -> widths[0]``); level ``l >= 1`` is a residual
    block with stride 2 (``widths[l-1] -> widths[l]``, resolution halved). Each residual block (MONAI
    ``UnetResBlock``) computes ``y = act(norm(conv(act(norm(conv(x))))) + proj(x))`` with instance norm, LeakyReLU
    and ``proj`` a strided 1x1x1 convolution + norm where the shape changes.

    Parameters
    ----------
    in_channels:
        Input channels.
    widths:
        Channels per level (full resolution first).
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        widths = tuple(widths)
        if in_channels < 1 or len(widths) < 1:
            raise ValueError(f"CNN3DEncoder: need in_channels >= 1 and >= 1 width, got {in_channels}, {widths}")
        chans = (in_channels, *widths)
        self.levels = nn.ModuleList(
            UnetResBlock(3, chans[i], chans[i + 1], kernel_size=3, stride=1 if i == 0 else 2, norm_name=_NORM,
                         act_name=_ACT)
            for i in range(len(widths))
        )
        self.widths = widths

    def forward(self, x: Tensor) -> list[Tensor]:
        """Encode ``x`` (N, C, D, H, W); return the features of every level, full resolution first.

        Level ``l`` has shape (N, widths[l], D / 2**l, H / 2**l, W / 2**l); the last one is the bottleneck.
        """
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class TemporalLSTM(nn.Module):
    """Time-aware convolutional LSTM over the bottleneck features of irregularly spaced scans.

    At every step ``t`` (input ``x_t``, elapsed time ``Δ_t = (days_t - days_prev) / time_scale`` since the
    patient's previous real scan, 0 for the first one)::

        c_s   = tanh(W_d * c_{t-1})                                 short-term part of the memory
        c*    = c_{t-1} - c_s + c_s * g(Δ_t),   g(Δ) = 1 / log(e + Δ)   (T-LSTM decay, Baytas et al. 2017)
        i, f, o, u = split(W * [x_t, Δ_t 1, h_{t-1}] + b)           ConvLSTM gates (Shi et al. 2015); Δ_t is
                                                                    broadcast as an extra input channel
        c_t   = σ(f) ⊙ c* + σ(i) ⊙ tanh(u)
        h_t   = σ(o) ⊙ tanh(c_t)

    ``*`` is a 3D convolution (``W``: ``kernel`` wide, ``W_d``: 1x1x1). The elapsed time thus acts twice: as an
    input the gates can read, and as a fixed monotone decay of the short-term memory (the longer the interval,
    the less the previous short-term state counts). Where ``time_mask[b, t]`` is False (padding) the state of
    patient ``b`` is carried over unchanged: ``(h_t, c_t) = (h_{t-1}, c_{t-1})``.

    Parameters
    ----------
    in_channels:
        Channels of ``x_t``.
    hidden_channels:
        Channels of ``h`` and ``c``.
    kernel_size:
        Odd size of the gate convolution.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or hidden_channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"TemporalLSTM: need positive channels and an odd kernel_size, got {in_channels}, "
                f"{hidden_channels}, {kernel_size}"
            )
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv3d(in_channels + 1 + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)
        self.decay = nn.Conv3d(hidden_channels, hidden_channels, 1)
        with torch.no_grad():  # forget-gate bias 1: remember by default (Jozefowicz et al. 2015)
            self.gates.bias.zero_()
            self.gates.bias[hidden_channels: 2 * hidden_channels].fill_(1.0)

    def forward(self, x: Tensor, dt: Tensor, time_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the recurrence.

        Parameters
        ----------
        x:
            (B, T, C, d, h, w) bottleneck features (padded steps may hold anything; they are ignored).
        dt:
            (B, T) elapsed time since each patient's previous real scan, in time units (>= 0).
        time_mask:
            (B, T) bool, True for real steps.

        Returns
        -------
        (h, c):
            Final hidden and cell states, (B, hidden_channels, d, h, w) each.
        """
        b, t, _, *spatial = x.shape
        h = x.new_zeros((b, self.hidden_channels, *spatial))
        c = x.new_zeros((b, self.hidden_channels, *spatial))
        for step in range(t):
            d = dt[:, step].to(x.dtype).view(b, 1, 1, 1, 1)
            c_short = torch.tanh(self.decay(c))
            c_adj = c - c_short + c_short / torch.log(math.e + d)
            inp = torch.cat([x[:, step], d.expand(b, 1, *spatial), h], dim=1)
            i, f, o, u = torch.chunk(self.gates(inp), 4, dim=1)
            c_new = torch.sigmoid(f) * c_adj + torch.sigmoid(i) * torch.tanh(u)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            m = time_mask[:, step].view(b, 1, 1, 1, 1)
            h = torch.where(m, h_new, h)
            c = torch.where(m, c_new, c)
        return h, c


class _UpLevel(nn.Module):
    """Transposed conv (x2) to ``out`` channels, concatenation with the skip, residual block ``2 out -> out``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
        self.block = UnetResBlock(3, 2 * out_channels, out_channels, kernel_size=3, stride=1, norm_name=_NORM,
                                  act_name=_ACT)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class CNN3DDecoder(nn.Module):
    """U-Net style 3D decoder with skip connections, to a one-channel recurrence logit map at input resolution.

    From the bottleneck ``z`` (widths[-1] channels, resolution ``1/2**(L-1)``), level by level
    ``z_l = ResBlock([ConvT_2x2x2(z_{l+1}), skip_l])`` up to full resolution, then a 1x1x1 convolution gives the
    logit ``s(v)`` of ``P(recurrence at voxel v) = sigmoid(s(v))``.

    Parameters
    ----------
    widths:
        The encoder's widths (full resolution first); ``skips[l]`` must have ``widths[l]`` channels.
    out_channels:
        Output channels (1: the recurrence logit).
    """

    def __init__(self, widths: Sequence[int], out_channels: int = 1) -> None:
        super().__init__()
        widths = tuple(widths)
        if len(widths) < 2:
            raise ValueError(f"CNN3DDecoder: need >= 2 widths, got {widths}")
        self.ups = nn.ModuleList(_UpLevel(widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = UnetOutBlock(3, widths[0], out_channels)
        # Rare-class prior (Lin et al. 2017, "Focal loss"): start at P(recurrence) = RECURRENCE_PRIOR everywhere
        # instead of 0.5, so the first steps learn where recurrence is rather than that most voxels are negative.
        nn.init.constant_(self.head.conv.conv.bias, math.log(RECURRENCE_PRIOR / (1.0 - RECURRENCE_PRIOR)))

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """Decode ``bottleneck`` with ``skips`` (full resolution first, the bottleneck level excluded)."""
        x = bottleneck
        for up, skip in zip(self.ups, reversed(list(skips)), strict=True):
            x = up(x, skip)
        return self.head(x)


class _RiskHead(nn.Module):
    """Cox log-hazard: ``risk = beta * log1p(elapsed) + MLP([avgpool(h), maxpool(h)])`` (float32 even under autocast).

    A linear term in the clinical covariate (the time since pre-op of the last scan, when ``use_elapsed``) plus a
    deep term on the ConvLSTM state, as in Cox models with clinical covariates and learned image features. The deep
    term's last layer starts at zero, so training starts from the covariate model (``beta = 0``: every patient tied)
    and the image features add to it only as far as the Cox loss rewards them; without that, 96 pooled features of a
    randomly initialised network drown the covariate in noise at the cohort sizes of a site.
    """

    def __init__(self, hidden_channels: int, risk_hidden: int, dropout: float, use_elapsed: bool) -> None:
        super().__init__()
        self.use_elapsed = use_elapsed
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_channels, risk_hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(risk_hidden, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.beta = nn.Parameter(torch.zeros(1)) if use_elapsed else None

    def forward(self, h: Tensor, elapsed: Tensor) -> Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            risk = self.mlp(torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)).squeeze(1)
            if self.beta is not None:
                risk = risk + self.beta * torch.log1p(elapsed.float())
            return risk


# ----------------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------------
class STRPNetOutput(NamedTuple):
    """Output of :meth:`STRPNet.forward`.

    Attributes
    ----------
    recurrence_logits:
        (B, 1, D, H, W) logits; ``sigmoid`` gives the voxel-wise recurrence probability.
    risk:
        (B,) float32 log-hazard (Cox risk score): higher = earlier recurrence.
    """

    recurrence_logits: Tensor
    risk: Tensor


class STRPNet(nn.Module):
    """Spatio-temporal recurrence prediction network (see the module docstring for the data flow).

    Decoder skips come from each patient's LAST real timepoint. The recurrence has to be located in the anatomy
    as it is at the latest scan (post-resection cavity, current residual tumour); skips are high-resolution
    appearance, and averaging them over scans taken months apart would blur structures that moved (mass effect,
    resection, residual registration error). The temporal evolution reaches the decoder through the ConvLSTM state
    at the bottleneck, which is fused with the last bottleneck features: ``z = ConvNormAct_1x1([h_T, x_last])``.
    Keeping only the last skips also keeps the decoder's cost independent of T.

    Parameters
    ----------
    cfg:
        The :class:`ModelConfig` (default: ~0.96 M parameters, practical on CPU at 96^3 with T = 3).
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = ModelConfig() if cfg is None else cfg
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"STRPNet: cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        w = cfg.widths
        self.encoder = CNN3DEncoder(cfg.in_channels, w)
        self.temporal = TemporalLSTM(w[-1], cfg.lstm_hidden, cfg.lstm_kernel)
        self.fuse = Convolution(3, cfg.lstm_hidden + w[-1], w[-1], kernel_size=1, norm=_NORM, act=_ACT)
        self.bottleneck_dropout = nn.Dropout3d(cfg.dropout)
        self.decoder = CNN3DDecoder(w, out_channels=1)
        self.risk_head = _RiskHead(cfg.lstm_hidden, cfg.risk_hidden, cfg.dropout, cfg.risk_uses_elapsed)

    def forward(self, images: Tensor, days: Tensor, time_mask: Tensor | None = None) -> STRPNetOutput:
        """Predict the recurrence map and the risk of a batch of patients.

        Parameters
        ----------
        images:
            (B, T, in_channels, D, H, W) float, finite; D, H, W multiples of ``cfg.divisor``.
        days:
            (B, T) days since the pre-op scan, finite, >= 0, non-decreasing over each patient's real timepoints
            (padded entries are ignored).
        time_mask:
            (B, T) bool, True for real timepoints, at least one per patient (None: all real).

        Returns
        -------
        STRPNetOutput

        Raises
        ------
        ValueError
            Naming the argument: wrong rank or dtype, T = 0, shape mismatch, NaN/inf, negative or decreasing days,
            a patient without a real timepoint, spatial size not divisible by ``2**(depth-1)``.
        """
        time_mask = self._check_inputs(images, days, time_mask)
        b, t = images.shape[:2]
        scale = self.cfg.time_scale_days
        days = days.to(device=images.device, dtype=torch.float32)
        dt, last_day, last_idx = _elapsed(days, time_mask)

        feats = self.encoder(images[time_mask])  # only real timepoints: (N, C_l, ...)
        bottleneck = feats[-1]
        x = bottleneck.new_zeros((b, t, *bottleneck.shape[1:]))
        x[time_mask] = bottleneck
        h, _ = self.temporal(x, dt / scale, time_mask)

        # flat index (into the N real timepoints) of each patient's last real timepoint
        flat = torch.cumsum(time_mask.reshape(-1).long(), 0).view(b, t) - 1
        last_flat = flat[torch.arange(b, device=images.device), last_idx]
        x_last = bottleneck[last_flat]
        z = self.bottleneck_dropout(self.fuse(torch.cat([h.to(x_last.dtype), x_last], dim=1)))
        logits = self.decoder(z, [f[last_flat] for f in feats[:-1]])
        risk = self.risk_head(h, last_day / scale)
        return STRPNetOutput(recurrence_logits=logits, risk=risk)

    # ------------------------------------------------------------------------------------------------------------------
    def _check_inputs(self, images: Any, days: Any, time_mask: Any) -> Tensor:
        cfg = self.cfg
        if not isinstance(images, Tensor):
            raise ValueError(f"STRPNet: images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 6:
            raise ValueError(f"STRPNet: images must be (B, T, C, D, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"STRPNet: images must be floating point, got {images.dtype}")
        b, t, c, *spatial = images.shape
        if b == 0:
            raise ValueError("STRPNet: images has an empty batch (B = 0)")
        if t == 0:
            raise ValueError("STRPNet: images has no timepoint (T = 0)")
        if c != cfg.in_channels:
            raise ValueError(f"STRPNet: images has {c} channels, the model expects in_channels={cfg.in_channels}")
        if any(s % cfg.divisor for s in spatial) or min(spatial) == 0:
            raise ValueError(
                f"STRPNet: images spatial size {tuple(spatial)} must be positive multiples of 2**(depth-1) = "
                f"{cfg.divisor} (depth {cfg.depth})"
            )
        if math.prod(s // cfg.divisor for s in spatial) < 2:
            raise ValueError(
                f"STRPNet: images spatial size {tuple(spatial)} is too small for depth {cfg.depth}: the bottleneck "
                "would hold a single voxel (instance norm needs more)"
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError("STRPNet: images contains NaN or inf")
        if not isinstance(days, Tensor):
            raise ValueError(f"STRPNet: days must be a torch.Tensor, got {type(days).__name__}")
        if days.shape != (b, t):
            raise ValueError(f"STRPNet: days must have shape (B, T) = {(b, t)}, got {tuple(days.shape)}")
        if days.dtype == torch.bool or days.is_complex():
            raise ValueError(f"STRPNet: days must be numeric, got {days.dtype}")
        if time_mask is None:
            time_mask = torch.ones((b, t), dtype=torch.bool, device=images.device)
        if not isinstance(time_mask, Tensor):
            raise ValueError(f"STRPNet: time_mask must be a torch.Tensor, got {type(time_mask).__name__}")
        if time_mask.shape != (b, t):
            raise ValueError(f"STRPNet: time_mask must have shape (B, T) = {(b, t)}, got {tuple(time_mask.shape)}")
        if time_mask.dtype != torch.bool:
            if time_mask.is_complex() or not bool(((time_mask == 0) | (time_mask == 1)).all()):
                raise ValueError(f"STRPNet: time_mask must be boolean (or 0/1), got dtype {time_mask.dtype}")
            time_mask = time_mask != 0
        time_mask = time_mask.to(images.device)
        empty = (~time_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"STRPNet: time_mask has no True entry (no real timepoint) for batch index(es) {empty}")
        d = days.to(torch.float64)
        real = d[time_mask.to(d.device)]
        if not bool(torch.isfinite(real).all()):
            raise ValueError("STRPNet: days contains NaN or inf at a real timepoint")
        if bool((real < 0).any()):
            raise ValueError("STRPNet: days contains negative values (days since the pre-op scan are >= 0)")
        prev = torch.full((b,), -math.inf, dtype=d.dtype, device=d.device)
        m = time_mask.to(d.device)
        for step in range(t):
            bad = m[:, step] & (d[:, step] < prev)
            if bool(bad.any()):
                raise ValueError(
                    f"STRPNet: days must be non-decreasing over real timepoints (batch index(es) "
                    f"{bad.nonzero().flatten().tolist()} at step {step})"
                )
            prev = torch.where(m[:, step], d[:, step], prev)
        return time_mask


def _elapsed(days: Tensor, time_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per step, days since the previous real scan (0 for the first real one and at padded steps); last real day
    and index per patient."""
    b, t = days.shape
    dt = torch.zeros_like(days)
    prev = torch.full((b,), math.nan, dtype=days.dtype, device=days.device)
    for step in range(t):
        m = time_mask[:, step]
        cur = days[:, step]
        gap = torch.where(torch.isnan(prev), torch.zeros_like(cur), cur - prev)
        dt[:, step] = torch.where(m, gap, torch.zeros_like(cur))
        prev = torch.where(m, cur, prev)
    steps = torch.arange(t, device=days.device).expand(b, t)
    last_idx = torch.where(time_mask, steps, torch.full_like(steps, -1)).amax(dim=1)
    return dt, prev, last_idx
