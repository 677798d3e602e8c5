# GPU run r42 (tree at 7a0ce09): where Qwen3-30B-A3B's compute-only micro-batch goes (4 x 4096, activation checkpointing,
# two traced): the kernel families and the GPU's idle time
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log "compute-only qwen3-30b-a3b, 4 x 4096, checkpointing, 2 micro-batches traced"
timeout 200 python3 -m moetrain.bench.compute_only --recipe recipes/qwen3-30b-a3b.yaml --micro 4 --checkpoint-layers true \
    --micro-batches 3 --profile --out /tmp/json > $OUT/compute_4_profile.log 2>&1
cp /tmp/json/compute_only_qwen3-30b-a3b.json $OUT/compute_only_profile.json
python3 -c "
import json; d = json.load(open('$OUT/compute_only_profile.json')); p = d.pop('profile_2_micro_batches')
print('RESULT', json.dumps(d)); print('GPU', json.dumps(p['gpu'])); print('IDLE', json.dumps(p['idle'])[:600])
for k in p['kernels'][:25]: print('KERNEL', round(k['s'] / 2 * 1e3, 2), 'ms', k['calls'] // 2, k['name'][:110])
" >> $OUT/bench.log 2>&1
log done
cat $OUT/bench.log
