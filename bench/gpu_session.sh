#!/usr/bin/env bash
# One GPU visit: the GPU-only tests, then every benchmark, each output kept in OUT_DIR.
#   bash bench/gpu_session.sh [OUT_DIR]        (default: $OUT, else ./gpu_session)
# Tables from here go into bench/RESULTS.md with the device, date and commit they print.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_session}}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
python -m pytest -q -m gpu tests > "$out/tests_gpu.txt" 2>&1; echo "gpu tests rc=$?" | tee -a "$out/summary.txt"
for bench in fakequant bigram newton_schulz softcap_ce xsa_attention step; do
    timeout 900 python -m "bench.$bench" > "$out/bench_$bench.md" 2>&1
    echo "bench.$bench rc=$?" | tee -a "$out/summary.txt"
done
