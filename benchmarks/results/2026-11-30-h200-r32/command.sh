# GPU run r32 (tree HEAD): a trace of the optimizer step after backward at full depth. The offload_step harness with
# the DeepSeek-MoE-16B shape (28 layers), bf16_sr + int8 in host memory, 2 micro-batches of 4 x 2048 with clipping
# (the whole expert step after backward), the auto hot cache, gpu_budget_gb 1 as the recipe: a traced step (CPU +
# CUDA, Chrome trace kept) and cProfile of the last timed optimizer step; then thirds and gpu_budget_gb 4 untraced
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
OS="python3 -m moetrain.bench.offload_step --full-depth --tier cpu --master bf16_sr --moments int8 --micro 4 --seq 2048 --accum 2 --max-grad-norm 1.0 --hot-cache-gb -1"
log "full depth, budget 1, traced"
timeout 330 $OS --gpu-budget-gb 1 --steps 5 --profile --cprofile --out $OUT/traced > $OUT/traced.log 2>&1
grep -E '^RESULT|overlap of' $OUT/traced.log | cut -c1-3000 >> $OUT/bench.log
log "full depth, budget 1, thirds"
MOETRAIN_STEP_CHUNKS=3 timeout 200 $OS --gpu-budget-gb 1 --steps 4 > $OUT/thirds.log 2>&1
grep -E '^RESULT' $OUT/thirds.log | cut -c1-3000 >> $OUT/bench.log
log "full depth, budget 4"
timeout 200 $OS --gpu-budget-gb 4 --steps 4 > $OUT/budget4.log 2>&1
grep -E '^RESULT' $OUT/budget4.log | cut -c1-3000 >> $OUT/bench.log
log done
cat $OUT/bench.log
