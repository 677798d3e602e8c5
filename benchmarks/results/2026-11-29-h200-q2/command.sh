# GPU run q2: why the bf16_sr fit ran out of host memory (timeline), expandable segments on against off
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
log "compute, expandable segments off"
PYTORCH_ALLOC_CONF=expandable_segments:False timeout 100 python3 -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --profile --micro-batches 6 --out /tmp/json > $OUT/compute_off.log 2>&1
grep '^RESULT' $OUT/compute_off.log | tail -1 | cut -c1-900 >> $OUT/bench.log
wait
log "recipe bf16_sr, expandable on, 2 steps"
python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 2 --timeout 240 --out /tmp/json --model.offload.state.master=bf16_sr > $OUT/recipe_on.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 2
python3 - > $OUT/timeline_on.txt <<'PY'
import json; d = json.load(open("/tmp/json/recipe_deepseek-moe-16b.json"))
for r in d.get("host_timeline", []): print(json.dumps(r))
print("\n".join(d.get("log_tail", [])))
PY
grep '^RESULT' $OUT/recipe_on.log | cut -c1-1500 >> $OUT/bench.log
log "recipe bf16_sr, expandable off, profile step 3"
left=$((590 - (SECONDS - T0)))
PYTORCH_ALLOC_CONF=expandable_segments:False python3 -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 3 --timeout $((left - 15)) --out /tmp/json --model.offload.state.master=bf16_sr --profile.step=3 --profile.micro_batches=2 > $OUT/recipe_off.log 2>&1
pkill -f "moetrain.cli fit" ; sleep 1
python3 - > $OUT/timeline_off.txt <<'PY'
import json; d = json.load(open("/tmp/json/recipe_deepseek-moe-16b.json"))
for r in d.get("host_timeline", []): print(json.dumps(r))
print(json.dumps(d.get("profile_step_3")))
print("\n".join(d.get("log_tail", [])))
PY
grep '^RESULT' $OUT/recipe_off.log | cut -c1-2500 >> $OUT/bench.log
log done
cut -c1-2500 $OUT/bench.log
