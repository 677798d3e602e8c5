# GPU run p3: the DeepSeek-MoE-16B recipe as written (3 steps), then 4-layer gpu vs auto
set -u
T0=$SECONDS
mkdir -p /tmp/head && tar -xf .dev/head.tar -C /tmp/head && cp -r .dev /tmp/head/.dev && cd /tmp/head
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl .dev/wandb/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/aio && for f in .dev/*.deb; do dpkg -x $f /tmp/aio; done
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ops WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt; date -u >> $OUT/env.txt
( python3 -m moetrain.offload.ops > /tmp/ops.log 2>&1 ) &
log() { echo "=== $1 ($((SECONDS - T0)) s)" >> $OUT/bench.log; }
log recipe
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 3 --timeout 330 --out /tmp/json > $OUT/recipe.log 2>&1
pkill -f "moetrain.cli fit" ; pkill -f "moetrain fit"; sleep 2
tail -40 /tmp/json/recipe_deepseek-moe-16b.log > $OUT/fit_tail.log 2>/dev/null
grep '^RESULT' $OUT/recipe.log >> $OUT/bench.log
B="--layers 4 --micro 4 --seq 2048 --accum 4 --steps 6"
for v in gpu auto; do
  left=$((560 - (SECONDS - T0))); [ $left -lt 20 ] && break
  log "4layer $v"
  timeout $left python3 -m moetrain.bench.offload_step --tier cpu --step-on $v $B > $OUT/l4-$v.log 2>&1
  grep '^RESULT' $OUT/l4-$v.log | sed "s/^RESULT /RESULT {\"v\": \"$v\"} /" >> $OUT/bench.log
done
log done
cut -c1-1500 $OUT/bench.log
