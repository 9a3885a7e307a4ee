#!/usr/bin/env bash
# The GPU check: the `gpu` tests, the README's bundle commands on CUDA (torchrun with NCCL included) and the GPU
# benchmarks (their numbers go to docs/performance.md), in one run of under 10 minutes on one GPU. Logs and JSON
# results go to $OUT (default gpu_check_out/).
#
#   bash benchmarks/gpu_check.sh [stage ...]    stages: tests commands ddp train segment network compile
#                                               (default: all but compile)
#
# Needs the package's requirements except itk (no NIfTI path imports it) and the MSD hippocampus folder in
# $IC_MOE_DATA (default .gpu/data/msd_hippocampus). Each stage has its own time limit; the run goes on past a failed
# stage and exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DATA=${IC_MOE_DATA:-.gpu/data/msd_hippocampus}
export IC_MOE_SHARED_DATA=${IC_MOE_SHARED_DATA:-$(dirname "$DATA")}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests commands ddp train segment network)
status=0

run_stage() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
    [ $rc -ne 0 ] && status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
for stage in "${stages[@]}"; do
    case $stage in
    tests) run_stage tests 150 python3 -m pytest -q -p no:cacheprovider -m "gpu" -rs tests/test_gpu.py \
        tests/test_gpu_training.py ;;
    commands) run_stage commands 150 bash benchmarks/gpu_commands.sh "$DATA" "$OUT/commands" ;;
    ddp) run_stage ddp 90 bash benchmarks/gpu_commands.sh "$DATA" "$OUT/commands" ddp ;;
    train) run_stage train 170 python3 benchmarks/train_step.py --device cuda --dataset_dir "$DATA" \
        --max_train_cases 60 --max_val_cases 12 --out "$OUT/train_step_gpu.json" --profile_dir "$OUT" ;;
    segment) run_stage segment 120 python3 benchmarks/segment_speed.py --large_ct --device cuda \
        --out "$OUT/segment_speed_gpu.json" ;;
    network) run_stage network 100 python3 benchmarks/network_speed.py --device cuda --out "$OUT/network_speed_gpu.json" ;;
    compile) run_stage compile 200 python3 benchmarks/network_speed.py --device cuda --compile \
        --cases vit_b:256:128 --dtypes bf16 --out "$OUT/network_speed_gpu_compiled.json" ;;
    *) echo "unknown stage $stage"; status=2 ;;
    esac
done
exit $status
