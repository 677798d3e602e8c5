# GPU run p2: compute-only DeepSeek-MoE-16B 2x2048; the recipe as written with a profile of step 2; 4-layer gpu vs auto; paged generation
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt; git rev-parse HEAD >> $OUT/env.txt 2>/dev/null
( python3 -m moetrain.offload.ops > $OUT/ops.log 2>&1 ) &
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log "compute --micro 2"
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --profile --micro-batches 6 --out $OUT/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 >> $OUT/bench.log
log recipe
timeout 290 python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 3 --timeout 270 --out $OUT/json --profile.step=2 > $OUT/recipe.log 2>&1
grep '^RESULT' $OUT/recipe.log >> $OUT/bench.log
wait
B="--layers 4 --micro 4 --seq 2048 --accum 4 --steps 6"
for v in gpu auto; do
  log "4layer $v"
  timeout 70 python3 -m moetrain.bench.offload_step --tier cpu --step-on $v $B > $OUT/l4-$v.log 2>&1
  grep '^RESULT' $OUT/l4-$v.log | sed "s/^RESULT /RESULT {\"v\": \"$v\"} /" >> $OUT/bench.log
done
log paged
left=$((585 - (SECONDS - T0)))
timeout $left python3 -m moetrain.cli bench paged_generate --preset mixtral-8x7b --layers 4 --make_dir /tmp/mixtral-4l --new_tokens 64 --out $OUT/json > $OUT/paged.log 2>&1
grep '^RESULT' $OUT/paged.log >> $OUT/bench.log
log done
cut -c1-1200 $OUT/bench.log
