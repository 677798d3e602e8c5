# GPU run r34 (working tree): the fused step's kernel at 256 elements and 2 warps a program (r33). GPU tests of the
# fused step and the weight masters; then r32's full-depth offload_step harness again (bf16_sr + int8, clipping,
# auto hot cache, gpu_budget_gb 1): a traced step with halves, and thirds (MOETRAIN_STEP_CHUNKS=3) untraced
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log "GPU tests: fused step, weight masters"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_step_cuda.py tests/gpu/test_weight_masters_cuda.py > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log >> $OUT/bench.log
OS="python3 -m moetrain.bench.offload_step --full-depth --tier cpu --master bf16_sr --moments int8 --micro 4 --seq 2048 --accum 2 --max-grad-norm 1.0 --hot-cache-gb -1 --gpu-budget-gb 1"
log "full depth, halves, traced"
timeout 200 $OS --steps 5 --profile --out $OUT/traced > $OUT/traced.log 2>&1
grep -E '^RESULT' $OUT/traced.log | cut -c1-1500 >> $OUT/bench.log
log "full depth, thirds"
MOETRAIN_STEP_CHUNKS=3 timeout 150 $OS --steps 5 > $OUT/thirds.log 2>&1
grep -E '^RESULT' $OUT/thirds.log | cut -c1-1500 >> $OUT/bench.log
log done
cat $OUT/bench.log
