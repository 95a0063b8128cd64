#!/usr/bin/env bash
# One GPU visit, in parts, each output kept in OUT_DIR:
#   bash bench/gpu_session.sh OUT_DIR [PART ...]
# PART: tests-gpu (the @pytest.mark.gpu tests), tests-all (the whole suite, natively on the GPU),
# a benchmark name (fakequant bigram newton_schulz softcap_ce relu2_mlp xsa_attention step export ttt), or
# step-distributed (bench.step --distributed under torchrun over every GPU of the machine).
# Default: tests-gpu, then every benchmark. The whole call stops by DEADLINE_S seconds (default
# 560, under a 600 s remote-command limit); parts it did not reach are listed in summary.txt, so
# the next call can name them. Tables go into bench/RESULTS.md with the device, date and commit
# they print.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_session}}"
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests-gpu fakequant bigram newton_schulz softcap_ce relu2_mlp xsa_attention step export ttt)
deadline=$((SECONDS + ${DEADLINE_S:-560}))
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
git rev-parse --short HEAD > "$out/commit.txt" 2>/dev/null

for i in "${!parts[@]}"; do
    part="${parts[$i]}"
    left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "not run (out of time): ${parts[*]:$i}" | tee -a "$out/summary.txt"
        break
    fi
    start=$SECONDS
    case "$part" in
        tests-gpu) timeout "$left" python -m pytest -q -m gpu tests > "$out/tests_gpu.txt" 2>&1 ;;
        tests-all) timeout "$left" python -m pytest -q tests > "$out/tests_all.txt" 2>&1 ;;
        step-distributed) timeout "$left" torchrun --standalone --nproc_per_node="$(nvidia-smi -L | wc -l)" \
                              -m bench.step --distributed > "$out/bench_step_distributed.md" 2>&1 ;;
        *) timeout "$left" python -m "bench.$part" > "$out/bench_$part.md" 2>&1 ;;
    esac
    rc=$?
    note=""
    [ "$rc" -eq 124 ] && note=" (timed out)"
    echo "$part rc=$rc$note $((SECONDS - start))s" | tee -a "$out/summary.txt"
done
