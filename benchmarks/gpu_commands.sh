#!/usr/bin/env bash
# The README's bundle commands on a CUDA GPU, kept short: training with the lite and the sam_vit_b profile (random
# SAM-format weights made by segment_anything's own builder), evaluation, and one torchrun training run with NCCL.
#
#   bash benchmarks/gpu_commands.sh DATASET_DIR OUT_DIR [ddp]
set -euo pipefail
data=$1
out=$2
mkdir -p "$out"
cfg=bundle/configs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r bundle "$work/bundle"
short=(--max_train_cases 12 --max_val_cases 4 --steps_per_epoch 20 --max_epochs 1 --num_workers 4)

if [ "${3:-}" = ddp ]; then
    echo "## torchrun, 1 process, NCCL: training then evaluation"
    torchrun --standalone --nproc_per_node=1 -m monai.bundle run training \
        --config_file "['$cfg/train.json','$cfg/multi_gpu_train.json']" --bundle_root "$work/bundle" \
        --dataset_dir "$data" --output_dir "$out/ddp" "${short[@]}"
    torchrun --standalone --nproc_per_node=1 -m monai.bundle run evaluating \
        --config_file "['$cfg/train.json','$cfg/evaluate.json','$cfg/multi_gpu_evaluate.json']" \
        --bundle_root "$work/bundle" --dataset_dir "$data" --output_dir "$out/ddp_eval" --max_eval_cases 8
    python3 -c "import json,sys; m=json.load(open('$out/ddp_eval/metrics_summary.json')); print('ddp eval', m)"
    exit 0
fi

echo "## lite: run training, then run evaluating"
python3 -m monai.bundle run training --config_file "$cfg/train.json" --bundle_root "$work/bundle" \
    --dataset_dir "$data" --output_dir "$out/lite" "${short[@]}"
python3 -m monai.bundle run evaluating --config_file "['$cfg/train.json','$cfg/evaluate.json']" \
    --bundle_root "$work/bundle" --dataset_dir "$data" --output_dir "$out/lite_eval" --max_eval_cases 8

echo "## sam_vit_b: a SAM-format checkpoint with random weights, run training (clicks on), run inference"
python3 - "$work/sam_vit_b_random.pth" <<'PY'
import sys, torch
from segment_anything import sam_model_registry
torch.save(sam_model_registry["vit_b"]().state_dict(), sys.argv[1])
PY
python3 -m monai.bundle run training --config_file "['$cfg/train.json','$cfg/sam_vit_b.json']" \
    --bundle_root "$work/bundle" --sam_checkpoint "$work/sam_vit_b_random.pth" --dataset_dir "$data" \
    --output_dir "$out/vit_b" "${short[@]}"
python3 -m monai.bundle run inference --config_file "['$cfg/inference.json','$cfg/sam_vit_b.json']" \
    --bundle_root "$work/bundle" --output_dir "$out/vit_b_infer"
ls -l "$out/vit_b_infer"
