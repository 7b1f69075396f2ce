#!/usr/bin/env bash
# The GPU checks of a site or a simulation host with CUDA (docs/performance.md, "On a GPU"), in one go:
#   1. the CUDA tests (tests marked `cuda`: a site's training with AMP, CPU/GPU agreement, simulated sites sharing
#      the GPU; they are skipped on machines without CUDA),
#   2. the training step at the demo grid on the GPU (ST-RPNet vs MONAI DynUNet, fp32 vs bf16; ST-RPNet again with the
#      deterministic kernels that training uses),
#   3. a simulation of 3 sites at the demo grid: the sites sharing one GPU vs one site on the GPU at a time.
# Usage: benchmarks/gpu_checks.sh [OUT_DIR]   (python3 with the project's dependencies and a CUDA torch)
set -u
out=${1:-runs/gpu-checks}
mkdir -p "$out"
py=${PYTHON:-python3}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: run with a bound, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), \
'bf16', torch.cuda.is_bf16_supported())" || exit 1
step cuda-tests 600 "$py" -m pytest -q -p no:cacheprovider -rs tests/core/test_cuda.py tests/server/test_simulation_gpu.py
step train-step 100 "$py" benchmarks/bench_train_step.py --device cuda --size 96 --timepoints 3 --repeats 10
step train-step-deterministic 60 "$py" benchmarks/bench_train_step.py --device cuda --size 96 --timepoints 3 \
    --repeats 10 --networks strpnet --deterministic
for gpus in shared 1; do
    arg=(); [ "$gpus" = shared ] || arg=(--gpus-per-site "$gpus")
    step "sim-gpu-$gpus" 130 "$py" benchmarks/bench_federation.py --sites 3 --patients 8 --size 96 --timepoints 3 \
        --rounds 2 -c local-epochs=2 "${arg[@]}"
done
exit $status
