# GPU run q1: fork probe, compute-only, DeepSeek-MoE-16B fit (bf16_sr + int8) with a micro-batch profile, 4-layer gpu vs auto
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
log probe
timeout 90 python3 scripts/probe_fork_pinned.py > $OUT/probe.log 2>&1
log compute
timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --profile --micro-batches 6 --out /tmp/json > $OUT/compute.log 2>&1
grep '^RESULT' $OUT/compute.log | tail -1 >> $OUT/bench.log
wait
log recipe
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 3 --timeout 330 --out /tmp/json --model.offload.state.master=bf16_sr --profile.step=3 --profile.micro_batches=2 > $OUT/recipe.log 2>&1
pkill -f "moetrain.cli fit" ; pkill -f "moetrain fit"; sleep 2
tail -60 /tmp/json/recipe_deepseek-moe-16b.log > $OUT/fit_tail.log 2>/dev/null
cp /tmp/moetrain-front/deepseek-moe-16b/runs/deepseek-moe-16b/profile_step_3.json $OUT/ 2>/dev/null; find /tmp/moetrain-front /tmp/json -name 'profile_step_*.json' | head > $OUT/profiles.txt
grep '^RESULT' $OUT/recipe.log >> $OUT/bench.log
B="--layers 4 --micro 4 --seq 2048 --accum 4 --steps 9"
for v in gpu auto; do
  left=$((585 - (SECONDS - T0))); [ $left -lt 20 ] && break
  log "4layer $v"
  timeout $left python3 -m moetrain.bench.offload_step --tier cpu --step-on $v $B > $OUT/l4-$v.log 2>&1
  grep '^RESULT' $OUT/l4-$v.log | sed "s/^RESULT /RESULT {\"v\": \"$v\"} /" >> $OUT/bench.log
done
log done
cut -c1-1500 $OUT/bench.log
