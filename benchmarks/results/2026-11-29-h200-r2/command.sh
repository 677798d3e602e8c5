# GPU run r2: teardown fix; GPU tests; DeepSeek-MoE-16B recipe (bf16_sr) 4 steps; compute-only
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev .dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; git log -1 --format=%h >> $OUT/env.txt 2>/dev/null
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1 ) &
OPS=$!
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log tests
timeout 170 python3 -m pytest -q -p no:cacheprovider -rfs tests/gpu/test_teardown_cuda.py tests/gpu/test_pinned_register_cuda.py tests/gpu/test_parity_bf16.py > $OUT/tests.log 2>&1
tail -8 $OUT/tests.log >> $OUT/bench.log
log wait_ops; wait $OPS
log "recipe bf16_sr"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 4 --timeout 300 --out /tmp/json --model.offload.state.master=bf16_sr > $OUT/recipe.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 2
python3 - > $OUT/timeline.txt <<'PY'
import json; d = json.load(open("/tmp/json/recipe_deepseek-moe-16b.json"))
for r in d.get("host_timeline", []): print(json.dumps(r))
print("\n".join(d.get("log_tail", [])))
PY
grep '^RESULT' $OUT/recipe.log | cut -c1-3000 >> $OUT/bench.log
left=$((585 - (SECONDS - T0)))
log "compute (limit $left s)"
[ $left -gt 40 ] && timeout $left python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --micro-batches 6 --out /tmp/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 | cut -c1-900 >> $OUT/bench.log
log done
grep -v '^{' $OUT/bench.log | cut -c1-1500
