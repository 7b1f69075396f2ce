"""The GPU path of a site's training (skipped where torch sees no CUDA GPU; run on a GPU machine, docs/performance.md).

On CUDA a site trains with mixed precision (``precision = "auto"``: bf16 autocast where the GPU supports it, else
fp16 with a GradScaler). Checked here: training on the toy of ``test_training.py`` learns the map and the ranking as
on the CPU; fp16 AMP with its GradScaler trains; the CUDA forward pass in fp32 equals the CPU's; the same seed gives
bit-identical weights.
"""

from __future__ import annotations

import pytest
import torch

from strpnet_core.dataset import collate_patients
from strpnet_core.metrics import concordance_index
from strpnet_core.model import ModelConfig
from strpnet_core.training import TrainConfig, evaluate_model, predict_batch, select_autocast, train_epochs

from test_training import _model, toy_dataset  # noqa: I001  (tests/core is on sys.path)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")]


def test_auto_precision_on_cuda_is_mixed() -> None:
    enabled, dtype = select_autocast(torch.device("cuda"), "auto")
    assert enabled and dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_training_on_cuda_learns_the_toy_map_and_ranks_risks() -> None:
    """The CPU test's toy and settings (tests/core/test_training.py), on CUDA with mixed precision."""
    cfg = TrainConfig(lr=1e-2, local_epochs=30, batch_size=8, precision="auto", risk_memory=0, device="cuda")
    data = toy_dataset(24)
    model = _model()
    result = train_epochs(model, data, cfg, seed=0)
    assert result.device.startswith("cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    agg = evaluate_model(model, data, cfg)
    _, risk = predict_batch(model, collate_patients(data), cfg)
    c = concordance_index(risk.float().cpu().numpy(), [float(d["time"]) for d in data],
                          [float(d["event"]) for d in data])
    assert c > 0.8 and agg.c_index == pytest.approx(c)
    assert agg.dice > 0.7


def test_fp16_amp_with_grad_scaler_trains() -> None:
    cfg = TrainConfig(lr=1e-2, local_epochs=10, batch_size=8, precision="fp16", risk_memory=0, device="cuda")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_epochs(model, toy_dataset(16), cfg, seed=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert any(not torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())


def test_cuda_forward_equals_cpu_in_fp32() -> None:
    """Same weights and batch: CUDA fp32 (TF32 off) matches the CPU to float32 rounding."""
    batch = collate_patients(toy_dataset(4, seed=3))
    cfg_cpu = TrainConfig(precision="fp32", device="cpu")
    cfg_gpu = TrainConfig(precision="fp32", device="cuda")
    model = _model().eval()
    logits_cpu, risk_cpu = predict_batch(model, batch, cfg_cpu)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        logits_gpu, risk_gpu = predict_batch(model.to("cuda"), batch, cfg_gpu)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = (logits_gpu.cpu() - logits_cpu).norm() / logits_cpu.norm()
    assert rel < 1e-4
    torch.testing.assert_close(risk_gpu.cpu(), risk_cpu, rtol=1e-4, atol=1e-5)


def test_same_seed_same_weights_on_cuda() -> None:
    """Two runs with one seed end at bit-identical weights (training runs under ``deterministic_cuda``), and the
    global cuDNN / determinism settings are restored afterwards."""
    cfg = TrainConfig(lr=1e-2, local_epochs=2, batch_size=2, precision="auto", risk_memory=4, device="cuda")
    data = toy_dataset(6, seed=1)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    runs = []
    for _ in range(2):
        model = _model(ModelConfig(widths=(4, 8), lstm_hidden=4, risk_hidden=4, dropout=0.3))
        train_epochs(model, data, cfg, seed=5)
        runs.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled()) == flags
