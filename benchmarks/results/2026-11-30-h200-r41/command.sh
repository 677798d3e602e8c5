# GPU run r41 (tree at 7a0ce09): how fast can Qwen3-30B-A3B's forward and backward run on one H200 at all?
# Compute-only (resident bf16 weights, every gradient kept, no optimizer) at the recipe's micro-batch (1 x 4096) and at
# 2, 4 and 8 rows of 4096 with activation checkpointing: the ceiling a fit's mfu cannot pass
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
for v in "1 false" "2 true" "4 true" "8 true"; do
  set -- $v
  log "compute-only qwen3-30b-a3b, $1 x 4096, checkpointing $2"
  timeout 150 python3 -m moetrain.bench.compute_only --recipe recipes/qwen3-30b-a3b.yaml --micro $1 --checkpoint-layers $2 \
      --micro-batches 6 > $OUT/compute_$1.log 2>&1
  grep '^RESULT' $OUT/compute_$1.log | cut -c1-900 >> $OUT/bench.log || tail -3 $OUT/compute_$1.log | cut -c1-400 >> $OUT/bench.log
done
log done
cat $OUT/bench.log
