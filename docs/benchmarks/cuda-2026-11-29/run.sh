#!/bin/bash
# gradsift's GPU checks (issue 13): one prepared script; every part writes to $OUT as it goes.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.devcarry/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
M=/tmp/smollm2-arch
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,transformers,peft;print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
  echo commit ${GS_COMMIT:-?}; date -u; } 2>&1 | tee $OUT/env.txt
python3 .devcarry/build_model.py .devcarry/smollm2-arch $M 2>&1 | grep -v Writing | tee -a $OUT/env.txt
t0=$SECONDS
# smoke: fail fast on a device bug (tiny, float32, one timed step)
timeout 120 python3 -m gradsift.bench.step --device cuda --repeats 1 \
  --methods ftw,two-pass,greats,loss,random,ftw-truncated > $OUT/smoke.txt 2>&1
rc=$?; echo "smoke rc=$rc $((SECONDS-t0)) s"; tail -12 $OUT/smoke.txt
[ $rc -eq 0 ] || { tail -60 $OUT/smoke.txt; exit 3; }
# 1. the bundled architecture with LoRA, bf16, T=512 and T=128 (same records as the CPU rows)
for T in ${TS:-512 128}; do
  timeout 150 python3 -m gradsift.bench.step --model $M --device cuda --dtype bfloat16 --lora \
    --seq-len $T --repeats ${REPEATS:-8} --measure-refresh --markdown $OUT/lora-bf16-T$T.md > $OUT/lora-bf16-T$T.txt 2>&1
  echo "lora T=$T rc=$? $((SECONDS-t0)) s"; grep '^ratio' $OUT/lora-bf16-T$T.txt
done
# 2. long-context table, full fine-tuning, bf16, T = 512 and 4096
timeout ${LONG_S:-200} python3 -m gradsift.bench.step --seq-lens ${LONG_TS:-512,4096} --model $M --device cuda \
  --dtype bfloat16 --ghost-max-len 512 --markdown $OUT/long-bf16.md --plot $OUT/long-bf16.png -v > $OUT/long-bf16.txt 2>&1
echo "long rc=$? $((SECONDS-t0)) s"; tail -20 $OUT/long-bf16.txt
